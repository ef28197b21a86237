"""Layer norm over the last axis on x86: rows in parallel; per row a vectorized sum, a vectorized sum of
squared deviations from the mean, and the vectorized normalized, scaled output. Reads the stages of
`ir/ops/norm.py`'s compute by name."""

from __future__ import annotations

from dataclasses import dataclass

from . import rows as row_passes

VERSION = 1
STAGES = ("layer_norm_sum", "layer_norm_var_sum", "layer_norm")


@dataclass(frozen=True)
class Config:
    lanes: int  # vector width of every row pass; divides the row


def space(n: int, lanes: int = 16) -> dict[str, list]:
    """The knob space for rows of n; the default lies in it."""
    return {"lanes": row_passes.row_lanes(n, lanes)}


def default(n: int, lanes: int = 16) -> Config:
    return Config(lanes=max(row_passes.row_lanes(n, lanes)))


def schedule(sch, cfg: Config) -> list[str]:
    """`out` may be the layer norm itself or an elementwise epilogue after it (inlined into the last pass)."""
    total, squares, norm = (sch.get_sblock(name) for name in STAGES)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    out = blocks[-1]
    for b in blocks[:-1]:
        if sch.get(b).name_hint not in STAGES:
            sch.compute_inline(b)
    if not sch.get(out).same_as(sch.get(norm)):
        sch.compute_inline(norm)
    total_part = row_passes.split_reduction(sch, total, cfg.lanes)
    squares_part = row_passes.split_reduction(sch, squares, cfg.lanes)
    rows = row_passes.parallel_rows(sch, out, len(sch.get_loops(out)) - 1)
    row_passes.vectorize_row(sch, out, cfg.lanes)
    for b in (squares, squares_part, total, total_part):
        if b is not None:
            sch.compute_at(b, rows)
    row_passes.vectorize_partials(sch, total_part)
    row_passes.vectorize_partials(sch, squares_part)
    return [f"layer_norm(lanes={cfg.lanes})"]
