"""NaN and Inf propagation: the twelve benchmark models on poisoned inputs, Kiln against ONNX Runtime.

    python bench/nan_propagation.py [--target native] [--only squeezenet ...]

Each model's float input gets one of four poisons (one NaN element in the middle, all NaN, all +inf, all 1e38);
both engines run it, and per output the table counts NaN elements in ONNX Runtime's result, in Kiln's, the ones
ONNX Runtime has and Kiln misses (`missing`, the silent wrong answers; must be 0), and Kiln's extra NaNs (ONNX
Runtime's max pooling and ReduceMax skip a NaN depending on where it sits in the window; Kiln propagates it).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

MODELS = ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet", "squeezenet",
          "vgg19", "zfnet512", "mobilenet_v2", "resnet18", "bert_layer"]
POISONS = ["one_nan", "all_nan", "pos_inf", "big_1e38"]


def poison(x: np.ndarray, kind: str) -> np.ndarray:
    x = x.copy()
    if kind == "one_nan":
        x[tuple(d // 2 for d in x.shape)] = np.nan
    else:
        x[...] = {"all_nan": np.nan, "pos_inf": np.inf, "big_1e38": 1e38}[kind]
    return x


def sweep(name: str, target: str = "native", workdir: Path | None = None) -> list[dict]:
    """One row per poison: NaN counts of Kiln and ONNX Runtime over all outputs, and how they differ."""
    import onnx
    import onnxruntime as ort

    import kiln
    from kiln import zoo
    from kiln.config import Options

    proto = zoo.resolve(f"zoo:{name}")
    proto = proto if isinstance(proto, onnx.ModelProto) else onnx.load(proto)
    feeds = zoo.feeds(proto, seed=0)
    first = next(k for k, v in feeds.items() if v.dtype.kind == "f")
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory(prefix="kiln-nan-", dir=workdir) as tmp:
        model = kiln.load(kiln.compile(proto, Path(tmp) / "model.so", Options(target=target)).path)
        rows = []
        for kind in POISONS:
            bad = {**feeds, first: poison(feeds[first], kind)}
            want = sess.run(None, bad)
            got = model.run(**bad)
            got = list(got) if isinstance(got, (list, tuple)) else [got]
            w = np.concatenate([np.isnan(o).ravel() for o in want])
            g = np.concatenate([np.isnan(o).ravel() for o in got])
            rows.append({"model": name, "input": kind, "size": int(w.size), "ort_nan": int(w.sum()),
                         "kiln_nan": int(g.sum()), "missing": int((w & ~g).sum()), "extra": int((g & ~w).sum())})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="native")
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args(argv)
    print("| model | input | outputs | ORT NaN | Kiln NaN | missing | extra |")
    print("|---|---|---:|---:|---:|---:|---:|")
    missing = 0
    for name in args.only or MODELS:
        for r in sweep(name, args.target):
            missing += r["missing"]
            print(f"| {r['model']} | {r['input']} | {r['size']} | {r['ort_nan']} | {r['kiln_nan']} | "
                  f"{r['missing']} | {r['extra']} |", flush=True)
    return 0 if missing == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
