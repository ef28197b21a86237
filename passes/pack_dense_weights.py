"""Repack constant dense weights from [units, k] to [units / block, k, block] at compile time, so a kernel reads
`block` output units as one contiguous vector per step of k. After this pass no nn.dense with a constant
weight whose unit count the block divides remains."""

from __future__ import annotations

from kiln.ir import Call, Constant, Expr, IRModule
from kiln.ir.ops.dense import DENSE, DENSE_PACKED, pack_dense_weight
from kiln.ir.visitor import rewrite_function

BLOCK = 16  # fp32 lanes of one AVX-512 register; two AVX2 registers


def _block_for(units: int) -> int | None:
    for b in (BLOCK, 8, 4):
        if units % b == 0:
            return b
    return None


def pack_dense_weights(mod: IRModule) -> IRModule:
    def pack(e: Expr) -> Expr | None:
        if not isinstance(e, Call) or e.op is not DENSE or not isinstance(e.args[1], Constant):
            return None
        w = e.args[1]
        block = _block_for(w.value.shape[0])
        if block is None:
            return None
        packed = Constant(pack_dense_weight(w.value, block), name=w.name)
        return Call(DENSE_PACKED, (e.args[0], packed), DENSE_PACKED.make_attrs(block=block,
                                                                                 out_dtype=e.attrs.out_dtype), e.span)

    main = rewrite_function(mod.main, pack)
    return mod if main is mod.main else mod.with_main(main)
