"""Write the artifact: the compiled kernels plus the metadata and weights blobs, linked into one .so.

The blobs are embedded with `.incbin` in a few lines of C compiled into an addon object; each is exported as a
TVM-FFI function returning bytes (see runtime/artifact.py for the format). Writing goes to a temporary file
that replaces the target only when complete, so a failed build never leaves half an artifact behind; the file
ends with a seal, a checksum of everything before it, which every load verifies. The blob
labels are hidden, so they are addressed PC-relative: through the GOT, aarch64's assembler folds local labels into
section-relative entries that lose the offset, and every blob would start at .rodata with length 0.

With `weights_file=True` the weights go to `model.weights` beside `model.so` instead (written first, also through a
temporary file); the embedded blob is then empty and has no view, so a loader that does not know the file fails
on the size, not on bytes past the blob. A CUDA artifact's device code is linked in as a fatbin (codegen/cuda.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from kiln.errors import CodegenError
from kiln.runtime.artifact import META_SYMBOL, WEIGHTS_SUFFIX, WEIGHTS_SYMBOL, WEIGHTS_VIEW_SYMBOL, seal

from .cuda import DeviceCode, fpack_imports, packed_imports_with_binary
from .entry import ENTRY_SYMBOL, entry_source
from .pool import POOL_SYMBOL

_BLOBS_C = r'''
#include <tvm/ffi/c_api.h>
#define BLOB(name, file) \
  __asm__(".section .rodata\n.balign 64\n" #name "_s:\n.incbin \"" file "\"\n" #name "_e:\n.previous"); \
  __attribute__((visibility("hidden"))) extern const char name##_s[], name##_e[]; \
  int __tvm_ffi_##name(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* ret) { \
    TVMFFIByteArray b = {name##_s, (size_t)(name##_e - name##_s)}; return TVMFFIBytesFromByteArray(&b, ret); }
BLOB(%(meta)s, "%(meta_file)s")
BLOB(%(weights)s, "%(weights_file)s")
'''
_WEIGHTS_VIEW_C = r'''/* where the weights lie in the loaded library: the loader copies them once, straight into its arena */
int __tvm_ffi_%(weights_view)s(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* ret) {
  ret->type_index = kTVMFFIOpaquePtr; ret->zero_padding = 0; ret->v_uint64 = 0;
  ret->v_ptr = (void*)%(weights)s_s; return 0; }
'''


def write_artifact(path: Path, executable, meta: dict, weights: bytes, cc: str = "gcc", fcompile=None, *,
                   weights_file: bool = False, device: DeviceCode | None = None) -> Path:
    """The artifact at `path`; with `weights_file`, the weights at `path.with_suffix(".weights")`. `device`: a
    CUDA executable's kernels compiled (codegen/cuda.py), linked in place of their source."""
    import tvm_ffi

    path = Path(path)
    # a loader refuses this artifact without its seal; `pool`: the parallel-loop pool it installs (codegen/pool.py)
    meta = {**meta, "entry": ENTRY_SYMBOL, "pool": POOL_SYMBOL, "sealed": True}
    if weights_file:
        meta.update(format=max(meta["format"], 3), weights_file=path.with_suffix(WEIGHTS_SUFFIX).name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kiln-artifact-") as tmp:
        t = Path(tmp)
        (t / "meta.json").write_text(json.dumps(meta))
        (t / "weights.bin").write_bytes(b"" if weights_file else weights)
        (t / "blobs.c").write_text((_BLOBS_C if weights_file else _BLOBS_C + _WEIGHTS_VIEW_C) % {"meta": META_SYMBOL, "weights": WEIGHTS_SYMBOL,
                                               "weights_view": WEIGHTS_VIEW_SYMBOL,
                                               "meta_file": t / "meta.json", "weights_file": t / "weights.bin"})
        (t / "entry.c").write_text(entry_source(meta["steps"], len(meta["values"])))
        try:
            for name in ("blobs", "entry"):
                subprocess.run([cc, "-c", "-fPIC", "-O2", "-I", tvm_ffi.libinfo.find_include_path(),
                                str(t / f"{name}.c"), "-o", str(t / f"{name}.o")], check=True, capture_output=True,
                               text=True)
        except FileNotFoundError:
            raise CodegenError(f"C compiler {cc!r} not found; it links the artifact") from None
        except subprocess.CalledProcessError as err:
            raise CodegenError(f"compiling the artifact's metadata object failed: {err.stderr.strip()[:500]}") from None
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        kwargs = {"fcompile": fcompile} if fcompile is not None else {}
        if device is not None:
            kwargs["fpack_imports"] = fpack_imports(packed_imports_with_binary(executable, device.source,
                                                                               device.fatbin))
        executable.export_library(str(partial), addons=[str(t / "blobs.o"), str(t / "entry.o")], **kwargs)
        seal(partial)
        if weights_file:  # before the library that names it, so a finished artifact always has its weights
            wpath = path.with_suffix(WEIGHTS_SUFFIX)
            wpartial = wpath.with_name(f".{wpath.name}.partial-{os.getpid()}")
            wpartial.write_bytes(weights)
            os.replace(wpartial, wpath)
        os.replace(partial, path)
    return path
