"""`kiln tune`: a model's tasks tuned into a records log, then the whole model compiled with the best configs
and timed end to end against the defaults, in one process. The tuned artifact is kept only when it is faster;
otherwise the default one is written and the log says so.

    >>> result = kiln.tuning.tune_model("model.onnx", "tuning_logs/znver3/model.jsonl",   # doctest: +SKIP
    ...                                 TuneOptions(trials=2000), Options(target="native"))
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import kiln
from kiln.autotune.records import Record, RecordWriter, best_configs, config_id, read_records
from kiln.autotune.runner import LocalRunner
from kiln.autotune.tune import TuneEvent, TuneOptions, TuneResult, tune
from kiln.codegen.target import resolve_target
from kiln.config import Options
from kiln.driver import model_tasks
from kiln.errors import KilnError
from kiln.runtime.timing import interleaved_ms, runs_per_block

log = logging.getLogger(__name__)

PAUSE_S = 0.5  # between timing blocks, so one model's thread pool is idle while the other runs
END_TO_END_ROUNDS = 7  # alternating blocks of default and tuned in the final A/B
ROUNDS_TO_KEEP = 5  # the tuned model must win at least this many of them (a one-sided sign test: p = 0.23 by chance)
BLOCK_S = 0.25  # each A/B block at least this long: ShuffleNet's tuned build lost rounds of 2 runs (5 ms) to noise


@dataclass
class ModelTuneResult:
    tune: TuneResult
    default_ms: float = math.nan  # whole model, default configs (a --task run: the log's configs before it)
    tuned_ms: float = math.nan  # whole model, the log's best configs
    kept: str = ""  # "tuned" or "default": what was written to `output`
    baseline: str = "default"  # what "default" was: the template defaults, or (a --task run) "the log before"
    rounds_won: tuple[int, int] = (0, 0)  # interleaved rounds in which the tuned model was faster, of all
    curves: list[Path] = field(default_factory=list)


def tune_model(model, log_path: str | Path, tune_options: TuneOptions | None = None, options: Options | None = None,
               *, runner=None, output: str | Path | None = None, plot_dir: str | Path | None = None,
               on_round: Callable[[TuneEvent], None] | None = None, repeat: int = 20,
               timing: str = "model", only: Sequence[str] = (), ab_rounds: int = END_TO_END_ROUNDS) -> ModelTuneResult:
    """`timing="model"` (local runs): candidates are timed inside the model compiled with the default configs
    (autotune/context.py); `"alone"`: each kernel alone, caches flushed. A given `runner` is used as it is.
    `only`: tune just the tasks whose workload key contains one of these strings (a template whose space grew
    re-searched without re-searching the rest); the others keep what the log says, in the end-to-end A/B too.
    `ab_rounds`: rounds of that A/B (the tuned model must win ROUNDS_TO_KEEP in END_TO_END_ROUNDS of them)."""
    import onnx

    if timing not in ("model", "alone"):
        raise KilnError(f"timing {timing!r}: expected 'model' or 'alone'")
    if ab_rounds < 3:
        raise KilnError(f"ab_rounds {ab_rounds}: the end-to-end A/B needs at least 3 rounds")
    options = options or Options()
    tune_options = tune_options or TuneOptions()
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(model)
    tasks = model_tasks(proto, options)
    if only:
        tasks = [t for t in tasks if any(o in t.key for o in only)]
        if not tasks:
            raise KilnError(f"no task's workload key contains any of {list(only)}")
    local = runner is None or isinstance(runner, LocalRunner)  # a remote device's model is not timed here
    # a --task run asks whether its tasks' new configs beat what the log gave them, with the rest of the model
    # as the log has it: against the template defaults everywhere, ShuffleNet's other tuned tasks (1.17x) would
    # carry any config of the searched one through the end-to-end A/B
    prior = (best_configs(read_records([log_path], resolve_target(options.target)))
             if only and Path(log_path).exists() else None)
    with tempfile.TemporaryDirectory(prefix="kiln-tune-") as tmp:
        plain = None
        if local:
            plain = kiln.compile(proto, Path(tmp) / "default.so", _untuned(options)).path
        if runner is None:
            runner = LocalRunner(context=plain if timing == "model" else None)
        result = ModelTuneResult(tune(tasks, log_path, tune_options, runner=runner, on_round=on_round))
        if plot_dir is not None:
            result.curves = plot_curves(result.tune, Path(plot_dir), Path(log_path).name.removesuffix(".jsonl"))
        if plain is not None:
            _end_to_end(proto, plain, log_path, options, result, output, repeat, Path(tmp), prior, ab_rounds)
    return result


def _untuned(options: Options) -> Options:
    return Options(**{**vars(options), "configs": {}, "shipped_logs": False, "tuning_logs": ()})


def _end_to_end(proto, plain: Path, log_path, options: Options, result: ModelTuneResult, output, repeat: int,
                tmp: Path, prior: dict | None = None, rounds: int = END_TO_END_ROUNDS) -> None:
    """Compile with the log's best configs, time it and the default interleaved, keep the faster. With `prior`
    (a --task run on a log: the configs the log applied before it), the default is the model built with those,
    and the tuned one differs from it only in the searched tasks."""
    from kiln.zoo import feeds as random_feeds

    target = resolve_target(options.target)
    tuned_configs = best_configs(read_records([log_path], target), decisions=False)
    if prior is not None:
        searched = {s.task.key for s in result.tune.states}
        tuned_configs = {**prior, **{k: c for k, c in tuned_configs.items() if k in searched}}
        plain = kiln.compile(proto, tmp / "before.so", Options(**{**vars(_untuned(options)), "configs": prior})).path
        result.baseline = "the log before this run"
    tuned = kiln.compile(proto, tmp / "tuned.so", Options(**{**vars(options), "configs": tuned_configs})).path
    models = {"default": kiln.load(plain), "tuned": kiln.load(tuned)}
    # the shapes the artifact was built for: a symbolic dim bound by --input-shape is not in the proto
    feeds = random_feeds(proto, seed=0, shapes={t.name: t.shape for t in models["default"].inputs})
    want = models["default"].run(**feeds)
    got = models["tuned"].run(**feeds)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-3, err_msg="the tuned model's outputs differ")
    per_block = runs_per_block(lambda: models["default"].run(**feeds), repeat // END_TO_END_ROUNDS, BLOCK_S)
    times = interleaved_ms({name: (lambda m=m: m.run(**feeds)) for name, m in models.items()},
                           per_block, rounds=rounds, warmup=1, pause_s=PAUSE_S)
    result.default_ms = float(np.median(times["default"]))
    result.tuned_ms = float(np.median(times["tuned"]))
    result.kept, wins = keep_tuned(times["default"], times["tuned"], rounds)
    result.rounds_won = (wins, rounds)
    if result.kept == "default":
        log.warning("the tuned model (%.3f ms, faster in %d of %d rounds) is not reliably faster than the default "
                    "(%.3f ms) end to end: the default is kept", result.tuned_ms, wins, rounds,
                    result.default_ms)
    _record_decision(log_path, result, tuned_configs, prior or {})
    if output is not None:
        src = tuned if result.kept == "tuned" else plain
        Path(output).write_bytes(Path(src).read_bytes())


def _record_decision(log_path, result: ModelTuneResult, tuned_configs: dict, prior: dict) -> None:
    """One record per task of the config the end-to-end A/B kept (the default's when it kept the default; in a
    --task run, what the log gave the task before), so that `kiln compile --tuning-log` (and a shipped log)
    applies what the A/B chose, not each kernel's lone best. Marked `replay: skip`: a resumed search does not
    count it as a trial."""
    writer = RecordWriter(log_path)
    try:
        for s in result.tune.states:
            default = s.task.default()
            before = prior.get(s.task.key, default)
            config = tuned_configs.get(s.task.key, default) if result.kept == "tuned" else before
            cost = (s.default_cost_s if config_id(config) == config_id(default) else
                    s.best_cost_s if s.best_config is not None and config_id(config) == config_id(s.best_config)
                    else math.nan)  # the log's earlier config, not timed in this run's A/B
            writer.write(Record.measured(s.task.template, s.task.workload, s.task.target, config,
                                         [cost] if math.isfinite(cost) else [], None,
                                         end_to_end=result.kept, replay="skip", default_ms=round(result.default_ms, 4),
                                         tuned_ms=round(result.tuned_ms, 4), rounds_won=list(result.rounds_won)))
    finally:
        writer.close()


def keep_tuned(default_ms: np.ndarray, tuned_ms: np.ndarray, rounds: int) -> tuple[str, int]:
    """("tuned" or "default", rounds the tuned model won) from interleaved samples, `rounds` equal blocks each.
    The tuned model must be faster in the median and in ROUNDS_TO_KEEP of the paired rounds (scaled to
    `rounds`): on a VM where one artifact loaded twice differs by 7%, the median alone keeps a tuned model that
    is no faster about half the time when the two are close."""
    by_round = [np.median(a.reshape(rounds, -1), axis=1) for a in (default_ms, tuned_ms)]
    wins = int(np.sum(by_round[1] < by_round[0]))
    need = math.ceil(ROUNDS_TO_KEEP * rounds / END_TO_END_ROUNDS)
    faster = float(np.median(tuned_ms)) < float(np.median(default_ms)) and wins >= need
    return ("tuned" if faster else "default"), wins


def plot_curves(result: TuneResult, folder: Path, name: str = "") -> list[Path]:
    """One PNG per task (best GFLOPS against trials) and one for the model (estimated run time against trials),
    named `<name>-task00.png`, `<name>-model.png`: tuning several models into one folder keeps every curve."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise KilnError("--plot draws with matplotlib: pip install 'kiln[tune]'") from None
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, s in enumerate(result.states):
        xs = [t for t, c in s.history if math.isfinite(c)]
        ys = [s.task.flops / c / 1e9 for t, c in s.history if math.isfinite(c)]
        if not xs:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.step(xs, ys, where="post")
        ax.set_xlabel("trials")
        ax.set_ylabel("best GFLOPS")
        ax.set_title(f"task {i}: {s.task.workload.template} ×{s.task.count}", fontsize=9)
        fig.tight_layout()
        path = folder / f"{name}{'-' if name else ''}task{i:02d}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    if result.model_history:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.step([t for t, _ in result.model_history], [e * 1e3 for _, e in result.model_history], where="post")
        ax.set_xlabel("trials")
        ax.set_ylabel("kernels summed, ms (estimate)")
        ax.set_title(f"{name or 'model'}: kernels summed", fontsize=9)
        fig.tight_layout()
        path = folder / f"{name}{'-' if name else ''}model.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
