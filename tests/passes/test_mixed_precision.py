"""--precision: passes/mixed_precision.py on hand-built graphs (against the NumPy interpreter), kernel counts
of the fp16/bf16 pipelines, float32 builds unchanged, and compiled fp16/bf16 zoo models against their fp32
build (cosine >= 0.999 per output, issue 15). The zoo builds are slow: `pytest -m slow -k mixed_precision`."""

from __future__ import annotations

import numpy as np
import pytest
from kiln.frontend import from_onnx
from kiln.ir import Call, Constant, Function, IRModule, call, const, var
from kiln.ir.interpreter import run_module
from kiln.ir.ops.elementwise import ADD, CAST, OPS, WHERE
from kiln.ir.ops.softmax import SOFTMAX
from kiln.ir.visitor import post_order
from kiln.passes import O2, run, to_precision
from kiln.passes.fuse_ops import group_ops
from kiln.passes.mixed_precision import convert_precision

import kiln
from kiln import zoo
from kiln.config import Options
from kiln.errors import KilnError

from .graphs import resnet_basic_block

from tests.host import runs

HALF = ["float16", "bfloat16"]
PRECISION_OF = {"float16": "fp16", "bfloat16": "bf16"}
PRESET = "x86-avx512"


def _calls(mod: IRModule, op) -> list[Call]:
    return [e for e in post_order(mod.main.body) if isinstance(e, Call) and e.op is op]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("half", HALF)
def test_basic_block_converts_weights_and_keeps_float32_edges(half):
    mod = run(resnet_basic_block(channels=8, size=6), O2[:3])  # batch norm folded into the conv weights
    after = to_precision(half)(mod)
    assert [p.type.dtype for p in after.main.params] == ["float32"]
    assert after.main.body.type.dtype == "float32"
    weights = [e for e in post_order(after.main.body) if isinstance(e, Constant)]
    assert weights and {w.type.dtype for w in weights} == {half}
    casts = _calls(after, CAST)  # one at entry (x, shared by the conv and the residual add), one at exit
    assert sorted(c.type.dtype for c in casts) == sorted([half, "float32"])
    x = np.random.default_rng(0).standard_normal((1, 8, 6, 6)).astype(np.float32)
    want, got = run_module(mod, x)[0], run_module(after, x)[0]
    assert got.dtype == np.float32
    assert _cosine(got, want) >= 0.999
    np.testing.assert_allclose(got, want, rtol=0, atol=0.05 * np.abs(want).max())
    assert mod.main.body.type.dtype == "float32" and _calls(mod, CAST) == []  # the pass made a new module


def test_exp_stays_float32_and_softmax_goes_half():
    x = var("x", "f32[4, 16]")
    body = call(ADD, call(SOFTMAX, x, axis=1), call(OPS["exp"], x))
    after = to_precision("float16")(IRModule({"main": Function((x,), body)}))
    assert _calls(after, OPS["exp"])[0].type.dtype == "float32"  # exp(12) = 162755 > float16's 65504
    assert _calls(after, SOFTMAX)[0].type.dtype == "float16"
    assert _calls(after, ADD)[0].type.dtype == "float32"  # follows its float32 (computed) input
    xs = np.linspace(-12, 12, 64, dtype=np.float32).reshape(4, 16)
    got = run_module(after, xs)[0]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, run_module(IRModule({"main": Function((x,), body)}), xs)[0], rtol=1e-2)  # x rounded: 12 ± 2^-8


def test_mask_constant_beyond_float16_range_is_clipped_not_infinite():
    x, keep = var("x", "f32[2, 8]"), var("keep", "bool[2, 8]")
    scores = call(SOFTMAX, x, axis=1)  # half: the mask's where follows it
    body = call(SOFTMAX, call(WHERE, keep, scores, const(np.float32(-1e9))), axis=1)
    after = to_precision("float16")(IRModule({"main": Function((keep, x), body)}))
    (mask,) = [e for e in post_order(after.main.body) if isinstance(e, Constant)]
    assert mask.type.dtype == "float16" and float(mask.value) == -65504.0
    k = np.arange(16).reshape(2, 8) % 3 != 0
    got = run_module(after, k, np.ones((2, 8), np.float32))[0]
    np.testing.assert_allclose(got.sum(axis=-1), 1.0, rtol=1e-3)
    assert (got[~k] == 0).all()


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_fp32_and_tf32_leave_the_graph_alone(precision):
    mod = resnet_basic_block().with_attrs(precision=precision)
    assert convert_precision(mod) is mod


def test_unknown_precision_is_refused():
    with pytest.raises(KilnError, match="precision must be fp32, tf32, fp16, bf16 or int8"):
        Options(precision="fp8")


@pytest.mark.parametrize("name, extra", [("resnet18", 1), ("bert_layer", 1), ("mobilenet_v2", 1)])
@pytest.mark.parametrize("half", HALF)
def test_half_pipeline_adds_at_most_the_entry_cast_kernel(name, extra, half):
    """Casts fuse into the kernels beside them: only the model input's cast is a kernel of its own (a cast
    feeding a conv or dense cannot join it); the exit cast joins the last kernel."""
    mod = from_onnx(zoo.zoo_model(name)).with_attrs(layout_block=16, fuse_depthwise=True)
    fp32 = group_ops(run(mod, O2))
    low = group_ops(run(mod.with_attrs(precision=PRECISION_OF[half]), O2))
    assert len(low) <= len(fp32) + extra, (len(fp32), len(low), low)
    assert sum(g == ["cast"] for g in low) <= extra


def _kernel_sources(model, options: Options) -> list[str]:
    from kiln.codegen.lower import lower_group
    from kiln.codegen.target import resolve_target

    from kiln.driver import optimize, prepare

    target = resolve_target(options.target)
    fused, _ = optimize(prepare(from_onnx(model), target, options), target, options, {})
    return [str(lower_group(e.op, f"k{i}", target, {}).prim_func) for i, e in enumerate(
        x for x in post_order(fused.main.body) if isinstance(x, Call) and isinstance(x.op, Function))]


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_float32_kernels_identical_to_the_default_build(precision):
    model = zoo.zoo_model("resnet18")
    default = _kernel_sources(model, Options(target=PRESET))
    assert _kernel_sources(model, Options(target=PRESET, precision=precision)) == default
    assert "float16" not in "".join(default) and len(default) == 24


def _compiled_outputs(model, feeds, target: str, precision: str, tmp_path):
    report = kiln.compile(model, tmp_path / f"m_{precision}.so", Options(target=target, precision=precision))
    m = kiln.load(report.path)
    return report, m, m.run(**feeds)


def _check_against_fp32(name: str, target: str, tmp_path) -> None:
    model = zoo.zoo_model(name)
    feeds = zoo.feeds(model)
    _, _, want = _compiled_outputs(model, feeds, target, "fp32", tmp_path)
    for precision in ("fp16", "bf16"):
        _, m, got = _compiled_outputs(model, feeds, target, precision, tmp_path)
        assert m.meta["precision"] == precision
        assert {t["dtype"] for t in m.meta["inputs"] if t["name"] in feeds} == {
            str(v.dtype) for v in feeds.values()}  # float32 images and hidden states, int64 masks: as given
        assert {t["dtype"] for t in m.meta["outputs"]} == {"float32"}
        for i, (g, w) in enumerate(zip(got, want)):
            cos = _cosine(g, w)
            rel = float(np.abs(g.astype(np.float64) - w).max() / np.abs(w).max())
            print(f"{name} {target} {precision} output {i}: cosine {cos:.6f}, max error / max |fp32| {rel:.2e}")
            assert g.dtype == np.float32 and cos >= 0.999, (name, target, precision, i, cos)


@pytest.mark.slow
@pytest.mark.parametrize("target", [PRESET, "native"])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "squeezenet", "bert_layer"])
def test_half_builds_agree_with_fp32(name, target, tmp_path):
    _check_against_fp32(name, target, tmp_path)


@pytest.mark.slow
def test_squeezenet_half_builds_agree_with_fp32(tmp_path):
    """One compiled model at the preset (the CLI test runs an fp16 build end to end in the default run)."""
    _check_against_fp32("squeezenet", PRESET, tmp_path)


@runs(PRESET)
def test_cli_compile_precision_fp16_runs_on_float32_inputs(tmp_path):
    import subprocess
    import sys

    import onnx
    from onnx import helper

    from kiln.model_builders import GraphBuilder

    g = GraphBuilder("conv_relu", seed=0)
    w = g.const(g.rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "w")
    y = g.op("Relu", [g.op("Conv", ["x", w], kernel_shape=[3, 3], pads=[1, 1, 1, 1])])
    onnx.save(g.model([helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 16, 16])],
                      [(y, onnx.TensorProto.FLOAT, [1, 16, 16, 16])]), tmp_path / "m.onnx")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True, timeout=300,
                              check=False)

    so = tmp_path / "m.so"
    r = cli("compile", str(tmp_path / "m.onnx"), "-o", str(so), "--target", PRESET, "--precision", "fp16")
    assert r.returncode == 0, r.stderr
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    r = cli("run", str(so), "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy"))
    assert r.returncode == 0, r.stderr
    got = np.load(tmp_path / "y.npy")
    want = run_module(from_onnx(str(tmp_path / "m.onnx")), x)[0]
    assert got.dtype == np.float32 and _cosine(got, want) >= 0.999
    assert kiln.load(so).meta["precision"] == "fp16"
    bad = cli("compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "b.so"), "--precision", "fp8")
    assert bad.returncode == 1 and "precision must be" in bad.stderr and "Traceback" not in bad.stderr
