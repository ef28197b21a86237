"""`python -m kiln.rebuild_weights MODEL --target T [the build's options] -o model.weights`: an artifact's
external weights file made again from the model, byte for byte, on a machine without TVM (a GPU machine that
receives only `model.so`: the weights of a zoo model come from seeded code, so they need not travel).

It runs what `kiln.compile` runs before lowering (frontend, the target's graph facts, the passes) and lays the
constants out with build()'s own walk (codegen/weights.layout), then checks the CRC-32 against the artifact's
metadata, read from the file without loading it. Without TVM only CUDA targets can be rebuilt: a CPU target's
graph depends on its SIMD width, which LLVM (inside TVM) knows.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import onnx

from kiln.codegen.target import PRESETS
from kiln.codegen.weights import WeightsLayout, layout
from kiln.config import Options, parse_input_shapes
from kiln.errors import KilnError
from kiln.runtime.artifact import read_meta


@dataclass(frozen=True)
class _Kind:
    name: str


@dataclass(frozen=True)
class GraphTarget:
    """What the graph passes read of a CUDA target (its kind), where TVM's Target is not available."""

    kind: _Kind
    spec: str


def graph_target(spec: str):
    """The tvm Target of `spec` where TVM is installed, else a GraphTarget for a CUDA preset or dict."""
    try:
        import tvm  # noqa: F401
    except ImportError:
        pass
    else:
        from kiln.codegen.target import resolve_target

        return resolve_target(spec)
    import json

    d = PRESETS.get(spec)
    if d is None and spec.strip().startswith("{"):
        d = json.loads(spec)
    if d is None or d.get("kind") != "cuda":
        raise KilnError(f"without TVM, weights can be rebuilt for CUDA targets only, not {spec!r}: a CPU "
                        f"target's graph depends on its SIMD width, which LLVM (in TVM) knows; install apache-tvm")
    return GraphTarget(_Kind("cuda"), spec)


def rebuild(model: str | os.PathLike | onnx.ModelProto, options: Options) -> WeightsLayout:
    """The weights `kiln.compile(model, ..., options, weights="external")` writes, lowering nothing."""
    from kiln.driver import optimize, prepare, tuned_configs
    from kiln.frontend import from_onnx

    target = graph_target(options.target)
    if isinstance(target, GraphTarget) and (options.tuning_logs or options.configs):
        raise KilnError("without TVM, tuning logs cannot be matched to the target; rebuild where TVM is "
                        "installed")
    mod = prepare(from_onnx(model, input_shapes=options.input_shapes), target, options)
    mod, _ = optimize(mod, target, options, tuned_configs(options, target))
    return layout(mod)


def check_against(weights: WeightsLayout, artifact: Path) -> None:
    """The rebuilt weights are the ones the artifact's metadata records (size and CRC-32), or a KilnError."""
    meta = read_meta(artifact)
    want_n, want_crc = meta.get("weights_nbytes", 0), meta.get("weights_crc32")
    if len(weights.blob) != want_n or weights.crc32 != want_crc:
        raise KilnError(f"the rebuilt weights ({len(weights.blob)} bytes, CRC-32 {weights.crc32:#010x}) are "
                        f"not {artifact.name}'s ({want_n} bytes, CRC-32 {(want_crc or 0):#010x}): another model, "
                        f"seed or build options (--target, --opt-level, --input-shape, --precision, tuning logs)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kiln.rebuild_weights", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="an .onnx file, or zoo:<name>")
    p.add_argument("--target", default="native", help="the build's target (a preset or a TVM target dict)")
    p.add_argument("--opt-level", type=int, default=2)
    p.add_argument("--input-shape", action="append", help="name=d0,d1,... (repeatable), as at build")
    p.add_argument("--precision", help="as at build (fp32, tf32, fp16, bf16)")
    p.add_argument("--tuning-log", action="append", type=Path, help="as at build (needs TVM)")
    p.add_argument("--artifact", type=Path, help="the .so to check against (default: the output's .so if any)")
    p.add_argument("-o", "--output", type=Path, default=Path("model.weights"))
    args = p.parse_args(argv)
    from kiln import zoo

    try:
        given = {"target": args.target, "opt_level": args.opt_level, "tuning_logs": tuple(args.tuning_log or ()),
                 "input_shapes": parse_input_shapes(args.input_shape)}
        if args.precision is not None:
            given["precision"] = args.precision
        weights = rebuild(zoo.resolve(args.model), Options.from_env(**given))
        artifact = args.artifact or args.output.with_suffix(".so")
        if artifact.exists() or args.artifact is not None:
            check_against(weights, artifact)
        else:
            print(f"no {artifact} to check the weights against; pass --artifact", file=sys.stderr)
    except KilnError as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return 1
    partial = args.output.with_name(f".{args.output.name}.partial-{os.getpid()}")
    partial.write_bytes(weights.blob)
    os.replace(partial, args.output)
    print(f"wrote {args.output} ({len(weights.blob) / 1e6:.1f} MB, CRC-32 {weights.crc32:#010x})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
