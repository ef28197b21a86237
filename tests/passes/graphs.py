"""Small graphs built by hand for pass tests."""

import numpy as np

from kiln.ir import Function, IRModule, call, const, var
from kiln.ir.ops.conv import CONV2D
from kiln.ir.ops.elementwise import ADD, RELU
from kiln.ir.ops.norm import BATCH_NORM

RNG = np.random.default_rng(0)


def conv(x, cin, cout, k=3, seed=0):
    w = const(np.random.default_rng(seed).standard_normal((cout, cin, k, k)).astype(np.float32) * 0.2)
    return call(CONV2D, x, w, strides=(1, 1), padding=(k // 2,) * 4, dilation=(1, 1))


def bias(x, c, seed=0):
    return call(ADD, x, const(np.random.default_rng(seed).standard_normal((c, 1, 1)).astype(np.float32)))


def batch_norm(x, c, seed=0):
    r = np.random.default_rng(seed)
    p = [const((r.random(c) + 0.5).astype(np.float32)) for _ in range(4)]
    return call(BATCH_NORM, x, *p, epsilon=1e-5)


def resnet_basic_block(channels: int = 8, size: int = 6) -> IRModule:
    x = var("x", f"f32[1, {channels}, {size}, {size}]")
    y = call(RELU, batch_norm(conv(x, channels, channels, seed=1), channels, seed=2))
    y = batch_norm(conv(y, channels, channels, seed=3), channels, seed=4)
    out = call(RELU, call(ADD, y, x))
    return IRModule({"main": Function((x,), out)})
