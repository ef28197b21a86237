"""The pass order of each opt level, top to bottom. A change of order is a design decision: say why."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kiln.ir import IRModule, print_ir, verify_module

from .alter_layout import alter_layout
from .eliminate_common_subexpr import eliminate_common_subexpr
from .eliminate_dead_code import eliminate_dead_code
from .fold_batch_norm import fold_batch_norm
from .fold_constants import fold_constants
from .fuse_ops import fuse_ops
from .materialize_outputs import materialize_outputs
from .mixed_precision import convert_precision
from .pack_dense_weights import pack_dense_weights
from .plan_memory import plan_memory
from .quantize import quantize
from .realize_qdq import realize_qdq
from .simplify_inference import simplify_inference

Pass = Callable[[IRModule], IRModule]

O0: list[Pass] = [convert_precision, materialize_outputs, fuse_ops, plan_memory]  # what codegen needs; the fuser still groups, as codegen takes groups
O1: list[Pass] = [simplify_inference, fold_constants, fold_batch_norm, fold_constants, convert_precision,
                  pack_dense_weights, materialize_outputs, fuse_ops, plan_memory]
O2: list[Pass] = [
    simplify_inference,
    fold_constants,
    fold_batch_norm,  # scales conv weights: leaves constant arithmetic behind
    fold_constants,  # ... which folds here, once, at compile time
    eliminate_common_subexpr,
    eliminate_dead_code,
    simplify_inference,  # CSE can expose reshape-of-reshape chains
    quantize,  # --precision int8: a QDQ pair where the calibration measured a range; realize_qdq reads it as
               # it reads an imported QDQ model. After the folds, so the weights it rounds are final
    realize_qdq,  # after the folds (the dequantized weights are constants); before layout, which blocks it
    convert_precision,  # --precision fp16/bf16: after the folds, so folded weights (conv * batch-norm scale)
                        # round to half once; before packing, layout and fusion, which then see the half
                        # graph, and fuse each cast into the kernel beside it. fp32 and tf32: no change
    pack_dense_weights,  # a layout change of constants only: done once, here, at compile time
    alter_layout,  # after folding, so conv weights are constants it can repack; before fusion, which groups
    materialize_outputs,  # after the last fold: an output that is an input or a constant gets a copy kernel
    fuse_ops,      # the blocked convs with their (blocked) epilogues
    plan_memory,
]
O3: list[Pass] = O2
LEVELS = {0: O0, 1: O1, 2: O2, 3: O3}


def run(mod: IRModule, passes: list[Pass], *, verify: bool = True, dump_dir: Path | None = None,
        first: int = 1) -> IRModule:
    """Run `passes` in order. `first` numbers the dumps of a pipeline run in two parts (the driver stops before
    alter_layout to choose conv algorithms)."""
    if dump_dir is not None:
        dump_dir.mkdir(parents=True, exist_ok=True)
        if first == 1:
            (dump_dir / "00_input.kir").write_text(print_ir(mod))
    for i, p in enumerate(passes, start=first):
        mod = p(mod)
        if verify:
            verify_module(mod, after=p.__name__)  # the error names the pass that broke the IR
        if dump_dir is not None:
            (dump_dir / f"{i:02d}_{p.__name__}.kir").write_text(print_ir(mod))
    return mod


def optimize(mod: IRModule, opt_level: int = 2, **kwargs) -> IRModule:
    return run(mod, LEVELS[opt_level], **kwargs)
