"""Local measurement of conv algorithms: each candidate builds through the model's own path and times > 0."""

from kiln.autotune.measure import conv_kernel, conv_module, measure_candidates, time_conv
from kiln.codegen.target import resolve_target
from kiln.ir import Call, Function
from kiln.ir.visitor import post_order
from kiln.schedules.choose import ConvWorkload, candidates


def test_every_candidate_builds_with_its_template_and_times():
    wl = ConvWorkload(1, 16, 10, 10, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))
    target = resolve_target("native")
    prefixes = {
        "direct": "nchwc(",
        "im2col": "im2col+",
        "winograd2": "winograd(m=2",
        "winograd4": "winograd(m=4",
    }
    for algo in candidates(wl):
        ms, schedule = time_conv(wl, algo, target, 16, min_ms=5)
        assert ms > 0 and schedule.startswith(prefixes[algo]), (algo, schedule)
    timed = measure_candidates(wl, ["direct", "winograd2"], target, 16)
    assert set(timed) == {"direct", "winograd2"} and min(timed.values()) > 0


def test_conv_module_holds_one_conv_group_between_layout_transforms():
    wl = ConvWorkload(1, 8, 6, 6, 16, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1))
    mod = conv_module(wl, "direct", 8)
    groups = [e for e in post_order(mod.main.body) if isinstance(e, Call) and isinstance(e.op, Function)]
    assert len(groups) == 3


def test_conv_kernel_is_a_callable_that_runs_the_tuned_config():
    """bench/conv_layers.py interleaves this callable with ONNX Runtime; a config it is given must be the one
    built (a wrong key would silently time the default)."""
    from kiln.autotune.measure import conv_group
    from kiln.schedules.dispatch import task_of

    wl = ConvWorkload(1, 16, 10, 10, 32, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1))
    target = resolve_target("x86-avx2")
    _, workload = task_of(conv_group(conv_module(wl, "direct", 8)).op, target)
    cfg = {"algorithm": "direct", "tile_ow": 5, "tile_oc": 1, "unroll_kw": False, "rows_outer": True,
           "k_chunk": 0}
    run, lowered = conv_kernel(wl, "direct", target, 8, configs={workload.key: cfg})
    run()
    run()
    assert lowered.config_source == "given" and lowered.config["tile_ow"] == 5
    # written before the conv gained its `flat` knob: read with the knob's old value, as a record would be
    assert lowered.config["flat"] is False
