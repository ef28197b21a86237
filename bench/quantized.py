"""Benchmark: zoo models quantized by ONNX Runtime's own tools, compiled by Kiln, against ONNX Runtime's int8 kernels.

    python bench/quantized.py [--only mobilenet_v2 resnet50] [--per-channel] [--rounds 15] [--threads 2]

Each CNN goes through `quant_pre_process` and `quantize_static` (QDQ format, uint8 activations, int8 weights,
calibrated on four seeded inputs), the BERT layer through `quantize_dynamic` (DynamicQuantizeLinear +
MatMulInteger, int8 weights), as a user of ONNX Runtime quantizes each. Then, in one process and in
alternating rounds (a pause before each block, so the two thread pools do not spin against each other):
ONNX Runtime on the quantized model, Kiln on the quantized model, and both on the float model. Prints the
per-round medians, the quantized ratio's median over rounds, the top-1 agreement and the largest output
difference between the engines. Kiln's int8 convs need AVX-512 VNNI (`native` on such a host); elsewhere the
quantized model runs its float path and the table says so.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

MODELS = ["mobilenet_v2", "resnet50", "squeezenet", "resnet18", "bert_layer"]
DYNAMIC = {"bert_layer"}  # transformers: `quantize_dynamic`, as ONNX Runtime's docs recommend for them


def quantize(name: str, out_dir: Path, per_channel: bool, signed: bool = False, samples: int = 4) -> tuple[Path, Path]:
    """(float model, its QDQ quantization), written under out_dir."""
    import onnx
    from onnx import helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from kiln import zoo

    proto = zoo.resolve(f"zoo:{name}")
    proto = proto if isinstance(proto, onnx.ModelProto) else onnx.load(proto)
    if proto.ir_version < 4:  # initializers must be graph inputs too for ONNX's version converter (opset 9 zoo)
        listed = {i.name for i in proto.graph.input}
        proto.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                                 for t in proto.graph.initializer if t.name not in listed)
        proto = onnx.version_converter.convert_version(proto, 13)
    fp32, pre, q = out_dir / f"{name}.onnx", out_dir / f"{name}.pre.onnx", out_dir / f"{name}.qdq.onnx"
    onnx.save(proto, fp32)
    if name in DYNAMIC:
        from onnxruntime.quantization import quantize_dynamic

        quantize_dynamic(str(fp32), str(q), weight_type=QuantType.QInt8, per_channel=per_channel)
        return fp32, q
    quant_pre_process(str(fp32), str(pre))

    class Feeds(CalibrationDataReader):
        def __init__(self):
            self.it = iter([zoo.feeds(proto, seed=s) for s in range(samples)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(pre), str(q), Feeds(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8 if signed else QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=per_channel)
    return fp32, q


def int8_kernels() -> str:
    """Which int8 kernels this host's `native` target gets (what the Kiln int8 column measures)."""
    from kiln.codegen.target import resolve_target
    from kiln.schedules.target_info import target_info
    from kiln.schedules.x86.qconv2d_nchwc import dot_kind

    kind = dot_kind(target_info(resolve_target("native")))
    return {"vnni": "on (AVX-512 VNNI)", "madd": "on (AVX2 vpmaddubsw: 7-bit weights only)",
            "sdot": "on (sdot)"}.get(kind, "off")


def ort_sessions(models: dict[str, Path], threads: int) -> dict:
    """name → an ONNX Runtime CPU session of that model, on `threads` intra-op threads (as Kiln gets)."""
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads = threads, 1
    return {k: ort.InferenceSession(str(p), o, providers=["CPUExecutionProvider"]) for k, p in models.items()}


def time_rounds(fns: dict, rounds: int, per_block: int = 5) -> dict[str, list[float]]:
    from kiln.runtime.timing import time_ms

    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            time.sleep(0.3)
            out[k].append(float(np.median(time_ms(fn, per_block, 1))))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--per-channel", action="store_true", help="per-channel weight scales")
    ap.add_argument("--int8-activations", action="store_true", help="signed (int8) activations, not uint8")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    import onnx

    import kiln
    from kiln import zoo
    from kiln.bench import cpu_name

    print(f"{cpu_name()}, {args.threads} threads; int8 kernels {int8_kernels()}; "
          f"{'per-channel' if args.per_channel else 'per-tensor'} weight scales, "
          f"{'int8' if args.int8_activations else 'uint8'} activations; {args.rounds} rounds")
    print(f"{'model':14s} {'ORT int8':>9s} {'Kiln int8':>10s} {'ratio':>6s} {'ORT fp32':>9s} {'Kiln fp32':>10s} "
          f"{'top-1':>6s} {'max |diff|':>10s}")
    work = Path(tempfile.mkdtemp(prefix="kiln-quantized-"))
    failed = False
    for name in args.only or MODELS:
        fp32, q = quantize(name, work, args.per_channel, args.int8_activations)
        feeds = zoo.feeds(onnx.load(fp32), seed=0)
        sess = ort_sessions({"q": q, "f": fp32}, args.threads)
        mods = {k: kiln.load(kiln.compile(str(p), work / f"{name}.{k}.so").path, num_threads=args.threads)
                for k, p in (("q", q), ("f", fp32))}
        want, got = sess["q"].run(None, feeds)[0], mods["q"].run(**feeds)[0]
        top1 = bool(np.all(np.argmax(want.reshape(want.shape[0], -1), 1) == np.argmax(got.reshape(got.shape[0], -1), 1)))
        failed |= not top1
        t = time_rounds({"ort_q": lambda: sess["q"].run(None, feeds), "kiln_q": lambda: mods["q"].run(**feeds),
                         "ort_f": lambda: sess["f"].run(None, feeds), "kiln_f": lambda: mods["f"].run(**feeds)},
                        args.rounds)
        ratio = float(np.median(np.array(t["kiln_q"]) / np.array(t["ort_q"])))
        med = {k: float(np.median(v)) for k, v in t.items()}
        print(f"{name:14s} {med['ort_q']:7.2f}ms {med['kiln_q']:8.2f}ms {ratio:6.2f} {med['ort_f']:7.2f}ms "
              f"{med['kiln_f']:8.2f}ms {str(top1):>6s} {float(np.abs(want - got).max()):10.3g}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
