#!/bin/sh
# A genuinely aarch64 TVM RPC server on this x86 machine, under qemu-user, and Kiln's RPC runner measuring
# cross-compiled candidates on it (tests/autotune/test_rpc.py, marked slow). Timings are emulated and mean
# nothing for speed; the round trip (build here, upload, check and time there, results back) is what it shows.
#
#   bench/rpc_aarch64.sh [DIR]      # DIR (default ~/.cache/kiln/aarch64): arm64 Python + TVM, made once
#
# Needs root once (dpkg --add-architecture arm64; apt-get update), qemu-user, gcc-aarch64-linux-gnu, and pip
# able to fetch apache-tvm's manylinux aarch64 wheels. Nothing is installed on the host: Debian's arm64 Python
# is unpacked with dpkg -x into DIR/root, the wheels into DIR/site.
set -eu
DIR=${1:-${HOME}/.cache/kiln/aarch64}
HERE=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$DIR/debs" "$DIR/wheels" "$DIR/root" "$DIR/site"

if [ ! -x "$DIR/root/usr/bin/python3.11" ]; then
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    dpkg --add-architecture arm64
  fi
  apt-get update -q
  # python3.11 and the libraries it loads (apt-cache depends python3.11:arm64, recursively, less the host's)
  (cd "$DIR/debs" && apt-get download media-types $(for p in python3.11-minimal libpython3.11-minimal \
      libpython3.11-stdlib python3.11 libc6 libexpat1 zlib1g libffi8 libssl3 libbz2-1.0 liblzma5 libsqlite3-0 \
      libstdc++6 libgcc-s1 libncursesw6 libtinfo6 libreadline8 libuuid1 libcrypt1 libdb5.3 libnsl2 libtirpc3 \
      libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 libkeyutils1 libcom-err2 libzstd1 libgomp1; do
      echo "$p:arm64"; done))
  for deb in "$DIR"/debs/*.deb; do dpkg -x "$deb" "$DIR/root"; done
fi

if [ ! -d "$DIR/site/tvm" ]; then
  # apache-tvm-ffi pinned as on the host (docs: 0.1.15.x segfaults); ml_dtypes pinned to a wheel that exists
  pip download -q --no-deps --only-binary=:all: --python-version 3.11 --implementation cp \
      --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 --platform manylinux_2_17_aarch64 \
      --platform manylinux2014_aarch64 -d "$DIR/wheels" apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 \
      numpy psutil cloudpickle tornado ml_dtypes==0.5.4 typing_extensions
  for whl in "$DIR"/wheels/*.whl; do (cd "$DIR/site" && python3 -m zipfile -e "$whl" .); done
fi

cat > "$DIR/py-a64" <<EOF
#!/bin/sh
exec qemu-aarch64 -L "$DIR/root" "$DIR/root/usr/bin/python3.11" "\$@"
EOF
chmod +x "$DIR/py-a64"
echo "aarch64 Python: $("$DIR/py-a64" -c 'import platform; print(platform.machine(), platform.python_version())')"

cd "$HERE"
KILN_AARCH64_DIR="$DIR" python -m pytest -q -m slow tests/autotune/test_rpc.py -k aarch64 -p no:randomly -s
