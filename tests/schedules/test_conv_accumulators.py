"""Where a conv tile's accumulators live: a tile under 1 KB is a stack array (LLVM holds it in registers), not a
TVMBackendAllocWorkspace call per parallel iteration, which TVM 0.27 emits for every "local" buffer. The
kernel's LLVM IR is read for loads of the workspace hook; targets are presets, so the tile is the same on any
host, and the outputs are checked against NumPy."""

import numpy as np
import pytest
from kiln.autotune import measure
from kiln.codegen.lower import lower_group
from kiln.codegen.target import resolve_target
from kiln.schedules.choose import ConvWorkload

WORKSPACE_CALL = "load ptr, ptr @__TVMBackendAllocWorkspace"


def _lowered(c, h, oc, preset, block):
    """(the fused 1x1 conv + bias + relu group, its lowered kernel, the target)."""
    wl = ConvWorkload(1, c, h, h, oc, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1))
    target = resolve_target(preset)
    group = measure.conv_group(measure.conv_module(wl, "direct", block))
    return group, lower_group(group.op, "conv", target, None), target


@pytest.mark.parametrize("preset, block, tile_bytes", [
    ("x86-avx512", 16, 7 * 2 * 64),  # ResNet-50's 512→2048 1x1 at 7x7: 7 columns x 2 blocks of 16 floats
    ("x86-avx2", 8, 3 * 4 * 32),  # 3 columns of the 49-long flat plane (a guarded tail) x 4 blocks of 8
])
def test_a_small_tile_has_no_workspace_call(preset, block, tile_bytes):
    import tvm

    _, lowered, target = _lowered(512, 7, 2048, preset, block)
    ll = tvm.tirx.build(tvm.IRModule({"conv": lowered.prim_func}), target=target).inspect_source("ll")
    cfg = lowered.config
    assert cfg["tile_ow"] * cfg["tile_oc"] * block * 4 == tile_bytes < 1024
    assert WORKSPACE_CALL not in ll


def test_the_stack_tile_computes_the_conv():
    import tvm

    group, lowered, target = _lowered(64, 7, 128, "x86-avx2", 8)
    lib = tvm.compile(tvm.IRModule({"conv": lowered.prim_func}), target=target)
    rng = np.random.default_rng(0)
    args = [rng.standard_normal(a.ttype.shape).astype(np.float32) for a in group.args]
    out = np.empty(group.ttype.shape, np.float32)
    dev = tvm.cpu()
    tensors = [tvm.runtime.tensor(a, dev) for a in args] + [tvm.runtime.tensor(out, dev)]
    lib["conv"](*tensors)
    x, w, b = args  # x: (1, C/8, h, w, 8); w: (OC/8, C/8, 1, 1, 8, 8); bias: (OC/8, 1, 1, 8)
    want = np.einsum("nchwi,ocyxij->nohwj", x, w) + b[None]
    np.testing.assert_allclose(tensors[-1].numpy(), np.maximum(want, 0), rtol=1e-4, atol=1e-4)
