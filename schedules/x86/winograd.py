"""Winograd F(m x m, 3 x 3) on NCHW[b]c for x86 (and any LLVM CPU): each of the op's stages scheduled.

- padding: materialized once, so tile reads need no bounds checks;
- input transform: per (tile, input-channel block) in parallel, the 6x6 window kept in registers and every
  transform loop unrolled (the constant matrices fold: zeros vanish), vectorized over the channel block;
- batched GEMM: for each of the alpha^2 positions, `tile_p` tiles × `tile_k` ob-wide vectors of output channels
  accumulate in registers over the input channels. One vector (`tile_k` 1) costs a weight load and a broadcast
  per FMA pair, which holds the GEMM near half of the FMA rate; `tile_k` vectors reuse every broadcast value
  `tile_k` times, as the direct conv's tile_ow x tile_oc register tile does;
- output transform: per output tile, fused with the group's epilogue (bias, residual, activation).
"""

from __future__ import annotations

from dataclasses import dataclass

VERSION = 1
STAGES = ("wino_pad", "wino_in_rows", "wino_V", "wino_M", "wino_out_rows", "wino_Y")


@dataclass(frozen=True)
class Config:
    tile_p: int  # tiles per GEMM register block
    m: int = 4  # output tile: F(2x2, 3x3) or F(4x4, 3x3); fixed by the op, listed for the tuner
    tile_k: int = 1  # output-channel vectors per GEMM register block (records from before it are tile_k 1)


def space(tiles: int, oc_blocks: int = 1) -> dict[str, list]:
    return {"tile_p": [t for t in (1, 2, 4, 6, 7, 8, 12, 14, 16, 24) if t <= tiles], "m": [2, 4],
            "tile_k": [k for k in (1, 2, 3, 4) if oc_blocks % k == 0]}


def default(tiles: int, lanes: int, m: int = 4, oc_blocks: int = 1) -> Config:
    """Accumulators fill the vector registers less a few for the weight vectors and the broadcast: 24 of
    AVX-512's 32 (6 tiles x 4 vectors), 12 of AVX2's 16 (6 x 2). Measured cold on ResNet-50's shapes (2 cores,
    AVX-512), against 1 vector of up to 24 tiles: 28x28x128 F(4x4) 0.68 -> 0.55 ms, 14x14x256 F(2x2) 1.21 ->
    0.88 ms, 7x7x512 F(2x2) 1.77 -> 1.03-1.11 ms; 56x56x64 (4 vectors in all, a short reduction) unchanged."""
    regs = 24 if lanes >= 16 else 12
    tile_k = next(k for k in (4, 2, 1) if oc_blocks % k == 0 and k * 6 <= regs)
    if tile_k > 1 and tiles >= 6:
        return Config(tile_p=6, m=m, tile_k=tile_k)
    divs = [d for d in range(1, min(tiles, regs) + 1) if tiles % d == 0]
    tile_p = max(divs)
    if tile_p < 4 and tiles > 4:  # prime tile count: guarded partial blocks beat one tile at a time
        tile_p = min(8, regs)
    return Config(tile_p=tile_p, m=m)


def schedule(sch, cfg: Config) -> list[str]:
    """Schedule a group holding nn.conv2d_winograd_nchwc; every block outside STAGES is inlined first."""
    root = sch.get_sblock("root")
    blocks = sch.get_child_blocks(root)
    for b in blocks[:-1]:
        if sch.get(b).name_hint not in STAGES:
            sch.compute_inline(b)
    out = sch.get_child_blocks(root)[-1]
    names = {sch.get(b).name_hint for b in sch.get_child_blocks(root)}
    m = cfg.m

    if "wino_pad" in names:
        pad = sch.get_sblock("wino_pad")
        loops = sch.get_loops(pad)
        sch.parallel(sch.fuse(*loops[:3]))
        sch.vectorize(loops[-1])

    # input transform: V[e1, e2, p, c, ci] computed per (p, c), rows stage at the same place
    v = sch.get_sblock("wino_V")
    e1, e2, p, c, ci, r2 = sch.get_loops(v)
    sch.reorder(p, c, e1, e2, r2, ci)
    pc = sch.fuse(p, c)
    sch.parallel(pc)
    rows = sch.get_sblock("wino_in_rows")
    sch.compute_at(rows, pc)
    for loop in (e1, e2, r2):
        sch.unroll(loop)
    sch.vectorize(ci)
    re1, ra2, rci, rr1 = sch.get_loops(rows)[1:]
    sch.reorder(re1, ra2, rr1, rci)
    for loop in (re1, ra2, rr1):
        sch.unroll(loop)
    sch.vectorize(rci)
    for b, red in ((v, r2), (rows, rr1)):
        init = sch.decompose_reduction(b, red)
        sch.vectorize(sch.get_loops(init)[-1])

    # batched GEMM: M[e1, e2, p, k, ko] over (rco, rci)
    mm = sch.get_sblock("wino_M")
    copy = sch.cache_write(mm, 0, "global")
    sch.set_scope(mm, 0, "local")
    e1, e2, p, k, ko, rco, rci = sch.get_loops(mm)
    po, pi = sch.split(p, factors=[None, cfg.tile_p])
    kt, kk = sch.split(k, factors=[None, cfg.tile_k])
    sch.reorder(e1, e2, kt, po, rco, rci, pi, kk, ko)
    sch.parallel(sch.fuse(e1, e2, kt))
    sch.unroll(pi)
    sch.unroll(kk)
    sch.vectorize(ko)
    sch.reverse_compute_at(copy, po)
    init = sch.decompose_reduction(mm, rco)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(copy)[-1])

    # output transform, per output tile, fused with the epilogue
    n, k, y, x, ko = sch.get_loops(out)[:5]
    yo, yi = sch.split(y, factors=[None, m])
    xo, xi = sch.split(x, factors=[None, m])
    sch.reorder(n, k, yo, xo, yi, xi, ko)
    sch.parallel(sch.fuse(n, k, yo))
    sch.unroll(yi)
    sch.unroll(xi)
    sch.vectorize(ko)
    for name in ("wino_Y", "wino_out_rows"):
        b = sch.get_sblock(name)
        sch.compute_at(b, xo)
        *spatial, red = sch.get_loops(b)[2:]
        sch.reorder(red, *spatial)
        for loop in (red, *spatial[:-1]):
            sch.unroll(loop)
        sch.vectorize(spatial[-1])
        init = sch.decompose_reduction(b, red)
        sch.vectorize(sch.get_loops(init)[-1])
    return [f"winograd(m={m},p={cfg.tile_p},k={cfg.tile_k})" if cfg.tile_k > 1 else f"winograd(m={m},p={cfg.tile_p})"]
