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
