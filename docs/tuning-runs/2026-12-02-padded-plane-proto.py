"""The measurement behind conv2d_direct's padded planes: ShuffleNet's grouped 1x1 convs at 14x14 and 7x7, and
the same convs on a plane of whole vectors (the op itself padded: 14x16, 8x8).

At 14x14 and 7x7 the plane (196, 49) is not a multiple of AVX-512's 16 lanes, so conv2d_direct (NCHW) used
width tiles of 14 or 7 lanes, which LLVM splits into 8 + 4 + 2 or 4 + 2 + 1 pieces on every accumulator. This
times both, the kernel alone (warm, TVM's pool, 2 threads), in interleaved rounds:

    python docs/tuning-runs/2026-12-02-padded-plane-proto.py

Since it was written the template builds such convs over a padded plane itself (schedules/x86/conv2d_direct.py,
`padded_plane`), so "default" below is that now; the width tiles are asked for by config in docs/tuning.md's
A/Bs.
"""
import os

os.environ["TVM_NUM_THREADS"] = "2"
import sys  # noqa: E402

import numpy as np  # noqa: E402
import tvm  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from kiln.codegen.target import resolve_target  # noqa: E402
from kiln.ir.ops.conv import ConvAttrs  # noqa: E402
from kiln.runtime.timing import interleaved_ms  # noqa: E402
from tests.groups import lower  # noqa: E402
from tests.schedules.test_conv2d_direct import bias_add_relu_group  # noqa: E402

target = resolve_target("native")


def kernel(c, groups, h, w, cfg=None):
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s).astype(np.float32)
              for s in ((1, c, h, w), (c, c // groups, 1, 1), (1, c, 1, 1), (1, c, h, w))]
    fn = bias_add_relu_group(arrays[0], arrays[1], ConvAttrs((1, 1), (0,) * 4, (1, 1), groups))
    g = lower(fn, target)
    if cfg:
        g = lower(fn, target, {g.workload: cfg})
    f = tvm.compile(tvm.IRModule({"main": g.prim_func}), target=target).jit()["main"]
    args = [tvm.runtime.tensor(a) for a in arrays] + [tvm.runtime.empty((1, c, h, w), "float32")]
    return (lambda: f(*args)), g.schedule, 2 * c * (c // groups) * h * w


cases = {
    "272ch 14x14 (width tiles)": kernel(272, 4, 14, 14, {"direct": True, "tile_oc": 4, "tile_ow": 14,
                                                                "oc_inner": True}),
    "272ch 14x16 (padded: flat tile)": kernel(272, 4, 14, 16),
    "544ch 7x7 (width tiles)": kernel(544, 4, 7, 7, {"direct": True, "tile_oc": 8, "tile_ow": 7, "oc_inner": True}),
    "544ch 8x8 (padded: flat tile)": kernel(544, 4, 8, 8),
    "544ch 8x8 (padded: flat oc=2 v=4)": kernel(544, 4, 8, 8, {"direct": True, "flat": True, "tile_oc": 2,
                                                                 "tile_v": 4, "oc_inner": True}),
}
ms = interleaved_ms({k: v[0] for k, v in cases.items()}, per_block=400, rounds=7, pause_s=0.2)
for name, (_, schedule, flops) in cases.items():
    t = float(np.median(ms[name]))
    print(f"{name:40s} {t * 1000:6.1f} us  {flops / 1e9 / (t / 1e3):5.0f} GFLOPS of its own work  {schedule}")
