"""A/B: a model as its tuning log builds it against the same model with some tasks' configs replaced, in
alternating rounds in one process with ONNX Runtime beside both; with --record, a win is appended to the log as
`kiln tune`'s end-to-end decision, so `kiln compile` applies it.

    python bench/config_ab.py zoo:resnet50 --log tuning_logs/znver5/resnet50.jsonl \\
        --set 65eea7599e5bdf07='{"algorithm": "winograd2", "tile_p": 4, "tile_k": 4, "fused": false}' \\
        [--rounds 21] [--record]

Why not `kiln tune --task`: its end-to-end A/B tests the config its per-task A/B picked, and on a shared VM that
A/B can pick a config whose cost swings with the neighbours' use of the L3 (ResNet-50's fused Winograd F(4x4) at
14×14 timed 0.36 ms in one A/B and 1.0 ms in another, docs/tuning.md), while a steadier config that several
whole-model A/Bs favour never meets the model's A/B. This puts a named config to it directly.

The decision rule is `kiln tune`'s (`kiln.tuning.keep_tuned`): faster in the median and in 5 of every 7 rounds.
The record's costs are the replaced task's kernels as the stamped runs timed them in the new build.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="an .onnx file or zoo:<name>")
    ap.add_argument("--log", type=Path, required=True, help="the tuning log the 'before' build applies")
    ap.add_argument("--set", dest="sets", action="append", required=True, metavar="KEY=CONFIG",
                    help="part of a workload key = the config as JSON (repeatable)")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--record", action="store_true", help="append the decision to --log if the new build wins")
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import onnxruntime as ort

    import kiln
    from kiln.autotune.records import Record, RecordWriter, best_configs, read_records
    from kiln.bench import _reference, cpu_name
    from kiln.codegen.target import resolve_target
    from kiln.config import Options
    from kiln.driver import model_tasks
    from kiln.errors import KilnError
    from kiln.runtime.timing import interleaved_ms, ratios_by_round, runs_per_block
    from kiln.tuning import PAUSE_S, keep_tuned

    proto, feeds, sess, want = _reference(args.model, ort, args.threads)
    options = Options(shipped_logs=False)
    target = resolve_target(options.target)
    tasks = model_tasks(proto, options)
    before = best_configs(read_records([args.log], target))
    changed = {}
    for item in args.sets:
        part, _, text = item.partition("=")
        found = [t for t in tasks if part and part in t.key]
        if len(found) != 1:
            raise KilnError(f"--set {part!r}: {len(found)} of the model's tasks have it in their key, expected one")
        config = json.loads(text)
        if config not in found[0].space():
            raise KilnError(f"--set {part!r}: {config} is not in {found[0].key}'s space")
        changed[found[0].key] = (found[0], config)
    after = {**before, **{key: cfg for key, (_, cfg) in changed.items()}}
    with tempfile.TemporaryDirectory(prefix="kiln-ab-") as tmp:
        models = {}
        for name, configs in (("before", before), ("after", after)):
            report = kiln.compile(proto, Path(tmp) / f"{name}.so", Options(shipped_logs=False, configs=configs))
            models[name] = kiln.load(report.path, num_threads=args.threads)
            got = models[name].run(**feeds)
            if not all(np.allclose(g, w, rtol=1e-3, atol=1e-4) for g, w in zip(got, want)):
                raise KilnError(f"the {name} build's outputs differ from ONNX Runtime's")
        runs = {name: (lambda m=m: m.run(**feeds)) for name, m in models.items()}
        runs["ort"] = lambda: sess.run(None, feeds)
        ms = interleaved_ms(runs, runs_per_block(runs["ort"], 5), args.rounds, pause_s=PAUSE_S)
        ratio = ratios_by_round(ms, args.rounds, "ort")
        kept, wins = keep_tuned(ms["before"], ms["after"], args.rounds)
        time.sleep(PAUSE_S)
        stamps = np.median(models["after"].stamped_runs(20, list(feeds.values())), axis=0) / 1e3
        steps = models["after"].meta["steps"]
    print(f"{args.model} on {cpu_name()}, {args.threads} threads, {args.rounds} rounds")
    for name in ("before", "after"):
        r = ratio[name]
        print(f"  {name:7s} {np.median(ms[name]):8.3f} ms  /ort {np.median(r):.3f} ({np.percentile(r, 25):.2f}-"
              f"{np.percentile(r, 75):.2f})")
    print(f"  ort     {np.median(ms['ort']):8.3f} ms; after/before per round {np.median(ratio['after'] / ratio['before']):.3f},"
          f" faster in {wins} of {args.rounds}: keep {'after' if kept == 'tuned' else 'before'}")
    if args.record and kept == "tuned":
        writer = RecordWriter(args.log)
        try:
            for key, (task, config) in changed.items():
                costs = [float(s) for s, step in zip(stamps, steps) if step.get("workload") == key]
                writer.write(Record.measured(task.template, task.workload, task.target, config, costs, None,
                                             end_to_end="tuned", replay="skip",
                                             default_ms=round(float(np.median(ms["before"])), 4),
                                             tuned_ms=round(float(np.median(ms["after"])), 4),
                                             rounds_won=[wins, args.rounds], decided_by="bench/config_ab.py"))
        finally:
            writer.close()
        print(f"  recorded in {args.log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
