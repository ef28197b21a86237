"""bench/nodes.py sets Kiln's kernels beside ONNX Runtime's profiled nodes: its matching and per-round
arithmetic on a made-up profile, where the right answer is known."""

from __future__ import annotations

import numpy as np
import pytest
from tests.bench_scripts import load_bench


@pytest.fixture(scope="module")
def nodes():
    return load_bench("nodes")


VALUES = [
    {"kind": "input", "shape": [1, 3, 8, 8]},
    {"kind": "const", "shape": [1, 1, 3, 3, 3, 16]},  # a direct conv's blocked 3x3 weights
    {"kind": "block", "shape": [1, 1, 8, 8, 16]},
    {"kind": "const", "shape": [6, 6, 1, 16, 16]},  # Winograd's transformed weights
    {"kind": "block", "shape": [1, 1, 8, 8, 16]},
    {"kind": "block", "shape": [1, 1, 4, 4, 16]},
]
STEPS = [
    {"kernel": "k0", "ops": ["nn.conv2d_nchwc", "add", "nn.relu"], "args": [0, 1, 2],
     "config": {"algorithm": "direct"}},
    {"kernel": "k1", "ops": ["nn.conv2d_winograd_nchwc"], "args": [2, 3, 4], "config": {"algorithm": "winograd4"}},
    {"kernel": "k2", "ops": ["nn.pool2d_nchwc"], "args": [4, 5]},
]


def _event(cat, name, ts, dur, **args):
    return {"cat": cat, "name": name, "ts": ts, "dur": dur, "args": args}


def _conv(name, ts, dur, window):
    return _event("Node", f"{name}_kernel_time", ts, dur, op_name="Conv",
                  input_type_shape=[{"float": [1, 16, 8, 8]}, {"float": [16, 16, *window]}],
                  output_type_shape=[{"float": [1, 16, 8, 8]}])


def _profile(runs: int, conv3_us: float) -> list[dict]:
    """`runs` runs of: a 1x1 conv ORT runs first (Kiln has none), the 3x3 conv, a concat, the pool."""
    events = []
    for r in range(runs):
        t = 1000 * r
        events.append(_event("Session", "model_run", t, 900))
        events.append(_conv("r9_nchwc", t + 1, 50, [1, 1]))
        events.append(_conv("r1_nchwc", t + 100, conv3_us, [3, 3]))
        events.append(_conv("r2_nchwc", t + 300, 40, [3, 3]))
        events.append(_event("Node", "n7_kernel_time", t + 400, 20, op_name="Concat",
                             output_type_shape=[{"float": [1, 32, 8, 8]}]))
        events.append(_event("Node", "r3_nchwc_kernel_time", t + 500, 10, op_name="MaxPool",
                             output_type_shape=[{"float": [1, 16, 4, 4]}]))
    return events


def test_kernels_match_nodes_by_kind_size_and_window(nodes):
    runs = nodes.ort_runs(_profile(3, 100), skip=1)
    assert len(runs) == 2 and list(runs[0]) == ["r9_nchwc", "r1_nchwc", "r2_nchwc", "n7", "r3_nchwc"]
    keys = [nodes.kiln_key(s, VALUES) for s in STEPS]
    assert keys == [("conv", 1024, 9), ("conv", 1024, 9), ("pool", 256, 0)]
    owner = nodes.match(keys, [(n, v[2]) for n, v in runs[0].items()])
    # the 1x1 conv has the size but not the window, so the first 3x3 conv goes to k0, the next to k1
    assert owner == {"r1_nchwc": 0, "r2_nchwc": 1, "r3_nchwc": 2}


def test_ratios_are_per_round_and_the_profilers_cost_is_scaled_out(nodes):
    """Round 2 runs everything twice as slow, in both engines: the ratio does not move. ORT's profiled nodes
    sum to 0.22 ms while its unprofiled runs took 0.11 ms, so each node counts half."""
    ort_all = nodes.ort_runs(_profile(4, 100), skip=0)  # 2 rounds of 2 runs
    ort_all[2:] = [{n: (op, ms * 2, key) for n, (op, ms, key) in row.items()} for row in ort_all[2:]]
    kiln_rounds = [np.array([[0.06, 0.03, 0.005]] * 2), np.array([[0.12, 0.06, 0.01]] * 2)]
    t = nodes.compare(STEPS, VALUES, kiln_rounds, ort_all, plain_ms=[0.11, 0.22])
    rows = {r["kernel"]: r for r in t["rows"]}
    assert rows["k0"]["ratio"] == pytest.approx(0.06 / 0.05)
    assert rows["k1"]["ratio"] == pytest.approx(0.03 / 0.02)
    assert rows["k2"]["ratio"] == pytest.approx(0.005 / 0.005)
    assert rows["k0"]["ort_ops"] == "Conv" and t["nodes"] == 5
    assert t["unmatched"] == pytest.approx({"Conv": 0.025 * 1.5, "Concat": 0.01 * 1.5})
    np.testing.assert_allclose(t["ort_total"], [0.11, 0.22])


def test_sizes_match_up_to_channel_padding(nodes):
    """1000 classes stored as 1008 (AVX-512 blocks) or 1024 (whole AVX2 tiles) still meet ORT's node; a
    genuinely different size does not."""
    assert nodes._same_size(1000 * 169, 1008 * 169) and nodes._same_size(1000 * 169, 1024 * 169)
    assert not nodes._same_size(1000, 1100) and not nodes._same_size(0, 0 + 1)
