"""The whole ONNX node-test suite through frontend + interpreter: it takes seconds, so it runs by default."""

import numpy as np
import pytest

from kiln import conformance


@pytest.fixture(scope="module")
def report():
    return conformance.run()


def test_registry_covers_at_least_120_onnx_ops(report):
    assert report.summary()["ops_covered"] >= 120


def test_at_least_95_percent_of_supported_cases_pass(report):
    s = report.summary()
    failing = [f"{r.name}: {r.detail}" for r in report.results if r.status == conformance.FAIL]
    assert s["pass_rate_of_supported"] >= 0.95, "\n".join(failing[:30])


@pytest.mark.parametrize("op", ["Conv", "Gemm", "Reshape", "Softmax", "BatchNormalization", "Slice", "Gather"])
def test_core_ops_fail_no_case(report, op):
    """Every case of the core ops passes, or is refused with a reason (BatchNormalization's training mode)."""
    rows = [r for r in report.results if r.op == op]
    assert sum(r.status == conformance.PASS for r in rows) >= 2, f"too few passing cases for {op}"
    bad = [f"{r.name}: {r.detail}" for r in rows if r.status == conformance.FAIL]
    assert not bad, "\n".join(bad)


def test_compare_catches_wrong_numbers_and_shapes():
    a = np.ones((2, 2), np.float32)
    assert conformance.compare([a], [a], 1e-3, 1e-7) is None
    assert "max abs diff" in conformance.compare([a + 1], [a], 1e-3, 1e-7)
    assert "shape" in conformance.compare([a], [a.reshape(4)], 1e-3, 1e-7)
    assert "2 outputs" in conformance.compare([a], [a, a], 1e-3, 1e-7) or "outputs" in conformance.compare(
        [a], [a, a], 1e-3, 1e-7)


def test_markdown_table_lists_every_op(report):
    text = conformance.to_markdown(report)
    for op in ("Conv", "Attention"):
        assert f"| {op} |" in text


# ONNX's model tests (onnx/backend/test/data): a handful here, interpreted and compiled; the whole set is slow.
SMALL_MODELS = {"test_operator_add_broadcast", "test_Softmax", "test_AvgPool2d", "test_Embedding", "test_sign_model"}


@pytest.fixture(scope="module")
def small_models():
    from kiln.onnx_backend import compiled, interpret

    return conformance.run_models({"interpreted": interpret, "compiled": compiled}, names=SMALL_MODELS,
                                  with_ort=False)


def test_model_tests_are_found_with_their_data_sets():
    cases = conformance.collect_model_cases()
    kinds = {c.kind for c in cases}
    assert kinds == set(conformance.MODEL_KINDS) and len(cases) >= 135
    assert all(c.data_sets and c.data_sets[0][1] for c in cases)


def test_small_model_cases_pass_interpreted_and_compiled(small_models):
    for name, rep in small_models.columns.items():
        assert sorted(r.name for r in rep.results) == sorted(SMALL_MODELS)
        bad = [f"{name} {r.name}: {r.status} {r.detail}" for r in rep.results if r.status != conformance.PASS]
        assert not bad, "\n".join(bad)


def test_a_model_with_an_op_kiln_lacks_is_unsupported_not_failed():
    report = conformance.run_models(names={"test_gradient_of_add"}, with_ort=False)
    (r,) = report.columns["interpreted"].results
    assert r.status == conformance.UNSUPPORTED and "Gradient" in r.detail


def test_models_markdown_has_a_row_per_case_and_skips_ort_when_missing(small_models, monkeypatch):
    text = conformance.models_to_markdown(small_models)
    assert "ONNX Runtime: not installed" in text
    for name in SMALL_MODELS:
        assert f"| {name} |" in text
    assert "| interpreted | compiled | first problem |" in text
    monkeypatch.setattr(conformance, "ort_available", lambda: False)
    assert conformance.run_models(names={"test_sign_model"}).ort is None


def _half_mul_model():
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Mul", ["x", "y"], ["z"])
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT16, [64]) for n in "xyz"]
    return helper.make_model(helper.make_graph([node], "m", vi[:2], vi[2:]),
                             opset_imports=[helper.make_opsetid("", 17)])


def test_half_precision_result_nearer_the_true_value_passes_and_a_farther_one_fails():
    """ONNX's half-precision data rounds every intermediate; a result a step off that data but nearer the graph
    evaluated in float32 is a pass, one a step off on the far side is not."""
    m = _half_mul_model()
    rng = np.random.default_rng(0)
    x, y = (rng.uniform(0.5, 1.0, 64).astype(np.float16) for _ in range(2))
    exact = x.astype(np.float32) * y.astype(np.float32)
    best = exact.astype(np.float16)
    away = np.nextafter(best, np.where(best.astype(np.float32) > exact, np.inf, -np.inf).astype(np.float16))
    toward = best  # nearer exact than `away` everywhere
    assert conformance._nearer_than_expected(m, [x, y], [toward], [away])
    assert not conformance._nearer_than_expected(m, [x, y], [away], [toward])
    far = (best.astype(np.float32) * 1.01).astype(np.float16)  # beyond two steps of the data: never a pass
    assert not conformance._nearer_than_expected(m, [x, y], [far], [best])
    assert not conformance._nearer_than_expected(m, [x.astype(np.float32), y.astype(np.float32)],
                                                 [exact * 1.001], [exact])  # float32 data: no second chance


def test_compiled_fp16_attention_case_passes_against_float32():
    """test_attention_4d_causal_fp16: Kiln's compiled output is 1-2 fp16 steps off the expected data and nearer
    the float32 evaluation than that data."""
    from onnx.backend.test.case.node import collect_testcases

    from kiln.onnx_backend import compiled

    case = next(c for c in collect_testcases(None) if c.name == "test_attention_4d_causal_fp16")
    r = conformance.run_case(case, "Attention", compiled)
    assert r.status == conformance.PASS, r.detail
