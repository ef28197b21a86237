"""Benchmark: how fast each tuner finds a task's best config, replayed on spaces measured exhaustively.

    python bench/tuner_replay.py measure --model zoo:resnet50 --tasks 3 --log replay.jsonl   # every config, timed in the model
    python bench/tuner_replay.py replay --log replay.jsonl [--seeds 20] [--plot DIR]

`measure` times every config of the model's largest conv tasks (default 3, different shapes) inside the model,
as `kiln tune` does, and logs them. `replay` then runs the tuners against that table: a tuner proposes configs
and is told their recorded costs, so each run costs no measurement and every tuner sees the same numbers. For
each task and tuner it prints the median (over seeds) trials to reach the space's best and to come within 2% of
it (and within 5% and 10%: a config timed once in the model varies by about 10%, so the space's single best
measurement is partly luck), for random, xgb (cold), and xgb warm-started from the records of the other tasks (transfer learning), and
writes best-so-far curves. Random search over the whole space is what "random at 1,000 trials" reaches on these
spaces (all have fewer than 1,000 configs).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def measure(args) -> None:
    from kiln.autotune.runner import LocalRunner
    from kiln.autotune.tune import TuneOptions, tune

    import kiln
    from kiln import zoo
    from kiln.config import Options
    from kiln.driver import model_tasks

    proto = zoo.resolve(args.model)
    options = Options(target=args.target, shipped_logs=False)
    tasks = [t for t in model_tasks(proto, options) if t.template.name == "x86.conv2d_nchwc"]
    picked = sorted((t for t in tasks if len(t.space()) <= args.max_configs), key=lambda t: -len(t.space()))
    picked = picked[: args.tasks]
    total = sum(len(t.space()) for t in picked)
    print(f"measuring {total} configs of {len(picked)} tasks: "
          + ", ".join(f"{t.workload.summary()} ({len(t.space())})" for t in picked), flush=True)
    context = Path(args.log).with_suffix(".default.so")
    kiln.compile(proto, context, options)
    runner = LocalRunner(context=context if args.timing == "model" else None)
    tune(picked, args.log, TuneOptions(trials=total, tuner="grid", early_stop=10**9, verify_rounds=0), runner=runner)


def replay(args) -> None:
    from kiln.autotune.records import read_records
    from kiln.autotune.transfer import transfer
    from kiln.autotune.tuners import make_tuner
    from kiln.codegen.target import resolve_target
    from kiln.schedules.template import template_named

    target = resolve_target(args.target)
    records = [r for r in read_records([args.log], target) if not r.extra.get("replay")]
    by_key: dict[str, dict[str, float]] = {}
    for r in records:
        by_key.setdefault(r.key, {})[_cid(r.config)] = r.cost_s
    curves: dict[tuple[str, str], list[list[float]]] = {}
    print(f"| task | configs | tuner | trials to best (median of {args.seeds} seeds) | "
          + " | ".join(f"to within {p:g}%" for p in args.near) + " | best at 64 trials / space best |")
    print("|---|---:|---|---:|" + "---:|" * len(args.near) + "---:|")
    for key, table in by_key.items():
        sample = next(r for r in records if r.key == key)
        task = _Task(template_named(sample.template.split("@")[0]), sample.workload, target)
        space = task.space()
        if len(table) < len(space):
            print(f"{key}: {len(table)} of {len(space)} configs measured; skipped")
            continue
        best = min(table.values())
        others = [r for r in records if r.key != key]
        for name in ("random", "xgb", "xgb+transfer"):
            runs = []
            for seed in range(args.seeds):
                kw = {}
                if name == "xgb+transfer":
                    kw["featurize"], kw["history"] = transfer(task, others)
                tuner = make_tuner(name.split("+")[0], space, seed=seed, **kw)
                trace: list[float] = []
                while not tuner.exhausted():
                    configs = tuner.next_batch(args.batch)
                    if not configs:
                        break
                    costs = [table[_cid(c)] for c in configs]
                    tuner.update(configs, costs)
                    for c in costs:
                        trace.append(min(c, trace[-1]) if trace else c)
                runs.append(trace)
            curves[(key, name)] = runs
            to_best = [next(i + 1 for i, c in enumerate(t) if c <= best) for t in runs]
            near = [[next(i + 1 for i, c in enumerate(t) if c <= best * (1 + p / 100)) for t in runs]
                    for p in args.near]
            at64 = [best / t[min(63, len(t) - 1)] for t in runs]
            print(f"| {_label(sample.workload)} | {len(space)} | {name} | {int(np.median(to_best))} | "
                  + " | ".join(str(int(np.median(n))) for n in near) + f" | {np.median(at64):.3f} |", flush=True)
    if args.plot:
        labels = {r.key: _label(r.workload) for r in records}
        _plot(curves, by_key, labels, Path(args.plot))


class _Task:
    """What the tuners and transfer() read of a task: its template, workload, space."""

    def __init__(self, template, workload, target):
        from kiln.schedules.target_info import target_info

        self.template, self.workload, self.target = template, workload, target
        self._space = template.space(workload, target_info(target))
        self.key = workload.key

    def space(self):
        return self._space


def _label(wl) -> str:
    return (f"{wl['c']}→{wl['oc']} {wl['kh']}x{wl['kw']} {wl['h']}x{wl['w']} s{wl['strides']}"
            if wl.get("kh") is not None else wl.key)


def _cid(cfg) -> str:
    from kiln.autotune.records import config_id

    return config_id(cfg)


def _plot(curves, by_key, labels, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    for i, key in enumerate(by_key):
        best = min(by_key[key].values())
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for (k, name), runs in curves.items():
            if k != key:
                continue
            n = min(len(t) for t in runs)
            ratio = np.median(np.array([[best / c for c in t[:n]] for t in runs]), axis=0)
            ax.plot(np.arange(1, n + 1), ratio, label=name)
        ax.set_xscale("log")
        ax.set_xlabel("trials")
        ax.set_ylabel("best so far / space best (speed)")
        ax.set_title(labels[key], fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / f"replay-task{i}.png", dpi=100)
        plt.close(fig)
        print(f"curve: {folder / f'replay-task{i}.png'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--model", default="zoo:resnet50")
    m.add_argument("--tasks", type=int, default=3, help="the largest conv tasks (distinct workloads)")
    m.add_argument("--max-configs", type=int, default=1000, help="only tasks with at most this many configs")
    m.add_argument("--target", default="native")
    m.add_argument("--timing", choices=("model", "alone"), default="model")
    m.add_argument("--log", required=True)
    r = sub.add_parser("replay")
    r.add_argument("--log", required=True)
    r.add_argument("--target", default="native")
    r.add_argument("--seeds", type=int, default=20)
    r.add_argument("--batch", type=int, default=8)
    r.add_argument("--plot", default=None)
    r.add_argument("--near", nargs="*", type=float, default=[2, 5, 10], help="percent off the space's best")
    args = ap.parse_args(argv)
    measure(args) if args.cmd == "measure" else replay(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
