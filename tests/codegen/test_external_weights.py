"""`--weights external`: the weights in `model.weights` beside `model.so`, checked by size and CRC-32 from the
metadata; and `python -m kiln.rebuild_weights` making that file again, byte for byte, without TVM for CUDA."""

import subprocess
import sys
import zlib

import numpy as np
import pytest

import kiln
from kiln import model_builders, zoo
from kiln.codegen.weights import kernel_calls, layout
from kiln.config import Options
from kiln.errors import ArtifactError
from kiln.frontend import from_onnx
from kiln.ir import Constant
from kiln.passes import O2, run
from kiln.rebuild_weights import main, rebuild
from kiln.runtime.artifact import ALIGN, elf_symbols, read_artifact, read_meta, read_weights_file, validate_metadata

CPU = "x86-avx2"


def compiled(tmp_path_factory, name: str, model, target: str):
    path = tmp_path_factory.mktemp(name) / "m.so"
    kiln.compile(model, path, Options(target=target), weights="external")
    return model, path


@pytest.fixture(scope="module")
def squeezenet_cpu(tmp_path_factory):
    return compiled(tmp_path_factory, "squeezenet", zoo.zoo_model("squeezenet"), CPU)


@pytest.fixture(scope="module")
def resnet18_cpu(tmp_path_factory):
    return compiled(tmp_path_factory, "resnet18", model_builders.resnet18(size=32), CPU)


@pytest.fixture(scope="module")
def cnn_cpu(tmp_path_factory):
    """Kilobytes of weights: enough for the file's format, quick to compile."""
    return compiled(tmp_path_factory, "small_cnn", model_builders.small_cnn(0), CPU)


@pytest.fixture(scope="module")
def squeezenet_sm90(tmp_path_factory):
    return compiled(tmp_path_factory, "squeezenet_sm90", zoo.zoo_model("squeezenet"), "cuda-sm90")


@pytest.mark.parametrize("which", ["squeezenet_cpu", pytest.param("resnet18_cpu", marks=pytest.mark.slow)])
def test_rebuilt_weights_equal_the_compiled_ones(which, request):
    model, path = request.getfixturevalue(which)
    written = path.with_suffix(".weights").read_bytes()
    assert len(written) > 1 << 20
    assert rebuild(model, Options(target=CPU)).blob == written


def test_meta_records_the_file_and_the_library_embeds_no_weights(cnn_cpu):
    _, path = cnn_cpu
    written = path.with_suffix(".weights").read_bytes()
    meta = read_meta(path)
    assert (meta["format"], meta["weights_file"]) == (3, "m.weights")
    assert (meta["weights_nbytes"], meta["weights_crc32"]) == (len(written), zlib.crc32(written))
    data, sealed = read_artifact(path)
    assert sealed  # the seal covers the library; the file beside has its own size and CRC-32 in the metadata
    symbols = elf_symbols(data)
    assert symbols["kiln_weights_s"][0] == symbols["kiln_weights_e"][0]
    assert "__tvm_ffi_kiln_weights_view" not in symbols  # a loader that ignores the file fails on the size


def test_loads_and_runs_with_the_file(cnn_cpu, tmp_path):
    model, path = cnn_cpu
    embedded = tmp_path / "embedded.so"
    kiln.compile(model, embedded, Options(target=CPU))
    feeds = model_builders.random_feeds(model, seed=2)
    np.testing.assert_array_equal(kiln.load(path).run(**feeds)[0], kiln.load(embedded).run(**feeds)[0])


def test_missing_or_foreign_weights_file_is_refused(cnn_cpu, tmp_path):
    _, path = cnn_cpu
    meta = read_meta(path)
    copy = tmp_path / "m.so"
    copy.write_bytes(path.read_bytes())
    with pytest.raises(ArtifactError, match=r"m\.weights beside it, which does not exist.*rebuild_weights"):
        read_weights_file(copy, meta)
    good = path.with_suffix(".weights").read_bytes()
    for bad in (good[:-64], good[:100] + bytes([good[100] ^ 1]) + good[101:]):
        (tmp_path / "m.weights").write_bytes(bad)
        with pytest.raises(ArtifactError, match=r"m\.weights does not belong to m\.so"):
            read_weights_file(copy, meta)
    (tmp_path / "m.weights").write_bytes(good)
    assert read_weights_file(copy, meta) == good


def test_weights_file_must_be_a_name_beside(cnn_cpu, tmp_path):
    meta = read_meta(cnn_cpu[1])
    for bad in ("../m.weights", "", 7):
        with pytest.raises(ArtifactError, match="weights_file"):
            validate_metadata({**meta, "weights_file": bad}, tmp_path / "m.so")
    with pytest.raises(ArtifactError, match="weights_file"):
        validate_metadata({**meta, "format": 2}, tmp_path / "m.so")  # a format-2 reader would ignore the file


def test_layout_puts_each_constant_once_aligned():
    mod = run(from_onnx(model_builders.resnet18(size=32)).with_attrs(layout_block=0), O2)
    weights = layout(mod)
    consts = {id(a): a for c in kernel_calls(mod) for a in c.args if isinstance(a, Constant)}
    assert sorted(weights.offsets) == sorted(consts)
    for key, at in weights.offsets.items():
        value = np.ascontiguousarray(consts[key].value)
        assert at % ALIGN == 0
        assert weights.blob[at:at + value.nbytes] == value.tobytes()


def test_rebuild_for_sm90_without_tvm(squeezenet_sm90, tmp_path):
    _, path = squeezenet_sm90
    out = tmp_path / "rebuilt.weights"
    script = ("import sys; sys.modules['tvm'] = None; sys.modules['tvm_ffi'] = None\n"
              "from kiln.rebuild_weights import main\n"
              f"code = main(['zoo:squeezenet', '--target', 'cuda-sm90', '--artifact', {str(path)!r}, "
              f"'-o', {str(out)!r}])\n"
              "assert not [m for m in sys.modules if m.startswith(('tvm.', 'tvm_ffi.'))]\n"
              "sys.exit(code)\n")
    proc = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == path.with_suffix(".weights").read_bytes()


def test_rebuild_with_other_options_is_refused(squeezenet_sm90, tmp_path, capsys):
    _, path = squeezenet_sm90
    out = tmp_path / "x.weights"
    assert main(["zoo:squeezenet", "--target", "cuda-sm90", "--precision", "fp16", "--artifact", str(path),
                 "-o", str(out)]) == 1
    assert "are not m.so's" in capsys.readouterr().err
    assert not out.exists()


def test_rebuild_without_tvm_refuses_a_cpu_target(tmp_path):
    script = ("import sys; sys.modules['tvm'] = None\n"
              "from kiln.rebuild_weights import main\n"
              f"sys.exit(main(['zoo:squeezenet', '--target', '{CPU}', '-o', {str(tmp_path / 'w')!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "CUDA targets only" in proc.stderr, proc.stderr


def test_cli_writes_the_weights_file(tmp_path):
    from typer.testing import CliRunner

    from kiln.cli import app

    model = tmp_path / "m.onnx"
    model.write_bytes(model_builders.small_cnn(0).SerializeToString())
    result = CliRunner().invoke(app, ["compile", str(model), "--target", CPU, "-o", str(tmp_path / "m.so"),
                                      "--weights", "external"])
    assert result.exit_code == 0, result.output
    meta = read_meta(tmp_path / "m.so")
    assert (tmp_path / "m.weights").stat().st_size == meta["weights_nbytes"] > 0
