"""The aarch64 target: models cross-compile into AArch64 shared objects whose kernels use NEON, and running
them under qemu-user (runtime/qemu.py) gives ONNX Runtime's outputs. Needs gcc-aarch64-linux-gnu and
qemu-user (`.ci/run` installs them); skips with the reason otherwise. Full-size models: `pytest -m slow`."""

import shutil
import struct
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import kiln
from kiln import model_builders
from kiln.config import Options
from kiln.errors import ArtifactError, CodegenError
from kiln.model_builders import GraphBuilder
from kiln.runtime.qemu import QemuModel, missing_tools

from ..tolerances import assert_close

CROSS_GCC, OBJDUMP = "aarch64-linux-gnu-gcc", "aarch64-linux-gnu-objdump"
needs_cross_gcc = pytest.mark.skipif(shutil.which(CROSS_GCC) is None or shutil.which(OBJDUMP) is None,
                                     reason=f"{CROSS_GCC} / {OBJDUMP} not installed (apt-get install "
                                            f"gcc-aarch64-linux-gnu)")
needs_qemu = pytest.mark.skipif(bool(missing_tools("aarch64")),
                                reason=f"qemu-user for aarch64 unavailable: missing {missing_tools('aarch64')}")
EM_AARCH64 = 183  # ELF e_machine


def small_cnn() -> onnx.ModelProto:
    """Two conv+BN+ReLU layers (the second strided), global average pool, dense."""
    g = GraphBuilder("small_cnn", seed=1)
    x = g.conv_bn("input", 3, 8, 3)
    x = g.conv_bn(x, 8, 16, 3, stride=2)
    y = g.classifier(x, 16, classes=10)
    return g.model([helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
                   [(y, TensorProto.FLOAT, [1, 10])])


def conv_relu_pool() -> onnx.ModelProto:
    """Conv (with bias) → Relu → MaxPool → Conv → Relu → AveragePool, odd sizes so nothing divides evenly."""
    g = GraphBuilder("conv_relu_pool", seed=2)
    w1, b1 = g.weight((12, 3, 3, 3), 27, "w"), g.const(g.rng.standard_normal(12).astype(np.float32), "b")
    y = g.op("Relu", [g.op("Conv", ["x", w1, b1], kernel_shape=[3, 3], pads=[1, 1, 1, 1])])
    y = g.op("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2])
    w2 = g.weight((20, 12, 3, 3), 108, "w")
    y = g.op("Relu", [g.op("Conv", [y, w2], kernel_shape=[3, 3])])
    y = g.op("AveragePool", [y], kernel_shape=[3, 3], strides=[1, 1])
    return g.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 19, 19])],
                   [(y, TensorProto.FLOAT, [1, 20, 5, 5])])


def fire_modules() -> onnx.ModelProto:
    """SqueezeNet's fire modules: the concats are views, so the harness must place values at block offsets."""
    from .test_compile import fire_modules as build

    return build()


MODELS = {"small_cnn": small_cnn, "conv_relu_pool": conv_relu_pool, "fire_modules": fire_modules}


def ort_run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict:
    """Each model compiled for aarch64 once: name → (model, artifact path)."""
    if shutil.which(CROSS_GCC) is None:
        pytest.skip(f"{CROSS_GCC} not installed (apt-get install gcc-aarch64-linux-gnu)")
    out = tmp_path_factory.mktemp("a64")
    built = {}
    for name, builder in MODELS.items():
        model = builder()
        built[name] = (model, kiln.compile(model, out / f"{name}_a64.so", Options(target="aarch64")).path)
    return built


@needs_cross_gcc
@pytest.mark.parametrize("name", MODELS)
def test_artifact_is_an_aarch64_shared_object(artifacts, name):
    head = artifacts[name][1].read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and head[4] == 2, "not a 64-bit ELF file"
    (e_type, e_machine) = struct.unpack_from("<HH", head, 16)
    assert (e_type, e_machine) == (3, EM_AARCH64), f"ELF type {e_type}, machine {e_machine}"


@needs_cross_gcc
def test_artifact_records_its_libm_dependency(artifacts):
    """Kernels may call erff/expf; on the target nothing else guarantees libm is loaded (x86 Python has it)."""
    headers = subprocess.run([OBJDUMP, "-p", str(artifacts["small_cnn"][1])], capture_output=True, text=True,
                             check=True).stdout
    assert "NEEDED               libm.so.6" in headers


@needs_cross_gcc
def test_kernels_use_neon_fused_multiply_add(artifacts):
    asm = subprocess.run([OBJDUMP, "-d", str(artifacts["small_cnn"][1])], capture_output=True, text=True,
                         check=True).stdout
    vector_fmla = [line for line in asm.splitlines() if "\tfmla\t" in line and ".4s" in line]
    assert len(vector_fmla) >= 4, "no NEON fmla vN.4s in the conv and dense kernels"


@needs_cross_gcc
def test_native_load_refuses_aarch64_artifact_and_points_to_qemu(artifacts):
    with pytest.raises(ArtifactError, match=r"built for aarch64; this machine is x86_64.*--qemu"):
        kiln.load(artifacts["small_cnn"][1])


@needs_cross_gcc
@needs_qemu
@pytest.mark.parametrize("name", MODELS)
def test_qemu_run_matches_onnxruntime(artifacts, name):
    model, path = artifacts[name]
    m = QemuModel(path)
    assert m.arch == "aarch64" and m.meta["target"]["mtriple"] == "aarch64-linux-gnu"
    for seed in (0, 1):
        feeds = model_builders.random_feeds(model, seed=seed)
        got = m.run(**feeds)
        for g, w, t in zip(got, ort_run(model, feeds), m.outputs):
            assert_close(g, w, rtol=1e-3, atol=1e-4, what=f"{name} seed {seed} output {t.name}")


@needs_cross_gcc
@needs_qemu
def test_cli_run_qemu(artifacts, tmp_path):
    model, path = artifacts["conv_relu_pool"]
    feeds = model_builders.random_feeds(model, seed=5)
    np.save(tmp_path / "x.npy", feeds["x"])
    r = subprocess.run([sys.executable, "-m", "kiln.cli", "run", str(path), "--input", str(tmp_path / "x.npy"),
                        "--qemu", "-o", str(tmp_path / "y.npy")], check=False, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert_close(np.load(tmp_path / "y.npy"), ort_run(model, feeds)[0], rtol=1e-3, atol=1e-4)


def test_qemu_refuses_host_and_truncated_artifacts(artifacts, tmp_path):
    host = kiln.compile(conv_relu_pool(), tmp_path / "host.so").path
    with pytest.raises(ArtifactError, match="this machine's own architecture: run it without qemu"):
        QemuModel(host)
    cut = tmp_path / "cut_a64.so"
    cut.write_bytes(artifacts["small_cnn"][1].read_bytes()[:4096])
    with pytest.raises(ArtifactError, match="truncated"):
        QemuModel(cut)


def test_missing_cross_compiler_is_a_clear_error(tmp_path, monkeypatch):
    from kiln.codegen import target

    monkeypatch.setattr(target.shutil, "which", lambda name: None)
    with pytest.raises(CodegenError, match="aarch64-linux-gnu-gcc.*apt-get install gcc-aarch64-linux-gnu"):
        kiln.compile(conv_relu_pool(), tmp_path / "m.so", Options(target="aarch64"))
    assert not (tmp_path / "m.so").exists()


@needs_cross_gcc
@needs_qemu
@pytest.mark.parametrize("builder,kwargs", [
    (model_builders.mobilenet_v2, {"size": 32}),
    pytest.param(model_builders.resnet18, {"size": 32}, marks=pytest.mark.slow),
    (model_builders.bert_layer, {"seq": 16, "hidden": 64, "heads": 4, "ffn": 128}),
], ids=["mobilenet_v2", "resnet18", "bert_layer"])
def test_built_models_under_qemu_match_onnxruntime(builder, kwargs, tmp_path):
    model = builder(**kwargs)
    feeds = model_builders.random_feeds(model, seed=1)
    path = kiln.compile(model, tmp_path / "m_a64.so", Options(target="aarch64")).path
    got = QemuModel(path).run(**feeds)
    for g, w in zip(got, ort_run(model, feeds)):
        assert_close(g, w, rtol=1e-3, atol=1e-4, what=builder.__name__)


@pytest.mark.slow
@needs_cross_gcc
@needs_qemu
@pytest.mark.parametrize("name", ["zoo:mobilenet_v2", "zoo:bert_layer", "zoo:resnet50"])
def test_full_size_models_under_qemu_match_onnxruntime(name, tmp_path):
    """Full-size models (ResNet-50 runs about 40 s under qemu, single-threaded)."""
    from kiln.zoo import zoo_model

    model = zoo_model(name.removeprefix("zoo:"))
    feeds = model_builders.random_feeds(model, seed=0)
    path = kiln.compile(model, tmp_path / "m_a64.so", Options(target="aarch64")).path
    got = QemuModel(path).run(**feeds)
    for g, w in zip(got, ort_run(model, feeds)):
        assert_close(g, w, rtol=1e-3, atol=1e-4, what=name)


@needs_cross_gcc
@needs_qemu
def test_int8_on_sdot_under_qemu_follows_its_qdq_graph(tmp_path):
    """aarch64 with the dot-product extension: calibrated int8 convs and the dense run on sdot (int8 × int8,
    so activations are int8 with the zero point - 128), the artifact records `dotprod` for its load check, and
    under qemu it computes the QDQ graph the NumPy interpreter runs (int32 sums are exact: the same numbers)."""
    from kiln.calibrate import calibrate, quantized_reference
    from kiln.ir import run_module
    from tests.passes.test_quantize import residual_net

    model = residual_net()
    rng = np.random.default_rng(5)
    samples = [[rng.standard_normal((1, 3, 12, 12)).astype(np.float32)] for _ in range(3)]
    table = calibrate(model, samples).table  # on this host: ranges do not depend on the target
    options = Options(target="aarch64-dotprod", precision="int8", calibration=table)
    report = kiln.compile(model, tmp_path / "q_a64.so", options)
    assert sum("sdot4" in s for s in report.schedules) == 5, report.schedules  # 4 convs (stem padded), 1 dense
    m = QemuModel(report.path)
    assert m.meta["cpu_features"] == ["dotprod"]
    want = run_module(quantized_reference(model, table, options), *samples[0])[0]
    np.testing.assert_allclose(m.run(*samples[0])[0], want, rtol=1e-5, atol=1e-5)
    objdump = subprocess.run([OBJDUMP, "-d", str(report.path)], capture_output=True, text=True).stdout
    assert "sdot" in objdump
