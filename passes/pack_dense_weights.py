"""Repack constant dense weights from [units, k] to [units / block, k, block] at compile time, so a kernel reads
`block` output units as one contiguous vector per step of k. After this pass no nn.dense with a constant
weight whose unit count the block divides remains.

The block is one vector register of the target's fp32 lanes where that is at least 8 (`mod.attrs["layout_block"]`,
set by the driver), else 16. A one-register block lets the register tile take any number of vector columns: on
AVX2 a 16-unit block (two ymm) allowed 4 rows × 1 block = 8 accumulators at 128 rows, where 8-unit blocks give
4 × 3 = 12 of the 16 registers (FFN 128×768→3072 alone: 125-130 GFLOPS against 109-114; the BERT layer whole,
11 interleaved rounds on Zen 3: 0.893× the time, faster in 10/11). NEON (4 lanes) and CUDA keep 16: unmeasured."""

from __future__ import annotations

from kiln.ir import Call, Constant, Expr, IRModule
from kiln.ir.ops.dense import DENSE, DENSE_PACKED, pack_dense_weight
from kiln.ir.visitor import rewrite_function

BLOCK = 16  # fp32 lanes of one AVX-512 register


def dense_block(layout_block: int) -> int:
    return layout_block if layout_block >= 8 else BLOCK


def _block_for(units: int, block: int) -> int | None:
    for b in (block, block // 2, block // 4):
        if b >= 4 and units % b == 0:
            return b
    return None


def pack_dense_weights(mod: IRModule) -> IRModule:
    preferred = dense_block(int(mod.attrs.get("layout_block", 0) or 0))

    def pack(e: Expr) -> Expr | None:
        if not isinstance(e, Call) or e.op is not DENSE or not isinstance(e.args[1], Constant):
            return None
        w = e.args[1]
        block = _block_for(w.value.shape[0], preferred)
        if block is None:
            return None
        packed = Constant(pack_dense_weight(w.value, block), name=w.name)
        return Call(DENSE_PACKED, (e.args[0], packed), DENSE_PACKED.make_attrs(block=block,
                                                                                 out_dtype=e.attrs.out_dtype), e.span)

    main = rewrite_function(mod.main, pack)
    return mod if main is mod.main else mod.with_main(main)
