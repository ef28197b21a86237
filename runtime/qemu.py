"""Run an artifact built for another architecture (aarch64) on this machine under qemu-user: `QemuModel(path)`.

Python and TVM do not exist for the target here, so a small C harness (qemu_harness.c, built with the target's
cross gcc) loads the artifact, lays out its values exactly as runtime/model.py does, feeds inputs from files and
calls the native entry once per run. Parallel loops run serially. This checks correctness; emulated run times
say nothing about the target's speed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.errors import ArtifactError

from .artifact import check_elf, dlpack_code, read_artifact, tensor_dtype, validate_metadata
from .cpu import host_arch
from .model import TensorInfo, check_inputs

HARNESS_SOURCE = Path(__file__).with_name("qemu_harness.c")


@dataclass(frozen=True)
class Emulator:
    qemu: str  # the qemu-user binary
    sysroot: str  # the target's libc, ld.so and libdl (qemu -L)
    cc: str  # the cross compiler that builds the harness
    packages: str  # what to install when one is missing (Debian names)


EMULATORS = {
    "aarch64": Emulator("qemu-aarch64", "/usr/aarch64-linux-gnu", "aarch64-linux-gnu-gcc",
                        "qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross"),
}


def missing_tools(arch: str) -> list[str]:
    """The tools `QemuModel` needs for `arch` that this machine lacks (all of them for an unknown arch)."""
    emu = EMULATORS.get(arch)
    if emu is None:
        return [f"an emulator for {arch}"]
    missing = [tool for tool in (emu.qemu, emu.cc) if shutil.which(tool) is None]
    return missing + ([emu.sysroot] if not Path(emu.sysroot, "lib").is_dir() else [])


def _nbytes(t: TensorInfo) -> int:
    return t.nbytes


class QemuModel:
    """A compiled artifact for another architecture, run under qemu-user. Same `run` as `kiln.load`'s Model.

    >>> m = QemuModel("model_a64.so")  # doctest: +SKIP
    >>> y = m.run(x); m.last_run_ms  # doctest: +SKIP
    """

    def __init__(self, path: str | Path, timeout_s: float = 600.0):
        self.path = Path(path).resolve()
        if not self.path.is_file():
            raise ArtifactError(f"artifact {str(path)!r} does not exist")
        data, sealed = read_artifact(self.path)  # the seal's checksum, as kiln.load checks it
        self.arch = check_elf(self.path, data=data)
        del data
        if self.arch == host_arch():
            raise ArtifactError(f"{path} is built for {self.arch}, this machine's own architecture: run it without "
                                f"qemu (kiln.load, or `kiln run` without --qemu)")
        lacking = missing_tools(self.arch)
        if lacking:
            emu = EMULATORS.get(self.arch)
            hint = f"; install them (Debian/Ubuntu: apt-get install {emu.packages})" if emu else ""
            raise ArtifactError(f"running a {self.arch} artifact under qemu needs {', '.join(lacking)}{hint}")
        self.emulator = EMULATORS[self.arch]
        self.timeout_s = timeout_s
        self.last_run_ms: float | None = None  # the entry's wall time under emulation: not a speed number
        self._tmp = tempfile.TemporaryDirectory(prefix="kiln-qemu-")
        self._dir = Path(self._tmp.name)
        self._harness = self._build_harness()
        self._emulate(["meta", str(self.path), str(self._dir / "meta.json")], what="reading the metadata")
        try:
            meta = json.loads((self._dir / "meta.json").read_bytes())
        except (ValueError, UnicodeDecodeError) as err:
            raise ArtifactError(f"{path}: metadata is corrupted ({err})") from None
        validate_metadata(meta, self.path)
        if meta.get("sealed") and not sealed:
            raise ArtifactError(f"{path} lost its seal (the checksum at its end): truncated or corrupted")
        if not meta.get("entry"):
            raise ArtifactError(f"{path} has no native entry function; qemu runs need one (rebuild the artifact)")
        self.meta = meta
        self.inputs = [TensorInfo(d) for d in meta["inputs"]]
        self.outputs = [TensorInfo(d) for d in meta["outputs"]]
        (self._dir / "plan.txt").write_text(self._plan())

    def _build_harness(self) -> Path:
        import tvm_ffi

        exe = self._dir / "harness"
        cmd = [self.emulator.cc, "-O2", "-std=gnu11", "-I", tvm_ffi.libinfo.find_include_path(), "-rdynamic",
               str(HARNESS_SOURCE), "-o", str(exe), "-ldl"]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if done.returncode != 0:
            raise ArtifactError(f"building the qemu harness with {self.emulator.cc} failed: {done.stderr[-1000:]}")
        return exe

    def _emulate(self, args: list[str], what: str) -> str:
        cmd = [self.emulator.qemu, "-L", self.emulator.sysroot, str(self._harness), *args]
        try:
            done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            raise ArtifactError(f"{self.path.name} under qemu: {what} took over {self.timeout_s:.0f} s") from None
        if done.returncode != 0:
            raise ArtifactError(f"{self.path.name} under qemu: {what} failed (exit {done.returncode}): "
                                f"{done.stderr.strip()[-1000:]}")
        return done.stdout

    def _plan(self) -> str:
        """The value layout for the harness (format in qemu_harness.c), from the metadata as model.py reads it."""
        meta = self.meta
        kinds = {"input": ("i", "index"), "output": ("o", "index"), "const": ("c", "offset"), "block": ("b", "block")}
        lines = ["kiln-qemu-plan 1", f"weights {meta.get('weights_nbytes', 0)} {meta.get('weights_crc32', 0)}",
                 " ".join(["blocks", str(len(meta["blocks"])), *map(str, meta["blocks"])]),
                 " ".join(["inputs", str(len(self.inputs)), *(str(_nbytes(t)) for t in self.inputs)]),
                 " ".join(["outputs", str(len(self.outputs)), *(str(_nbytes(t)) for t in self.outputs)]),
                 f"values {len(meta['values'])}"]
        for v in meta["values"]:
            if v["kind"] not in kinds:
                raise ArtifactError(f"{self.path}: unknown value kind {v['kind']!r}")
            letter, field = kinds[v["kind"]]
            dtype = tensor_dtype(v["dtype"])
            tail = [v.get("offset", 0)] if letter == "b" else []
            lines.append(" ".join(map(str, [letter, v[field], *dlpack_code(dtype), len(v["shape"]), *v["shape"],
                                             *tail])))
        return "\n".join(lines) + "\n"

    def run(self, *args: np.ndarray, **named: np.ndarray) -> list[np.ndarray]:
        """Run the model once under qemu; returns the outputs as fresh arrays."""
        for k, v in enumerate(check_inputs(self.inputs, args, named)):
            np.ascontiguousarray(v).tofile(self._dir / f"input{k}.bin")
        stdout = self._emulate(["run", str(self.path), self.meta["entry"], str(self._dir / "plan.txt"),
                                str(self._dir)], what="the run")
        self.last_run_ms = float(stdout.split()[-1]) if stdout.startswith("run_ms") else None
        return [np.fromfile(self._dir / f"output{k}.bin", dtype=t.dtype).reshape(t.shape)
                for k, t in enumerate(self.outputs)]

    __call__ = run

    def __repr__(self) -> str:
        return f"QemuModel({self.path.name} [{self.arch}]: {self.inputs} -> {self.outputs})"
