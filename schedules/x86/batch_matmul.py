"""Batched matmul (nn.matmul, a[..., m, k] @ b[..., k, n], as in attention) on x86: per batch, a register tile
of `tile_m` rows × `tile_n` vectors of n accumulates while k runs outside it (rows of b are contiguous along n,
so each k step loads tile_n vectors of b and broadcasts tile_m values of a). Batches × tiles run in parallel;
the group's epilogue (scale, mask) is computed per tile from the registers. The tiling is dense_packed's."""

from __future__ import annotations

from dataclasses import dataclass

from . import dense_packed

VERSION = 1


@dataclass(frozen=True)
class Config:
    lanes: int  # columns per vector: divides n
    tile_m: int  # rows per tile
    tile_n: int = 1  # vectors of columns per tile
    unroll_k: int = 1
    n_outer: bool = False  # within a batch, tiles ordered column blocks outer

    def tiling(self) -> dense_packed.Config:
        return dense_packed.Config(self.tile_m, self.tile_n, self.unroll_k, self.n_outer)


def divisors(n: int, upto: int) -> list[int]:
    return [d for d in range(1, min(n, upto) + 1) if n % d == 0]


def lanes_for(n: int, lanes: int) -> int:
    return max(divisors(n, lanes))


def space(m: int, n: int, k: int, lanes: int = 16) -> dict[str, list]:
    """The knob space (columns per vector fixed by the target); the default lies in it."""
    width = lanes_for(n, lanes)
    return {"lanes": [width], "tile_m": divisors(m, 16), "tile_n": divisors(n // width, 6),
            "unroll_k": divisors(k, 4), "n_outer": [False, True]}


def default(m: int, n: int, k: int, lanes: int = 16, batches: int = 1) -> Config:
    """dense_packed's tile for one batch's m × n; batches are parallel work too."""
    width = lanes_for(n, lanes)
    t = dense_packed.default(m, n // width, k, lanes=lanes, block=width, min_tiles=-(-8 // batches))
    return Config(width, t.tile_m, t.tile_n, t.unroll_k)


def schedule(sch, matmul_block, out_block, cfg: Config) -> list[str]:
    """`matmul_block` is (batch..., m, n | k); `out_block` the group's output, same shape."""
    dense_packed.tile_registers(sch, matmul_block, out_block, cfg.lanes, cfg.tiling())
    order = ",n_outer" if cfg.n_outer else ""
    return [f"batch_matmul(m={cfg.tile_m},n={cfg.tile_n}x{cfg.lanes},k={cfg.unroll_k}{order})"]
