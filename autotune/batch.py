"""Tuning on a device reached only in short runs (a GPU host lent for minutes at a time, with TVM's runtime but
no compiler): the search happens here, in rounds, one device run per round.

    export_batch(tasks, log, "batch/", options, size=400)   # here: choose, build, pack candidates + references
    #   carry batch/ there:  python3 batch/device_worker.py batch/ --budget-s 480
    import_results("batch/", log)                            # here: results.jsonl → tuning records in the log
    export_batch(tasks, log, "batch2/", options, size=400)   # the next round starts from everything measured

Each export replays the log into the tuners exactly as a resumed `tune` does, so the XGBoost model of round k+1
is trained on all of rounds 1..k and never proposes a config already measured. A round's candidates are split
over the tasks by the scheduler's expected gain, each task's default first (it is the baseline a tuned config
must beat); the worker interleaves nothing: candidates are grouped by task so each task's arrays load once.

The worker (autotune/device_worker.py, copied into the batch) needs only NumPy, tvm_ffi and TVM's runtime
libraries. Every candidate carries its NumPy reference output and is checked there before it is timed, so a
record imported from a batch is as trustworthy as one measured here. Records name the device the worker saw
(e.g. "NVIDIA H200") in their `cpu` field, the field that keys shipped logs by hardware.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from kiln.autotune import device_worker
from kiln.autotune.builder import LocalBuilder, MeasureInput
from kiln.autotune.measure import COLD_FLUSH_BYTES
from kiln.autotune.records import Record, RecordWriter, _target_dict
from kiln.autotune.runner import device_kind
from kiln.autotune.tasks import Task
from kiln.autotune.tune import TuneOptions, _resume, _state
from kiln.schedules.workload import Group as _Group

FORMAT = 1
# timing on the device: GPU kernels run warm (a model's weights stay in a 50 MB L2 far less than on a CPU, but
# there is no cache flush for device memory in TVM's evaluator); CPU kernels cold, as the local runner does
REFERENCE_SAMPLES = 16384
GPU_TIMING = {"number": 20, "repeat": 5, "min_repeat_ms": 0}
CPU_TIMING = {"number": 1, "repeat": 5, "min_repeat_ms": 0, "flush_bytes": COLD_FLUSH_BYTES}


def export_batch(tasks: Sequence[Task], log_path: str | os.PathLike, folder: str | os.PathLike,
                 options: TuneOptions | None = None, size: int = 256, *, builder: LocalBuilder | None = None,
                 seed: int = 0) -> dict:
    """Choose up to `size` candidates not yet measured in `log_path`, build them into `folder` with their
    inputs and references, and write the manifest and the worker there. Returns the manifest."""
    if not tasks:
        raise ValueError("no tasks to tune")
    options = options or TuneOptions()
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} is not empty: a batch folder holds one batch (results included)")
    (folder / "libs").mkdir(parents=True)
    (folder / "data").mkdir()
    target = tasks[0].target
    states = [_state(t, options, i) for i, t in enumerate(tasks)]
    _resume(states, Path(log_path))
    chosen = _choose(states, size, options.batch)

    own = builder is None
    builder = builder or LocalBuilder(build_dir=str(folder / "libs"))
    try:
        inputs = [MeasureInput(s.task, cfg, check=True) for s, cfgs in chosen for cfg in cfgs]
        builds = builder.build(inputs)
    finally:
        if own:
            builder.close()

    kind = device_kind(target)
    batch_id = uuid.uuid4().hex[:12]
    manifest = {"format": FORMAT, "batch": batch_id, "device": kind, "arch": _arch(target),
                "target": _target_dict(target), "timing": GPU_TIMING if kind != "cpu" else CPU_TIMING,
                "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "tasks": {}, "candidates": [], "build_errors": []}
    data_files: dict[tuple, str] = {}
    n = 0
    for inp, built in zip(inputs, builds):
        task, cfg = inp.task, inp.config
        if task.key not in manifest["tasks"]:
            manifest["tasks"][task.key] = {"template": task.template.key, "workload": task.workload.to_json(),
                                           "space_hash": task.space().digest(), "count": task.count,
                                           "flops": task.flops}
        if built.error is not None or built.path is None:  # recorded now: the device never sees it
            manifest["build_errors"].append({"task": task.key, "config": dict(cfg), "error": built.error,
                                             "build_s": built.build_s})
            continue
        fixed = task.template.graph_knobs(_Group(task.group))
        ident = (task.key, tuple(sorted((k, repr(cfg[k])) for k in fixed if k in cfg)))
        if ident not in data_files:
            data_files[ident] = _write_data(folder, task, cfg, seed, len(data_files))
        data, specs = data_files[ident]
        fn = task.group_for(cfg)
        out = fn.ret_type
        cid = f"c{n}"
        n += 1
        lib = folder / "libs" / f"{cid}.so"
        shutil.move(built.path, lib)
        manifest["candidates"].append({
            "id": cid, "task": task.key, "config": dict(cfg), "lib": f"libs/{cid}.so", "data": data, "inputs": specs,
            "output": {"shape": [int(d) for d in out.shape], "dtype": str(out.dtype)},
            "reference": "ref", "build_s": round(built.build_s, 3)})
    shutil.copy(device_worker.__file__, folder / "device_worker.py")
    (folder / device_worker.MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def import_results(folder: str | os.PathLike, log_path: str | os.PathLike) -> dict:
    """Append the batch's results (and its build errors) to `log_path` as tuning records; a result already
    imported (same batch and candidate id) is skipped, so importing twice changes nothing. Counts."""
    folder = Path(folder)
    manifest = json.loads((folder / device_worker.MANIFEST).read_text())
    results = device_worker.read_results(str(folder))
    log_path = Path(log_path)
    seen = _imported(log_path)
    by_id = {c["id"]: c for c in manifest["candidates"]}
    counts = {"imported": 0, "skipped": 0, "errors": 0, "unknown": 0}
    at = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    with RecordWriter(log_path) as writer:
        for k, e in enumerate(manifest.get("build_errors", [])):
            bid = f"{manifest['batch']}:build{k}"
            if bid in seen:
                counts["skipped"] += 1
                continue
            writer.write(_record(manifest, e["task"], e["config"], [], e["error"], manifest.get("device"), at,
                                 batch_id=bid, build_s=e.get("build_s", 0.0)))
            counts["errors"] += 1
        for row in results:
            cand = by_id.get(row.get("id"))
            if cand is None:
                counts["unknown"] += 1
                continue
            bid = f"{manifest['batch']}:{cand['id']}"
            if bid in seen:
                counts["skipped"] += 1
                continue
            seen.add(bid)
            error = row.get("error")
            costs = [float(c) for c in row.get("costs_s", [])] if error is None else []
            extra = {"batch_id": bid, "build_s": cand.get("build_s", 0.0), "tuner": "batch"}
            if row.get("checked") and error is None:
                extra["check"] = "passed"
            elif error is not None and error.startswith("wrong result"):
                extra["check"] = "failed"
            writer.write(_record(manifest, cand["task"], cand["config"], costs, error,
                                 row.get("device") or manifest.get("device"), at, **extra))
            counts["errors" if error is not None else "imported"] += 1
    return counts


def _record(manifest: dict, key: str, config: dict, costs: list[float], error: str | None, device: str, at: str,
            **extra) -> Record:
    from kiln.schedules.workload import Workload

    t = manifest["tasks"][key]
    return Record(target=manifest["target"], cpu=device, workload=Workload.from_json(t["workload"]),
                  template=t["template"], space_hash=t["space_hash"], config=dict(config), costs_s=costs,
                  error=error, at=at, extra=extra)


def _choose(states, size: int, per_round: int) -> list[tuple[object, list]]:
    """(state, configs) to measure: every unmeasured default first, then rounds of `per_round` given to the
    task of the largest expected gain, discounted by the rounds it already got in this batch (no measurement
    comes back before the batch is done, so the gains cannot move on their own)."""
    chosen: dict[int, list] = {}
    left = size
    for i, s in enumerate(states):
        default = s.task.default()
        if s.trials == 0 and default in s.task.space() and left > 0:
            s.tuner.reserve([default])
            chosen.setdefault(i, []).append(default)
            left -= 1
    given = [0] * len(states)
    while left > 0:
        open_ = [i for i, s in enumerate(states) if not s.tuner.exhausted()]
        if not open_:
            break
        i = max(open_, key=lambda k: states[k].gain() / (1 + given[k]))
        configs = states[i].tuner.next_batch(min(per_round, left))
        if not configs:
            continue
        given[i] += 1
        chosen.setdefault(i, []).extend(configs)
        left -= len(configs)
    return [(states[i], chosen[i]) for i in sorted(chosen)]


def _imported(log_path: Path) -> set[str]:
    """The batch ids of the records a log already holds (lines that do not parse are the reader's business)."""
    seen: set[str] = set()
    if not log_path.exists():
        return seen
    with open(log_path) as f:
        for line in f:
            try:
                bid = json.loads(line).get("batch_id")
            except (json.JSONDecodeError, AttributeError):
                continue
            if bid:
                seen.add(bid)
    return seen


def _write_data(folder: Path, task: Task, cfg: dict, seed: int, k: int) -> tuple[str, list[dict]]:
    """The data file of a task (and graph knobs): its inputs' specs, synthesized there from a seed where they
    can be (float inputs), stored otherwise, and the reference output: whole when small, else REFERENCE_SAMPLES
    elements at random flat indices (a wrong kernel spoils far more than one element in 16k)."""
    fn = task.group_for(cfg)
    rng = np.random.default_rng(seed)
    arrays, specs = [], []
    drawn = None  # the task's own random inputs, made once, for the inputs no seed can stand for
    for i, p in enumerate(fn.params):
        shape, dtype = [int(d) for d in p.type.shape], str(p.type.dtype)
        if dtype in ("float32", "float16", "float64", "bfloat16"):
            arrays.append(_as_dtype(device_worker.synth(shape, dtype, seed * 1000 + i), dtype))
            specs.append({"name": f"in{i}", "dtype": dtype, "shape": shape, "synth": seed * 1000 + i})
        else:
            drawn = task.inputs(cfg, seed) if drawn is None else drawn
            arrays.append(drawn[i])
            specs.append({"name": f"in{i}", "dtype": dtype, "shape": shape})
    if task.template.valid_inputs is not None:
        fixed = task.template.valid_inputs(fn, dict(enumerate(arrays)), rng)
        for i, a in fixed.items():
            if a is not arrays[i]:
                arrays[i] = a
                specs[i] = {k: v for k, v in specs[i].items() if k != "synth"}
    store = {s["name"]: _bits(a) for s, a in zip(specs, arrays) if "synth" not in s}
    ref = np.asarray(task.reference(cfg, arrays))
    if ref.size <= REFERENCE_SAMPLES:
        store["ref"] = _bits(ref)
    else:
        idx = np.sort(rng.choice(ref.size, REFERENCE_SAMPLES, replace=False)).astype(np.int64)
        store["ref_idx"], store["ref_val"] = idx, _bits(ref.reshape(-1)[idx])
    name = f"data/d{k}.npz"
    np.savez(folder / name, **store)
    return name, specs


def _as_dtype(a: np.ndarray, dtype: str) -> np.ndarray:
    """A synthesized array as the interpreter takes it (bfloat16 from its bits)."""
    if dtype == "bfloat16":
        import ml_dtypes

        return a.view(ml_dtypes.bfloat16)
    return a


def _bits(a: np.ndarray) -> np.ndarray:
    """bfloat16 as its uint16 bits (see device_worker.from_bits); everything else as is."""
    return a.view(np.uint16) if str(a.dtype) == "bfloat16" else np.ascontiguousarray(a)


def _arch(target) -> str | None:
    arch = target.attrs.get("arch") if hasattr(target, "attrs") else None
    return str(arch) if arch else None

