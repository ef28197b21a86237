"""Post-training int8 calibration: run a float model on sample inputs, record the range of every tensor that
`passes/quantize.py` would quantize, and choose each range's clipping by one of three methods.

- `minmax`: the extremes seen, as ONNX Runtime's default MinMax calibrator. Nothing is clipped, so one outlier
  spreads the 256 codes over a range most values never reach.
- `percentile`: the 99.99th percentile of |x| (of x after a ReLU): clips the rarest values.
- `entropy`: the clipping threshold whose quantized distribution loses the least information (smallest KL
  divergence from the observed histogram), TensorRT's default calibrator.

The model runs compiled (float32, every observed tensor an extra output of the artifact) rather than in the
NumPy interpreter: ResNet-50 takes about 30 ms a sample there, against seconds. Histogram methods need each
tensor's extent before they bin it, so they run the samples twice; the artifact is compiled once.

The table is keyed by `calibration_points` (the consumer conv's or matmul's node name) and can be saved as
JSON, as TensorRT's calibration cache is, so a model is calibrated once and compiled many times.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kiln.errors import InputError, KilnError

log = logging.getLogger(__name__)

METHODS = ("entropy", "percentile", "minmax")
BINS = 2048  # histogram bins over [0, max|x|]: TensorRT's count; the entropy search tries clips at bin edges
PERCENTILE = 99.99
_FORMAT = "kiln-calibration/1"


@dataclass
class CalibrationTable(Mapping):
    """Key (passes/quantize.py `calibration_points`) → the (lo, hi) range its activation is quantized over.
    A Mapping, so `Options(precision="int8", calibration=table)` takes it as it is."""

    ranges: dict[str, tuple[float, float]]
    method: str = "percentile"
    samples: int = 0
    model: str = ""
    observed: dict[str, tuple[float, float]] = field(default_factory=dict)  # min, max seen, whatever the method

    def __getitem__(self, key: str) -> tuple[float, float]:
        return self.ranges[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.ranges)

    def __len__(self) -> int:
        return len(self.ranges)

    def __hash__(self) -> int:
        return id(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps({"format": _FORMAT, "model": self.model, "method": self.method,
                                    "samples": self.samples,
                                    "ranges": {k: list(v) for k, v in self.ranges.items()},
                                    "observed": {k: list(v) for k, v in self.observed.items()}}, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> CalibrationTable:
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise KilnError(f"cannot read calibration table {path}: {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
            raise KilnError(f"{path} is not a Kiln calibration table (no \"format\": \"{_FORMAT}\"); "
                            "`kiln calibrate` writes one")
        ranges = {k: (float(v[0]), float(v[1])) for k, v in doc.get("ranges", {}).items()}
        observed = {k: (float(v[0]), float(v[1])) for k, v in doc.get("observed", {}).items()}
        return cls(ranges, doc.get("method", ""), int(doc.get("samples", 0)), doc.get("model", ""), observed)


@dataclass
class Calibration:
    """What a calibration run produced: the table, and the float32 outputs of each sample (the reference an
    int8 build is compared with)."""

    table: CalibrationTable
    samples: list[list[np.ndarray]]
    outputs: list[list[np.ndarray]]
    seconds: float = 0.0


# --- samples ----------------------------------------------------------------------------------------------------

def load_samples(path: str | Path, params: Sequence) -> list[list[np.ndarray]]:
    """Calibration inputs from a file or folder, as one list of arrays (in the model's input order) per sample.

    - `x.npy`, for a model of one input: one sample of the input's shape, or many stacked along a new first
      axis, or along the batch axis (a model of batch 2 takes rows 0-1, 2-3, ...);
    - `x.npz`: an array per input name, each split the same way;
    - a folder: every .npy/.npz in it, in name order, each read as above.
    Float data of another float dtype is converted; anything else that does not fit names the input."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".npy", ".npz"))
        if not files:
            raise InputError(f"calibration folder {path} holds no .npy or .npz files")
        return [s for f in files for s in load_samples(f, params)]
    if not path.exists():
        raise InputError(f"calibration data {path} does not exist")
    try:
        if path.suffix == ".npz":
            with np.load(path) as z:
                given = {k: z[k] for k in z.files}
        else:
            arr = np.load(path)
            if len(params) != 1:
                raise InputError(f"{path}: the model has {len(params)} inputs {[p.name for p in params]}; "
                                 "give an .npz with one array per input name")
            given = {params[0].name: arr}
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read calibration data {path}: {e}") from None
    missing = [p.name for p in params if p.name not in given]
    if missing:
        raise InputError(f"{path}: no array for input(s) {missing} (it has {sorted(given)})")
    split = [_split(path, p, given[p.name]) for p in params]
    counts = {len(s) for s in split}
    if len(counts) != 1:
        raise InputError(f"{path}: the inputs hold different numbers of samples "
                         f"{ {p.name: len(s) for p, s in zip(params, split)} }")
    return [list(arrays) for arrays in zip(*split)]


def _split(path: Path, param, arr: np.ndarray) -> list[np.ndarray]:
    ty = param.ttype
    want = tuple(ty.shape)
    if arr.dtype != np.dtype(ty.dtype):
        if arr.dtype.kind == "f" and np.dtype(ty.dtype).kind == "f":
            arr = arr.astype(ty.dtype)
        else:
            raise InputError(f"{path}: input '{param.name}' expects {ty.dtype}, the data is {arr.dtype}")

    def fits(shape) -> bool:
        return len(shape) == len(want) and all(not isinstance(d, int) or d == s for d, s in zip(want, shape))

    if fits(arr.shape):
        return [arr]
    if arr.ndim == len(want) + 1 and fits(arr.shape[1:]):
        return [np.ascontiguousarray(a) for a in arr]
    batch = want[0] if want and isinstance(want[0], int) and want[0] > 0 else None
    if batch and arr.ndim == len(want) and arr.shape[0] % batch == 0 and fits((batch,) + arr.shape[1:]):
        return [np.ascontiguousarray(arr[i:i + batch]) for i in range(0, arr.shape[0], batch)]
    raise InputError(f"{path}: input '{param.name}' has shape {list(want)}; the data's shape {list(arr.shape)} is "
                     "neither that, nor samples of it stacked along a new first axis or, in batches of the "
                     "model's, along the batch axis")


# --- ranges -----------------------------------------------------------------------------------------------------

def entropy_threshold(hist: np.ndarray, levels: int, step: int = 8) -> int:
    """The number of histogram bins to keep (the clip at their upper edge) that minimizes KL(P || Q), P the
    histogram clipped there (the outliers folded into its last bin) and Q that range quantized to `levels`
    codes and spread back over P's nonzero bins."""
    hist = hist.astype(np.float64)
    n = len(hist)
    if n <= levels or hist.sum() == 0:
        return n
    best, best_kl = n, np.inf
    for i in list(range(levels, n, step)) + [n]:
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        nonzero = hist[:i] > 0
        starts = (np.arange(levels) * i) // levels
        merged = np.add.reduceat(hist[:i], starts)
        counts = np.add.reduceat(nonzero.astype(np.float64), starts)
        owner = np.repeat(np.arange(levels), np.diff(np.append(starts, i)))
        q = np.where(nonzero, (merged / np.maximum(counts, 1))[owner], 0.0)
        p /= p.sum()
        q_sum = q.sum()
        if q_sum == 0:
            continue
        q /= q_sum
        m = p > 0
        kl = float(np.sum(p[m] * np.log(p[m] / np.maximum(q[m], 1e-12))))
        if kl < best_kl:
            best, best_kl = i, kl
    return best


class _Observer:
    """min, max and a histogram of |x| for one tensor, over all samples."""

    def __init__(self) -> None:
        self.lo, self.hi = np.inf, -np.inf
        self.hist: np.ndarray | None = None
        self.finite = True

    def extent(self, x: np.ndarray) -> None:
        if not np.isfinite(x).all():
            self.finite = False
            x = x[np.isfinite(x)]
        if x.size:
            self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))

    @property
    def amax(self) -> float:
        return max(abs(self.lo), abs(self.hi), 1e-30)

    def bin(self, x: np.ndarray) -> None:
        # exact zeros (a ReLU's, padding) left out: zero is a code whatever the clip, and their spike in the
        # first bin, spread over its quantization step, would push the entropy search towards tight clips
        x = x[np.isfinite(x) & (x != 0)]
        h, _ = np.histogram(np.abs(x), bins=BINS, range=(0.0, self.amax))
        self.hist = h if self.hist is None else self.hist + h

    def range(self, method: str, percentile: float) -> tuple[float, float]:
        if method == "minmax" or self.hist is None:
            return self.lo, self.hi
        width = self.amax / BINS
        if method == "percentile":
            cdf = np.cumsum(self.hist) / max(self.hist.sum(), 1)
            t = (int(np.searchsorted(cdf, percentile / 100.0)) + 1) * width
        else:
            t = entropy_threshold(self.hist, 255 if self.lo >= 0 else 128) * width
        return max(self.lo, -t), min(self.hi, t)


def graph_before_quantize(model, options=None):
    """The model's graph as `passes/quantize.py` sees it in the driver's pipeline (opt level 2)."""
    from kiln.codegen.target import resolve_target
    from kiln.config import Options
    from kiln.driver import prepare
    from kiln.frontend import from_onnx
    from kiln.passes import LEVELS, run
    from kiln.passes.quantize import quantize

    options = (options or Options()).with_(precision="fp32", calibration=None, opt_level=2, dump_dir=None)
    mod = prepare(from_onnx(model, input_shapes=options.input_shapes), resolve_target(options.target), options)
    return run(mod, LEVELS[2][:LEVELS[2].index(quantize)], verify=False)


def quantized_reference(model, table: Mapping[str, tuple[float, float]], options=None):
    """The QDQ graph an int8 build computes, for the NumPy interpreter (`kiln.ir.run_module`): what an int8
    artifact must match, to a quantization step where its exact integer sum and the float one round apart."""
    from kiln.passes.quantize import quantize

    return quantize(graph_before_quantize(model, options).with_attrs(calibration=dict(table)))


def calibrate(model, data: str | Path | Sequence[Sequence[np.ndarray]], options=None, method: str = "percentile",
              percentile: float = PERCENTILE) -> Calibration:
    """Calibrate `model` (an .onnx path or ModelProto) on `data` (a path `load_samples` reads, or samples as
    lists of arrays in input order) for `options`' target: the driver's own pipeline, stopped where
    passes/quantize.py runs, names the tensors."""
    import time

    import kiln
    from kiln.config import Options
    from kiln.ir import Function, Tuple
    from kiln.passes.quantize import calibration_points

    if method not in METHODS:
        raise KilnError(f"calibration method must be one of {', '.join(METHODS)}, got {method!r}")
    t0 = time.perf_counter()
    options = (options or Options()).with_(precision="fp32", calibration=None, opt_level=2, dump_dir=None)
    graph = graph_before_quantize(model, options)
    samples = load_samples(data, graph.main.params) if isinstance(data, (str, Path)) else [list(s) for s in data]
    if not samples:
        raise InputError("calibration needs at least one sample")
    points = calibration_points(graph)
    tensors, index = [], {}
    for p in points:
        if id(p.tensor) not in index:
            index[id(p.tensor)] = len(tensors)
            tensors.append(p.tensor)
    body = graph.main.body
    outputs = list(body.fields) if isinstance(body, Tuple) else [body]
    names = graph.output_names + [f"calibration{i}" for i in range(len(tensors))]
    observe = graph.with_main(Function(graph.main.params, Tuple(tuple(outputs + tensors)), graph.main.attrs))
    observe = observe.with_attrs(output_names=names)
    observers = [_Observer() for _ in tensors]
    reference: list[list[np.ndarray]] = []
    with tempfile.TemporaryDirectory(prefix="kiln-calibrate-") as tmp:
        kiln.compile(observe, Path(tmp) / "observe.so", options)
        m = kiln.load(Path(tmp) / "observe.so")
        for s in samples:
            got = m.run(*s)
            reference.append([np.array(a) for a in got[:len(outputs)]])
            for o, a in zip(observers, got[len(outputs):]):
                o.extent(a)
        if method != "minmax":
            for s in samples:
                for o, a in zip(observers, m.run(*s)[len(outputs):]):
                    o.bin(a)
    ranges, observed = {}, {}
    for p in points:
        o = observers[index[id(p.tensor)]]
        if not np.isfinite([o.lo, o.hi]).all():
            log.warning("calibration: %s saw no finite value; it stays float32", p.key)
            continue
        if not o.finite:
            log.warning("calibration: %s saw NaN or Inf; its range covers the finite values", p.key)
        ranges[p.key] = tuple(float(v) for v in o.range(method, percentile))
        observed[p.key] = (o.lo, o.hi)
    table = CalibrationTable(ranges, method, len(samples), str(graph.attrs.get("name", "model")), observed)
    return Calibration(table, samples, reference, time.perf_counter() - t0)


# --- accuracy ---------------------------------------------------------------------------------------------------

@dataclass
class Agreement:
    """An int8 build against the float32 one on the same samples, per output."""

    name: str
    sqnr_db: float  # 10·log10(Σ ref² / Σ (ref − int8)²) over all samples
    max_abs: float
    top1: tuple[int, int] | None  # samples whose argmax over the last axis agrees, of all; None if not logits

    def __str__(self) -> str:
        top = f", top-1 agrees on {self.top1[0]} of {self.top1[1]}" if self.top1 else ""
        return f"{self.name}: SQNR {self.sqnr_db:.1f} dB, max |error| {self.max_abs:.3g}{top}"


def agreement(names: Sequence[str], reference: Sequence[Sequence[np.ndarray]],
              got: Sequence[Sequence[np.ndarray]]) -> list[Agreement]:
    out = []
    for j, name in enumerate(names):
        ref = [np.asarray(r[j], np.float64) for r in reference]
        new = [np.asarray(g[j], np.float64) for g in got]
        signal = sum(float(np.sum(r * r)) for r in ref)
        noise = sum(float(np.sum((r - g) ** 2)) for r, g in zip(ref, new))
        sqnr = np.inf if noise == 0 else 10 * np.log10(max(signal, 1e-300) / noise)
        worst = max(float(np.max(np.abs(r - g))) if r.size else 0.0 for r, g in zip(ref, new))
        top1 = None
        classes = [r.squeeze() for r in ref]  # [1, 1000, 1, 1] (SqueezeNet's) is logits too
        if classes[0].ndim in (1, 2) and classes[0].shape[-1] > 1 and classes[0].size // classes[0].shape[-1] <= 64:
            hits = sum(int(np.array_equal(c.argmax(axis=-1), g.reshape(c.shape).argmax(axis=-1)))
                       for c, g in zip(classes, new))
            top1 = (hits, len(ref))
        out.append(Agreement(name, float(sqnr), worst, top1))
    return out
