"""Small facts about loops and extents that every template asks: the divisors a split may use, how many
reduction axes a block has."""

from __future__ import annotations


def divisors(n: int, upto: int | None = None) -> list[int]:
    """The divisors of n, at most `upto`: split factors that leave no tail."""
    top = n if upto is None else min(n, upto)
    return [d for d in range(1, top + 1) if n % d == 0]


def n_reduction_axes(sch, block) -> int:
    return sum(1 for iv in sch.get(block).iter_vars if int(iv.iter_type) == 2)  # 2: CommReduce
