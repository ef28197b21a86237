"""Winograd F(m x m, 3 x 3) on NCHW[b]c for x86 (and any LLVM CPU): each of the op's stages scheduled.

- padding: materialized once, so tile reads need no bounds checks;
- input transform: per (tile, input-channel block) in parallel, the 6x6 window kept in registers and every
  transform loop unrolled (the constant matrices fold: zeros vanish), vectorized over the channel block;
- batched GEMM: for each of the alpha^2 positions, `tile_p` tiles × `tile_k` ob-wide vectors of output channels
  accumulate in registers over the input channels. One vector (`tile_k` 1) costs a weight load and a broadcast
  per FMA pair, which holds the GEMM near half of the FMA rate; `tile_k` vectors reuse every broadcast value
  `tile_k` times, as the direct conv's tile_ow x tile_oc register tile does;
- output transform: per output tile, fused with the group's epilogue (bias, residual, activation).

With `fused`, the three stages run per row of output tiles instead, the rows in parallel: a row's transformed
inputs V and GEMM results M (36 x tiles-in-a-row x channels) stay in L2 between the stages, where unfused they
make a round trip through memory for the whole image (SqueezeNet's 16→64 F(4x4) conv at 55x55: 2.3 MB of V and
M against a 1 MB L2). Each row reads all the transformed weights, so it pays where they are small: measured
cold on Zen 5 (2 cores, 2026-12-02), 64→64 at 56x56 0.90 -> 0.44 ms, 16→64 at 55x55 0.44 -> 0.28, 32→128 at
27x27 0.23 -> 0.15; 128→128 at 28x28 (2.4 MB of weights) even; 256→256 at 14x14 (9.4 MB) 0.59 -> 0.88.
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
    fused: bool = False  # the stages per row of tiles (records from before it are unfused)


FUSE_MAX_WEIGHT_BYTES = 1 << 20  # the default fuses below this much transformed weights (each row reads them all)


def space(tiles: int, oc_blocks: int = 1) -> dict[str, list]:
    return {"tile_p": [t for t in (1, 2, 4, 6, 7, 8, 12, 14, 16, 24) if t <= tiles], "m": [2, 4],
            "tile_k": [k for k in (1, 2, 3, 4) if oc_blocks % k == 0], "fused": [False, True]}


def default(tiles: int, lanes: int, m: int = 4, oc_blocks: int = 1, weight_bytes: int | None = None) -> Config:
    """Accumulators fill the vector registers less a few for the weight vectors and the broadcast: 24 of
    AVX-512's 32 (6 tiles x 4 vectors), 12 of AVX2's 16 (6 x 2). Measured cold on ResNet-50's shapes (2 cores,
    AVX-512), against 1 vector of up to 24 tiles: 28x28x128 F(4x4) 0.68 -> 0.55 ms, 14x14x256 F(2x2) 1.21 ->
    0.88 ms, 7x7x512 F(2x2) 1.77 -> 1.03-1.11 ms; 56x56x64 (4 vectors in all, a short reduction) unchanged.
    `weight_bytes` (the transformed weights) at most FUSE_MAX_WEIGHT_BYTES: the stages fused per row."""
    regs = 24 if lanes >= 16 else 12
    fused = weight_bytes is not None and weight_bytes <= FUSE_MAX_WEIGHT_BYTES
    tile_k = next(k for k in (4, 2, 1) if oc_blocks % k == 0 and k * 6 <= regs)
    if tile_k > 1 and tiles >= 6:
        return Config(tile_p=6, m=m, tile_k=tile_k, fused=fused)
    divs = [d for d in range(1, min(tiles, regs) + 1) if tiles % d == 0]
    tile_p = max(divs)
    if tile_p < 4 and tiles > 4:  # prime tile count: guarded partial blocks beat one tile at a time
        tile_p = min(8, regs)
    return Config(tile_p=tile_p, m=m, fused=fused)


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
    if cfg.fused:
        return _schedule_fused(sch, out, cfg)

    # input transform: V[e1, e2, p, c, ci] computed per (p, c), rows stage at the same place
    v = sch.get_sblock("wino_V")
    e1, e2, p, c, ci, r2 = sch.get_loops(v)
    sch.reorder(p, c, e1, e2, r2, ci)
    pc = sch.fuse(p, c)
    sch.parallel(pc)
    _input_transform(sch, v, pc, e1, e2, r2, ci)

    # batched GEMM: M[e1, e2, p, k, ko] over (rco, rci)
    mm = sch.get_sblock("wino_M")
    copy = sch.cache_write(mm, 0, "global")
    sch.set_scope(mm, 0, "local")
    _gemm(sch, mm, copy, dict(zip(GEMM_LOOPS, sch.get_loops(mm))), cfg.tile_p, cfg.tile_k, parallel=True)

    # output transform, per output tile, fused with the epilogue
    n, k, y, x, ko = sch.get_loops(out)[:5]
    yo, yi = sch.split(y, factors=[None, m])
    xo, xi = sch.split(x, factors=[None, m])
    sch.reorder(n, k, yo, xo, yi, xi, ko)
    sch.parallel(sch.fuse(n, k, yo))
    sch.unroll(yi)
    sch.unroll(xi)
    sch.vectorize(ko)
    _output_transform(sch, out, xo)
    return [_describe(cfg)]


def _describe(cfg: Config) -> str:
    k = f",k={cfg.tile_k}" if cfg.tile_k > 1 else ""
    return f"winograd(m={cfg.m},p={cfg.tile_p}{k}{',rows' if cfg.fused else ''})"


def _present(sch, block, names_extents, skip: int = 0) -> dict:
    """The block's loops by name, after compute_at made them: `names_extents` lists its iteration variables in
    order with the extents their loops would have, and compute_at makes no loop for an extent of 1."""
    loops = sch.get_loops(block)[skip:]
    named = [n for n, e in names_extents if e > 1]
    assert len(loops) == len(named), (named, len(loops))
    return dict(zip(named, loops))


GEMM_LOOPS = ("e1", "e2", "p", "k", "ko", "rco", "rci")


def _gemm(sch, mm, copy, lp: dict, tile_p: int, tile_k: int, parallel: bool) -> None:
    """`tile_p` tiles x `tile_k` vectors of the GEMM's output in registers (`mm`, local) over its reduction,
    written out by `copy` per register block. `lp`: its loops by GEMM_LOOPS name, a loop of extent 1 that
    compute_at left out absent; `parallel` runs (e1, e2, channel tile) in parallel."""
    po, pi = sch.split(lp["p"], factors=[None, tile_p]) if "p" in lp else (None, None)
    kt, kk = sch.split(lp["k"], factors=[None, tile_k]) if "k" in lp else (None, None)
    red = [lp[r] for r in ("rco", "rci") if r in lp]
    order = (lp.get("e1"), lp.get("e2"), kt, po, *red, pi, kk, lp["ko"])
    sch.reorder(*[loop for loop in order if loop is not None])
    if parallel:
        sch.parallel(sch.fuse(lp["e1"], lp["e2"], kt))
    for loop in (pi, kk):
        if loop is not None:
            sch.unroll(loop)
    sch.vectorize(lp["ko"])
    sch.reverse_compute_at(copy, po if po is not None else kt if kt is not None else lp["e2"])
    init = sch.decompose_reduction(mm, red[0])
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(copy)[-1])


def _input_transform(sch, v, anchor, e1, e2, r2, ci) -> None:
    """V's loops (already ordered ..., e1, e2, r2, ci) unrolled and vectorized; its rows stage computed at
    `anchor`, one (tile, channel block) at a time, the same way."""
    rows = sch.get_sblock("wino_in_rows")
    sch.compute_at(rows, anchor)
    for loop in (e1, e2, r2):
        sch.unroll(loop)
    sch.vectorize(ci)
    re1, ra2, rci, rr1 = sch.get_loops(rows)[-4:]
    sch.reorder(re1, ra2, rr1, rci)
    for loop in (re1, ra2, rr1):
        sch.unroll(loop)
    sch.vectorize(rci)
    for b, red in ((v, r2), (rows, rr1)):
        init = sch.decompose_reduction(b, red)
        sch.vectorize(sch.get_loops(init)[-1])


def _output_transform(sch, out, xo) -> None:
    for name in ("wino_Y", "wino_out_rows"):
        b = sch.get_sblock(name)
        sch.compute_at(b, xo)
        *spatial, red = sch.get_loops(b)[-4:]
        sch.reorder(red, *spatial)
        for loop in (red, *spatial[:-1]):
            sch.unroll(loop)
        sch.vectorize(spatial[-1])
        init = sch.decompose_reduction(b, red)
        sch.vectorize(sch.get_loops(init)[-1])


def _schedule_fused(sch, out, cfg: Config) -> list[str]:
    """Rows of output tiles in parallel; under each row its GEMM, and under that its input transform."""
    m, alpha = cfg.m, cfg.m + 2
    n, k, y, x, ko = sch.get_loops(out)[:5]
    yo, yi = sch.split(y, factors=[None, m])
    xo, xi = sch.split(x, factors=[None, m])
    sch.reorder(n, yo, k, xo, yi, xi, ko)
    row = sch.fuse(n, yo)
    sch.parallel(row)
    sch.unroll(yi)
    sch.unroll(xi)
    sch.vectorize(ko)
    _output_transform(sch, out, xo)
    nw = int(sch.get(xo).extent)
    _, _, _, kb, ob, cb, ib = (int(v.dom.extent) for v in sch.get(sch.get_sblock("wino_M")).iter_vars)

    # the row's GEMM: M[e1, e2, p in the row, k, ko], accumulators in registers as unfused
    mm = sch.get_sblock("wino_M")
    sch.compute_at(mm, row)
    copy = sch.cache_write(mm, 0, "global")
    sch.set_scope(mm, 0, "local")
    lp = _present(sch, mm, zip(GEMM_LOOPS, (alpha, alpha, nw, kb, ob, cb, ib)), skip=1)
    _gemm(sch, mm, copy, lp, min(cfg.tile_p, nw), cfg.tile_k, parallel=False)

    # the row's input transform: V[e1, e2, p in the row, c, ci], its rows stage per (tile, channel block)
    v = sch.get_sblock("wino_V")
    sch.compute_at(v, row)
    lv = _present(sch, v, [("e1", alpha), ("e2", alpha), ("p", nw), ("c", cb), ("ci", ib), ("r2", alpha)], skip=1)
    outer = [lv[n] for n in ("p", "c") if n in lv]
    sch.reorder(*outer, lv["e1"], lv["e2"], lv["r2"], lv["ci"])
    _input_transform(sch, v, outer[-1] if outer else row, lv["e1"], lv["e2"], lv["r2"], lv["ci"])
    return [_describe(cfg)]
