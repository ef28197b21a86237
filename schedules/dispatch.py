"""Schedule one fused group: find its template, make its workload, pick the config (the one given for its
workload key, else the template's default), apply it.

Only an `InvalidConfig` (a given config the template cannot build here) falls back, to the default config. Any
other exception from a template is a template bug: it is logged at WARNING and warned as a
`TemplateFallbackWarning` (which the test suite turns into an error), and the group gets the generic schedule,
so a user's compile still succeeds, only slower.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kiln.ir import Function

from kiln.errors import InvalidConfig, ScheduleError, TemplateFallbackWarning

from .space import Config
from .target_info import target_info
from .template import Template, find, templates
from .workload import Group, Workload

log = logging.getLogger(__name__)


@dataclass
class Scheduled:
    prim_func: Any  # the scheduled tirx.PrimFunc
    steps: str  # the schedule steps applied, for --explain and profiles
    template: str  # name@version of the template that scheduled it
    workload: Workload
    config: Config
    source: str  # "default", "given" (a config passed in, from a record or the tuner), or "fallback: why"


def task_of(fn: Function, target) -> tuple[Template, Workload]:
    """The template that schedules this group on `target`, and the group's workload under it."""
    info = target_info(target)
    group = Group(fn)
    template = find(group, info)
    return template, template.workload(group, info)


def schedule_group(prim, fn: Function, target, configs: Mapping[str, Config] | None = None,
                   rebuild: Callable[[int], Any] | None = None) -> Scheduled:
    """Schedule `prim` (the group's TE compute as a PrimFunc) with the config filed under its workload key in
    `configs`, or the template's default. A config whose template computes a pointwise conv over a padded plane
    (`Template.padded_plane`) schedules `rebuild(plane)`, the group's compute built that way, instead."""
    from tvm import s_tir

    info = target_info(target)
    group = Group(fn)
    template, wl = task_of(fn, target)
    fixed = dict(template.graph_knobs(group))
    given = (configs or {}).get(wl.key)
    source = "default"
    cfg: Config | None = None
    if given is not None:
        space = template.space(wl, info)
        if given not in space and template.added_knobs:
            # a config written before the template gained knobs (as a record would be read): those knobs at
            # the values that build the kernel it named
            given = space.upgrade(given, {k: v for k, v in template.added_knobs.items() if k not in given}) or given
        if given in space and all(given.get(k) == v for k, v in fixed.items()):
            cfg, source = dict(given), "given"
        else:
            log.warning("%s: config %s is not in its space (or disagrees with the graph's %s); default used",
                        wl.key, given, fixed)
            source = "default (given config not in the space)"
    if cfg is None:
        cfg = template.default_config(wl, info, fixed)

    def compute_for(cfg: Config):
        plane = template.padded_plane(wl, cfg)
        if not plane:
            return prim
        if rebuild is None:
            raise ScheduleError(f"{wl.key}: config {cfg} computes the conv over a padded plane; no rebuild given")
        return rebuild(plane)

    try:
        sch = s_tir.Schedule(compute_for(cfg))
        steps = template.schedule(sch, wl, cfg)
    except InvalidConfig as err:
        if source != "given":
            raise  # the default config must build: a template bug
        log.warning("%s: config %s does not build (%s); default used", wl.key, cfg, err)
        cfg, source = template.default_config(wl, info, fixed), "default (given config invalid)"
        sch = s_tir.Schedule(compute_for(cfg))
        steps = template.schedule(sch, wl, cfg)
    except Exception as err:  # noqa: BLE001  (a template bug: logged and warned, never silent)
        why = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        message = f"template {template.key} failed on {' + '.join(group.ops)} ({why}); generic schedule used"
        log.warning(message)
        warnings.warn(message, TemplateFallbackWarning, stacklevel=2)
        generic = templates(info.kind)[-1]
        sch = s_tir.Schedule(prim)
        steps = generic.schedule(sch, generic.workload(group, info), {})  # its own dims (lanes), not the template's
        return Scheduled(sch.mod["main"], "+".join(steps) or "naive", generic.key, wl, cfg, f"fallback: {why}")
    return Scheduled(sch.mod["main"], "+".join(steps) or "naive", template.key, wl, cfg, source)
