"""Softmax along the last axis on x86: rows in parallel; per row a vectorized max pass, one vectorized pass
that computes exp(x - max) once into a row buffer while summing it, and a vectorized division. Reads the four
stages of `ir/ops/softmax.py`'s compute by name."""

from __future__ import annotations

from dataclasses import dataclass

from . import rows as row_passes

VERSION = 1
STAGES = ("softmax_max", "softmax_exp", "softmax_sum", "softmax_norm")


@dataclass(frozen=True)
class Config:
    lanes: int  # vector width of every row pass; divides the row
    store_exp: bool = True  # exp(x - max) kept in a row buffer (else recomputed for the sum and the division)


def space(n: int, lanes: int = 16) -> dict[str, list]:
    """The knob space for rows of n; the default lies in it."""
    return {"lanes": row_passes.row_lanes(n, lanes), "store_exp": [True, False]}


def default(n: int, lanes: int = 16) -> Config:
    return Config(lanes=max(row_passes.row_lanes(n, lanes)))


def schedule(sch, cfg: Config) -> list[str]:
    top, exp, total, out = (sch.get_sblock(name) for name in STAGES)
    top_part = row_passes.split_reduction(sch, top, cfg.lanes)
    total_part = row_passes.split_reduction(sch, total, cfg.lanes)
    rows = row_passes.parallel_rows(sch, out, len(sch.get_loops(out)) - 1)
    row_passes.vectorize_row(sch, out, cfg.lanes)
    if not cfg.store_exp:
        sch.compute_inline(exp)
    for b in (total, total_part, exp if cfg.store_exp else None, top, top_part):
        if b is not None:
            sch.compute_at(b, rows)
    row_passes.vectorize_partials(sch, top_part)
    row_passes.vectorize_partials(sch, total_part)
    if cfg.store_exp:
        sch.set_scope(exp, 0, "local")
        row_passes.vectorize_row(sch, exp, cfg.lanes)
    return [f"softmax(lanes={cfg.lanes}{',store_exp' if cfg.store_exp else ''})"]
