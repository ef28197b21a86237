"""One interface for every schedule template, and the registry that finds them.

A template file under `schedules/<target>/` ends with `TEMPLATE = Template(...)`; the registry imports every
module there, so adding a template is adding one file. For each fused group, the first template of the target's
kind whose `applies(group)` holds (highest `priority` first; the generic schedule last) makes the group's task:

    group ──applies──▶ template ──workload(group, info)──▶ Workload (the task's key)
          ──space(wl, info)──▶ Space ∋ config ◀── default(wl, info) or a tuning record
          ──schedule(sch, wl, config)──▶ the scheduled PrimFunc (one kernel)

`graph_knobs(group)` names knobs the graph has already decided (the conv algorithm, applied by
passes/alter_layout.py from the driver's choice): the config used for the kernel must agree with them.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kiln.errors import ScheduleError

from .space import Config, Space
from .target_info import TargetInfo
from .workload import Group, Workload

TARGET_PACKAGES = {"llvm": "kiln.schedules.x86", "cuda": "kiln.schedules.cuda"}


@dataclass(frozen=True)
class Template:
    name: str  # "<target>.<op>[_<algorithm>]", e.g. "x86.conv2d_nchwc"
    version: int  # bump when a knob changes meaning: older records then stop matching
    kind: str  # the TVM target kind it schedules for: "llvm" (any LLVM CPU) or "cuda"
    applies: Callable[[Group], bool]
    workload: Callable[[Group, TargetInfo], Workload]
    space: Callable[[Workload, TargetInfo], Space]
    default: Callable[..., Config]  # (wl, info[, fixed]) -> a config inside space(wl, info)
    schedule: Callable[[Any, Workload, Config], list[str]]  # (s_tir.Schedule, wl, cfg) -> steps applied
    priority: int = 0
    # whether the target's hardware has what the schedule emits (tensor-core instructions need sm_80); a
    # template that does not is skipped for the next one, never lowered into code the device cannot run
    supports: Callable[[TargetInfo], bool] = field(default=lambda info: True)
    graph_knobs: Callable[[Group], Mapping[str, Any]] = field(default=lambda group: {})
    # (group fn, {knob: value}) -> the group as the graph would have it with those knobs (a conv rewritten to
    # another algorithm), for measuring a config whose graph knobs differ from the model's; None: no graph knobs
    regroup: Callable[[Any, Mapping[str, Any]], Any] | None = None
    # (group fn, {param index: array}) -> the same with inputs that only some values are valid for replaced
    # (Winograd's transformed weights: a random U is no conv's weights, so no reference could check it)
    valid_inputs: Callable[[Any, dict, Any], dict] | None = None
    # knobs added to the space since records were written, each with the value that builds the kernel those
    # records timed (Winograd's tile_k: 1): a record made over the space without them still applies, completed
    # with these values, instead of being skipped as made over another space (autotune/records.py)
    added_knobs: Mapping[str, Any] = field(default_factory=dict)
    # values added to knobs since records were written (AVX2's guarded 3-column conv tile): a record made over
    # the space without them names a kernel today's space still holds, so it applies as it is
    added_values: Mapping[str, tuple] = field(default_factory=dict)
    # (wl, config) -> the plane a pointwise conv's compute is built over for that config (ir/ops/conv.py,
    # `padded_plane`), or 0 for the compute as the op defines it
    padded_plane: Callable[[Workload, Config], int] = field(default=lambda wl, cfg: 0)
    doc: str = ""

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    def __reduce__(self):
        # its callables are lambdas: pickled by key, unpickled as the registered template (a worker process)
        return (template_named, (self.key,))

    def default_config(self, wl: Workload, info: TargetInfo, fixed: Mapping[str, Any] | None = None) -> Config:
        return dict(self.default(wl, info, dict(fixed)) if fixed else self.default(wl, info))


def templates(kind: str) -> list[Template]:
    """Every registered template for a target kind, in matching order."""
    return list(_registry(kind))


def template_named(name: str) -> Template:
    """A template by `name` or `name@version`."""
    bare = name.rsplit("@", 1)[0]
    for kind in TARGET_PACKAGES:
        for t in _registry(kind):
            if t.name == bare:
                return t
    raise ScheduleError(f"no schedule template named {bare!r}")


def find(group: Group, target: str | TargetInfo) -> Template:
    """The first template (by priority) that applies to the group; given a TargetInfo rather than a kind, only
    among those the target's hardware supports."""
    info = target if isinstance(target, TargetInfo) else None
    kind = info.kind if info is not None else target
    for t in _registry(kind):
        if (info is None or t.supports(info)) and t.applies(group):
            return t
    raise ScheduleError(f"no {kind} template applies to the group {' + '.join(group.ops)}")


_REGISTRY: dict[str, tuple[Template, ...]] = {}


def _registry(kind: str) -> tuple[Template, ...]:
    """Import every module of the target's package once and collect their TEMPLATE (or TEMPLATES)."""
    if kind not in _REGISTRY:
        package = TARGET_PACKAGES.get(kind)
        if package is None:
            raise ScheduleError(f"no schedule templates for target kind {kind!r} (known: {', '.join(TARGET_PACKAGES)})")
        pkg = importlib.import_module(package)
        found: list[Template] = []
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
            module = importlib.import_module(f"{package}.{info.name}")
            found += [t for t in (getattr(module, "TEMPLATE", None), *getattr(module, "TEMPLATES", ()))
                      if isinstance(t, Template)]
        names = [t.name for t in found]
        if len(set(names)) != len(names):
            raise AssertionError(f"two templates share a name in {package}: {sorted(names)}")
        _REGISTRY[kind] = tuple(sorted(found, key=lambda t: (-t.priority, t.name)))
    return _REGISTRY[kind]
