"""Which convolution algorithm to use, decided at compile time without tuning (the idea behind MNN's
pre-inference): an analytic estimate of each candidate's time from its arithmetic, at the efficiency its
template reaches, plus the bytes it streams through memory. `kiln compile --explain` prints the estimates;
`--measure` times the candidates instead (autotune/measure.py) and keeps the fastest.

The constants are rough fits to what the templates reach on a 2-core AVX-512 machine (direct NCHWc about
85% of peak on large feature maps, the Winograd GEMM about 75%); they only need to rank the candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .x86 import conv2d_nchwc, winograd

DIRECT, IM2COL, WINOGRAD2, WINOGRAD4, NCHW = "direct", "im2col", "winograd2", "winograd4", "nchw"
ALGORITHMS = (DIRECT, IM2COL, WINOGRAD2, WINOGRAD4)

GHZ = 3.0  # assumed clock; estimates are relative, so it only scales the printed milliseconds
BANDWIDTH_GBS = 25.0  # cold weights streamed from memory by the whole chip
CACHE_BYTES = 2 << 20  # a working set below this stays in L2 between a stage's write and the next one's read


@dataclass(frozen=True)
class ConvWorkload:
    """A 2-D convolution's shape: what the choice (and a tuning record) is keyed by."""

    n: int
    c: int
    h: int
    w: int
    oc: int
    kh: int
    kw: int
    strides: tuple[int, int]
    padding: tuple[int, int, int, int]
    dilation: tuple[int, int]
    groups: int = 1

    @property
    def out_h(self) -> int:
        return (
            self.h + self.padding[0] + self.padding[2] - (self.kh - 1) * self.dilation[0] - 1
        ) // self.strides[0] + 1

    @property
    def out_w(self) -> int:
        return (
            self.w + self.padding[1] + self.padding[3] - (self.kw - 1) * self.dilation[1] - 1
        ) // self.strides[1] + 1

    @property
    def flops(self) -> int:
        return 2 * self.n * self.oc * self.out_h * self.out_w * (self.c // self.groups) * self.kh * self.kw

    @property
    def key(self) -> str:
        s, p, d = self.strides, self.padding, self.dilation
        return (
            f"conv2d n{self.n} c{self.c} {self.h}x{self.w} oc{self.oc} k{self.kh}x{self.kw} s{s[0]}x{s[1]} "
            f"p{p[0]}{p[1]}{p[2]}{p[3]} d{d[0]}x{d[1]} g{self.groups}"
        )

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.c == self.oc


def candidates(wl: ConvWorkload, lanes: int = 16) -> list[str]:
    if wl.groups != 1:
        # a grouped conv runs blocked when its groups are whole vectors on both sides (ShuffleNet's 3 groups of
        # 80 or 160 channels on AVX-512); otherwise it stays NCHW
        whole = (wl.c // wl.groups) % lanes == 0 and (wl.oc // wl.groups) % lanes == 0
        return [DIRECT] if wl.depthwise or whole else [NCHW]
    algos = [DIRECT, IM2COL]
    if (wl.kh, wl.kw) == (3, 3) and wl.strides == (1, 1) and wl.dilation == (1, 1):
        algos += [WINOGRAD2, WINOGRAD4]
    return algos


def _ms(flops: float, efficiency: float, nbytes: float, lanes: int, cores: int) -> float:
    peak = cores * lanes * 4 * GHZ * 1e9  # two FMA ports, two flops each
    return 1e3 * (flops / (peak * efficiency) + nbytes / (BANDWIDTH_GBS * 1e9))


def _spill(nbytes: float) -> float:
    """Bytes of an intermediate that actually reach memory (written and read back) when it outgrows L2."""
    return 2 * nbytes if nbytes > CACHE_BYTES else 0.0


def estimate_ms(wl: ConvWorkload, algo: str, lanes: int = 16, cores: int = 2) -> float:
    """Time in a model run: arithmetic at the template's efficiency, plus the weights streamed in cold (in a
    network every conv's weights were evicted by the layers since its last run) and spilled intermediates."""
    oh, ow = wl.out_h, wl.out_w
    weights = 4 * wl.oc * (wl.c // wl.groups) * wl.kh * wl.kw
    if wl.depthwise:  # memory-bound: a few flops per loaded value
        return _ms(wl.flops, 0.25, weights + 4 * wl.n * wl.c * wl.h * wl.w, lanes, cores)
    cfg = conv2d_nchwc.default(ow, max(1, wl.oc // lanes), lanes)
    fill = min(1.0, cfg.tile_ow * cfg.tile_oc / 12)  # a small register tile leaves FMA slots unused
    if algo == DIRECT:
        return _ms(wl.flops, 0.85 * fill, weights, lanes, cores)
    if algo == IM2COL:  # the direct kernel plus gathering every window: never better, except to a tuner
        cols = 4 * wl.n * oh * ow * wl.c * wl.kh * wl.kw
        return _ms(wl.flops, 0.85 * fill, weights + cols + _spill(cols), lanes, cores)
    if algo in (WINOGRAD2, WINOGRAD4):
        m = 2 if algo == WINOGRAD2 else 4
        alpha = m + 2
        tiles = wl.n * -(-oh // m) * -(-ow // m)
        gemm = 2.0 * alpha * alpha * tiles * wl.c * wl.oc
        transforms = 4.0 * alpha * alpha * alpha * tiles * (wl.c + wl.oc)  # two separable passes each side
        v, mm = 4 * alpha * alpha * tiles * wl.c, 4 * alpha * alpha * tiles * wl.oc
        u = weights * alpha * alpha / 9  # the transformed weights: 1.8x (m=2) or 4x (m=4) the direct ones
        # the batched GEMM reduces over the input channels only: with few (SqueezeNet's 16) each register tile
        # does a short reduction between its loads and stores (measured unfused: 16 channels at 55x55 F(4x4)
        # 0.277 ms against direct 0.179; 32 channels at 27x27 0.161 against 0.171). The template's default runs
        # the stages per row of tiles when U is small (winograd.default), and then V and M stay in L2 and never
        # spill: counting their spills there had kept VGG-19's 64-channel 224x224 conv and DenseNet-121's six
        # 128→32 convs at 56x56 on the direct conv, measured cold alone at 8.9 against 5.5 ms and 0.74 against
        # 0.55 ms (Zen 5, 2 cores, 2026-12-03; over 51 3x3 shapes of nine models the choices cost 10.0 ms more
        # than the fastest, 78 ms in all, and 5.5 ms after this)
        spills = 0.0 if u <= winograd.FUSE_MAX_WEIGHT_BYTES else _spill(v) + _spill(mm)
        # F(2x2)'s GEMM runs closer to the peak than F(4x4)'s at the same channels (VGG-19's 64→128 and 128→128
        # convs at 112x112: F(2x2) fused 2.8 and 5.4 ms alone, F(4x4), its U over 1 MB so unfused, 4.8 and 7.8);
        # output channels too few for the register tile's widest block (DenseNet's 32) reuse each broadcast
        # input fewer times (its 128→32 convs at 14x14: direct 56 µs alone, F(2x2) 69)
        cfg = winograd.default(tiles, lanes, m, max(1, wl.oc // lanes), weight_bytes=int(u))
        widest = winograd.default(tiles, lanes, m, 4, weight_bytes=int(u)).tile_k  # 4 blocks: any tile_k fits
        efficiency = (0.9 if m == 2 else 0.8) * wl.c / (wl.c + 24) * (1.0 if cfg.tile_k >= widest else 0.9)
        return _ms(gemm, efficiency, u + spills, lanes, cores) + _ms(transforms, 0.3, 0, lanes, cores)
    if algo == NCHW:
        return _ms(wl.flops, 0.3, weights, lanes, cores)
    raise ValueError(f"unknown conv algorithm {algo!r}")


@dataclass
class Choice:
    workload: ConvWorkload
    algorithm: str
    estimates_ms: dict[str, float]
    measured_ms: dict[str, float] = field(default_factory=dict)

    @property
    def how(self) -> str:
        return "measured" if self.measured_ms else "estimated"


def choose(wl: ConvWorkload, lanes: int = 16, cores: int = 2) -> Choice:
    est = {a: estimate_ms(wl, a, lanes, cores) for a in candidates(wl, lanes)}
    return Choice(wl, min(est, key=est.get), est)
