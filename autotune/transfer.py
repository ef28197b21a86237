"""Warm-starting a task's cost model from records of other tasks of the same template (transfer learning).

The xgb tuner's own knob encoding is per space: column k is "the k-th value of this task's tile knob", which
means nothing for another shape. Here the columns are named by the template instead: a numeric knob is one
column holding sign·log2(1+|v|) of its value, a string or bool knob one column per value (one-hot), and the
workload's dims (channels, sizes, strides: whatever the template exposes) are columns too, so the trees can learn
how the best tile depends on the shape. Every task of one template then reads the same columns, records of
ResNet-50's convs can rank MobileNetV2's, and computing a vector is a few dict lookups (no lowering), so the
annealer can score thousands of configs a batch.

    featurize, history = transfer(task, read_records(["resnet50.jsonl"], target))
    tuner = XGBTuner(task.space(), featurize=featurize, history=history)   # model-guided from the first batch

Costs are compared only within one task (the ranking model's groups), so records timed in another model, or
alone rather than in a model, still teach the order of configs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from kiln.autotune.records import Record
from kiln.autotune.tasks import Task
from kiln.schedules.space import Config, Space


class TemplateFeatures:
    """Named columns over the knobs of `spaces` and the dims of `dims`, one vector per (config, dims)."""

    def __init__(self, spaces: Iterable[Space], configs: Iterable[Config], dims: Iterable[Mapping]):
        numeric: set[str] = set()
        onehot: set[tuple[str, object]] = set()
        values = [(n, v) for s in spaces for b in s.branches for n, vs in b for v in vs]
        values += [(n, v) for c in configs for n, v in c.items()]
        values += [(f"dim:{n}", v) for d in dims for n, v in _flat(d)]
        for name, v in values:
            if isinstance(v, (str, bool)) or v is None:
                onehot.add((name, v))
            else:
                numeric.add(name)
        self.columns = sorted(numeric) + [f"{n}={v}" for n, v in sorted(onehot, key=repr)]
        self._at = {n: i for i, n in enumerate(sorted(numeric))}
        self._at.update({(n, v): len(numeric) + k for k, (n, v) in enumerate(sorted(onehot, key=repr))})

    def __len__(self) -> int:
        return len(self.columns)

    def vector(self, config: Config, dims: Mapping) -> np.ndarray:
        out = np.zeros(len(self.columns))
        for name, v in [*config.items(), *((f"dim:{n}", v) for n, v in _flat(dims))]:
            if isinstance(v, (str, bool)) or v is None:
                at = self._at.get((name, v))
                if at is not None:
                    out[at] = 1.0
            elif name in self._at:
                out[self._at[name]] = math.copysign(math.log2(1 + abs(float(v))), float(v))
        return out


def transfer(task: Task, records: Sequence[Record]) -> tuple | None:
    """(featurize, history) for the xgb tuner of `task` from the records of other tasks of its template (its own
    records in other logs count too); None when there are none."""
    mine = task.workload.template
    others = [r for r in records if r.workload.template == mine]
    if not others:
        return None
    features = TemplateFeatures([task.space()], [r.config for r in others],
                                [dict(task.workload.dims), *(dict(r.workload.dims) for r in others)])
    dims = dict(task.workload.dims)
    history = [(features.vector(r.config, dict(r.workload.dims)), r.cost_s, r.key) for r in others
               if not r.extra.get("verified")]

    def featurize(cfg: Config) -> np.ndarray:
        return features.vector(cfg, dims)

    return featurize, history


def _flat(dims: Mapping) -> list[tuple[str, object]]:
    """Dims as (name, scalar) pairs: a tuple dim becomes name[0], name[1], ..."""
    out = []
    for n, v in dims.items():
        if isinstance(v, (tuple, list)):
            out += [(f"{n}[{i}]", x) for i, x in enumerate(v)]
        else:
            out.append((n, v))
    return out
