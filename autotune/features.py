"""Loop-nest features of a scheduled kernel: a fixed-length vector that means the same for every task, so a cost
model trained on one task's records can rank another task's configs (the xgb tuner's transfer learning).

We reuse TVM MetaSchedule's per-store feature extractor (`tvm.s_tir.meta_schedule.feature_extractor.
PerStoreFeature`, the input of MetaSchedule's own XGBoost model) rather than walking the TIR ourselves: it
already gives, for every buffer store, 164 numbers covering what decides a CPU or GPU kernel's speed (arithmetic
counts by kind, loop extents under parallel/vectorize/unroll annotations and their positions, bytes and unique
cache lines touched per buffer, reuse distances, arithmetic intensity curve, allocations, thread bindings), all
log-scaled, fast (milliseconds a kernel), and maintained with TVM. Its row count varies (one per store), so
`loop_features` summarizes the rows to a fixed length: the number of stores, then the mean, the maximum and
the total (summed in linear scale, log-scaled again) of each column. It needs apache-tvm-ffi 0.1.14 (0.1.15.x
segfaults in this extractor; docs in /work/shared/notes/tvm-0.27.md).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule import _ffi_api

PER_STORE = (
    164  # PerStoreFeature's row length with its default settings (5 buffers a store, 10 curve samples)
)
LENGTH = 1 + 3 * PER_STORE


def loop_features(prim_func: tvm.tirx.PrimFunc, target="llvm") -> np.ndarray:
    """The LENGTH-long feature vector of a scheduled PrimFunc, for `target` (its kind matters: GPU features)."""
    mod = tvm.IRModule({"main": prim_func})
    target = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    ctx = _context(mod, target)
    candidate = ms.MeasureCandidate(tvm.s_tir.Schedule(mod), ms.arg_info.ArgInfo.from_prim_func(prim_func))
    rows = ms.feature_extractor.PerStoreFeature().extract_from(ctx, [candidate])[0].numpy()
    if rows.shape[1:] != (PER_STORE,):
        raise RuntimeError(f"PerStoreFeature gave rows of {rows.shape[1:]}, expected ({PER_STORE},)")
    if rows.shape[0] == 0:  # no stores (an empty kernel): nothing to describe
        return np.zeros(LENGTH)
    total = _slog(np.sum(_unslog(rows), axis=0))
    return np.concatenate([[np.log2(1 + rows.shape[0])], rows.mean(axis=0), rows.max(axis=0), total])


def _context(mod: tvm.IRModule, target: tvm.target.Target) -> ms.TuneContext:
    """A TuneContext holding just the module and target, which is all the extractor reads. Built through its
    FFI constructor because `TuneContext.__init__` first imports `tvm.s_tir.tensor_intrin`, which registers
    every tensor intrinsic (CUDA's alone) and took 39 s of a 2-core VM, once per process."""
    ctx = ms.TuneContext.__new__(ms.TuneContext)
    # (mod, target, space_generator, search_strategy, task_name, num_threads, rand_state, logger)
    ctx.__init_handle_by_constructor__(_ffi_api.TuneContext, mod, target, None, None, "main", 1, -1, None)
    return ctx


def _slog(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log2(1 + np.abs(x))  # PerStoreFeature's own scaling


def _unslog(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * (np.exp2(np.abs(x)) - 1)
