"""Prototype, not kept: ShuffleNet's grouped 1x1 convs at 14x14 and 7x7 with the plane padded to whole vectors.

At 14x14 and 7x7 the plane (196, 49) is not a multiple of AVX-512's 16 lanes, so conv2d_direct (NCHW) falls back
to width tiles of 14 or 7 lanes, which LLVM splits into 8 + 4 + 2 or 4 + 2 + 1 pieces on every accumulator. The
same conv on a plane padded to whole vectors (14x16 = 224, 8x8 = 64) takes the flat tile. This times both, the
kernel alone (warm, TVM's pool, 2 threads), in interleaved rounds:

    python docs/tuning-runs/2026-12-02-padded-plane-proto.py

What a change would need (docs/tuning.md, 2026-12-02 evening): the padding inside the conv's own compute (TVM's
`pad_einsum` refuses the grouped conv's compound channel index, and a predicated tail — buffer-level predication
— masks the accumulators too and ran 1.4-6x slower), or a layout whose planes are padded between kernels.
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
    "272ch 14x14 (default: width tiles)": kernel(272, 4, 14, 14),
    "272ch 14x16 (padded: flat tile)": kernel(272, 4, 14, 16),
    "544ch 7x7 (default: width tiles)": kernel(544, 4, 7, 7),
    "544ch 8x8 (padded: flat tile)": kernel(544, 4, 8, 8),
    "544ch 8x8 (padded: flat oc=2 v=4)": kernel(544, 4, 8, 8, {"direct": True, "flat": True, "tile_oc": 2,
                                                                 "tile_v": 4, "oc_inner": True}),
}
ms = interleaved_ms({k: v[0] for k, v in cases.items()}, per_block=400, rounds=7, pause_s=0.2)
for name, (_, schedule, flops) in cases.items():
    t = float(np.median(ms[name]))
    print(f"{name:40s} {t * 1000:6.1f} us  {flops / 1e9 / (t / 1e3):5.0f} GFLOPS of its own work  {schedule}")
