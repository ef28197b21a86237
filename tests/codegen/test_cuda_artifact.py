"""A CUDA artifact carries its kernels compiled: the CUDA module in the library's packed imports is a fatbin
with the preset arch's SASS and PTX, not CUDA source, so a GPU machine loads it with no compiler. Read here from
the file itself, in TVM's packed-imports layout (src/target/codegen.cc) and nvcc's fatbin layout; no GPU."""

import re
import shutil
import struct
import subprocess

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

import kiln
from kiln.codegen.cuda import compile_fatbin
from kiln.codegen.target import resolve_target
from kiln.config import Options
from kiln.errors import CodegenError
from kiln.runtime.artifact import elf_symbols, read_artifact

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit) to build")

EM_CUDA = 190
FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)


def mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((64, 96), np.float32), rng.standard_normal((96, 10), np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["m"]),
             helper.make_node("Softmax", ["m"], ["y"], axis=1)]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 10])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _u64(data: bytes, at: int) -> tuple[int, int]:
    return struct.unpack_from("<Q", data, at)[0], at + 8


def _string(data: bytes, at: int) -> tuple[bytes, int]:
    n, at = _u64(data, at)
    return data[at:at + n], at + n


def packed_modules(so: bytes) -> dict[str, bytes | None]:
    """kind → saved bytes of each module in the library's `__tvm_ffi__library_bin` (TVM's export layout)."""
    at, _size = elf_symbols(so)["__tvm_ffi__library_bin"]
    nbytes, at = _u64(so, at)
    blob = so[at:at + nbytes]
    rows, at = _u64(blob, 0)
    at += 8 * rows
    children, at = _u64(blob, at)
    at += 8 * children
    out = {}
    for _ in range(rows - 1):
        kind, at = _string(blob, at)
        payload = None
        if kind != b"_lib":
            payload, at = _string(blob, at)
        out[kind.decode()] = payload
    assert at == len(blob)
    return out


def cuda_module(payload: bytes) -> tuple[bytes, bytes]:
    """(format, code) of a CUDA module's saved bytes: format first, code last, each after its u64 size."""
    fmt, _ = _string(payload, 0)
    code = payload[payload.index(FATBIN_MAGIC):] if FATBIN_MAGIC in payload else b""
    assert _u64(payload, len(payload) - len(code) - 8)[0] == len(code)
    return fmt, code


def fatbin_entries(fatbin: bytes) -> list[tuple[int, int, bytes]]:
    """(kind: 1 PTX, 2 ELF; sm arch; payload) of each entry (nvcc's fatbin layout, as cuobjdump reads it)."""
    magic, _version, header, size = struct.unpack_from("<IHHQ", fatbin, 0)
    assert magic == 0xBA55ED50
    out, at = [], header
    while at < header + size:
        kind, _v, entry_header, payload = struct.unpack_from("<HHIQ", fatbin, at)
        (arch,) = struct.unpack_from("<I", fatbin, at + 28)
        out.append((kind, arch, fatbin[at + entry_header:at + entry_header + payload]))
        at += entry_header + payload
    assert at == header + size == len(fatbin)
    return out


@pytest.fixture(scope="module", params=["cuda-sm80", "cuda-sm90"])
def artifact(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "m.so"
    report = kiln.compile(mlp(), path, Options(target=request.param))
    return request.param, report, bytes(read_artifact(path)[0])


def test_device_module_is_a_fatbin_not_source(artifact):
    _, _, so = artifact
    modules = packed_modules(so)
    assert sorted(modules) == ["_lib", "cuda"]
    fmt, code = cuda_module(modules["cuda"])
    assert fmt == b"fatbin" and code  # TVM's loader compiles "cuda" only; others go to the driver as they are
    assert b'extern "C" __global__' not in so  # no CUDA C source anywhere in the library


def test_fatbin_holds_sass_and_ptx_for_the_preset_arch(artifact, tmp_path):
    preset, report, so = artifact
    sm = int(preset.removeprefix("cuda-sm"))
    entries = fatbin_entries(cuda_module(packed_modules(so)["cuda"])[1])
    assert sorted((kind, arch) for kind, arch, _ in entries) == [(1, sm), (2, sm)]
    (elf,) = [p for kind, _, p in entries if kind == 2]
    assert elf[:4] == b"\x7fELF" and struct.unpack_from("<H", elf, 18)[0] == EM_CUDA
    abi, (flags,) = elf[8], struct.unpack_from("<I", elf, 48)
    assert (flags >> 8 if abi >= 8 else flags) & 0xFF == sm  # EF_CUDA_SM: in bits 8-15 since ELF ABI 8
    (ptx,) = [p.rstrip(b"\0").decode() for kind, _, p in entries if kind == 1]
    assert re.search(rf"^\.target sm_{sm}\b", ptx, re.MULTILINE)
    kernels = set(re.findall(r"^\.visible \.entry (\w+)\(", ptx, re.MULTILINE))
    assert kernels == {f"{s['kernel']}_kernel" for s in report.steps} and len(kernels) == report.kernels
    (tmp_path / "k.ptx").write_text(ptx)  # and ptxas, not our reader, takes it as a whole module for the arch
    subprocess.run(["nvcc", "-cubin", f"-arch=sm_{sm}", str(tmp_path / "k.ptx"), "-o",
                    str(tmp_path / "k.cubin")], check=True)


def test_ptx_beside_is_the_fatbins_ptx(artifact):
    _, report, so = artifact
    beside = report.path.with_suffix(".ptx").read_text()
    entries = fatbin_entries(cuda_module(packed_modules(so)["cuda"])[1])
    (ptx,) = [p.rstrip(b"\0").decode() for kind, _, p in entries if kind == 1]

    def code(text: str) -> list[str]:  # nvcc drops comments and respaces the PTX it embeds
        lines = (line.strip() for line in text.splitlines())
        return [" ".join(s.split()) for s in lines if s and not s.startswith("//")]

    assert code(ptx) == code(beside)


def test_sm90_preset():
    target = resolve_target("cuda-sm90")
    assert target.kind.name == "cuda" and str(target.attrs["arch"]) == "sm_90"
    assert int(target.attrs["max_num_threads"]) == 1024 and int(target.attrs["thread_warp_size"]) == 32


def test_no_nvcc_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(CodegenError, match="needs nvcc on PATH"):
        compile_fatbin(".version 8.0\n.target sm_90\n.address_size 64\n", resolve_target("cuda-sm90"))


def test_bad_ptx_fails_the_build():
    with pytest.raises(CodegenError, match="could not assemble the PTX for sm_90"):
        compile_fatbin(".version 8.0\n.target sm_90\n.address_size 64\nnot ptx at all\n",
                       resolve_target("cuda-sm90"))


@pytest.mark.slow
def test_cli_compiles_squeezenet_for_sm90(tmp_path):
    from kiln.cli import app

    result = CliRunner().invoke(app, ["compile", "zoo:squeezenet", "--target", "cuda-sm90", "-o",
                                      str(tmp_path / "x.so")])
    assert result.exit_code == 0, result.output
    so = bytes(read_artifact(tmp_path / "x.so")[0])
    entries = fatbin_entries(cuda_module(packed_modules(so)["cuda"])[1])
    assert sorted((kind, arch) for kind, arch, _ in entries) == [(1, 90), (2, 90)]
