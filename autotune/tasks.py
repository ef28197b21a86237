"""A model's tuning tasks: its fused groups, one task per distinct workload key.

A task is what the tuner searches and the runner measures: the template, the workload, one representative
group (kernels with the same key share the config), how many kernels share it, and their FLOPs and weight bytes.
`Task.lower(cfg)` builds the kernel for a config exactly as `kiln.compile` would with that config on record;
knobs the graph decides (a conv's algorithm) are applied to the group first (`Template.regroup`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
from kiln.codegen.lower import LoweredGroup, lower_group
from kiln.ir import Call, Constant, Function, IRModule
from kiln.ir.interpreter import evaluate
from kiln.ir.visitor import post_order
from kiln.schedules.dispatch import task_of
from kiln.schedules.space import Config, Space
from kiln.schedules.target_info import target_info
from kiln.schedules.template import Template
from kiln.schedules.workload import Group, Workload


@dataclass
class Task:
    template: Template
    workload: Workload
    group: Function  # a representative fused group, as the model has it (default graph knobs)
    target: object  # tvm Target
    count: int = 1  # kernels in the model with this workload key
    flops: int = 0  # of one kernel
    weight_bytes: int = 0  # constant inputs of one kernel
    names: list[str] = field(default_factory=list)  # the groups' names (source node spans)

    @property
    def key(self) -> str:
        return self.workload.key

    # A task crosses to builder and runner processes: the template and the group's ops pickle by name (their
    # own __reduce__), the tvm Target as its JSON string.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if not isinstance(state["target"], (str, dict)):
            state["target"] = ("tvm.Target", str(state["target"]))
        return state

    def __setstate__(self, state: dict) -> None:
        target = state["target"]
        if isinstance(target, tuple) and target[:1] == ("tvm.Target",):
            from tvm.target import Target

            state["target"] = Target(json.loads(target[1]))
        self.__dict__.update(state)

    def space(self) -> Space:
        return self.template.space(self.workload, target_info(self.target))

    def default(self) -> Config:
        info = target_info(self.target)
        return self.template.default_config(self.workload, info, self.template.graph_knobs(Group(self.group)))

    def group_for(self, cfg: Config) -> Function:
        """The group with the config's graph knobs applied (a conv's algorithm); the group itself otherwise."""
        fixed = self.template.graph_knobs(Group(self.group))
        wanted = {k: cfg[k] for k in fixed if k in cfg}
        if self.template.regroup is None or all(fixed[k] == v for k, v in wanted.items()):
            return self.group
        return self.template.regroup(self.group, wanted)

    def lower(self, cfg: Config, symbol: str = "main") -> LoweredGroup:
        return lower_group(self.group_for(cfg), symbol, self.target, {self.key: cfg})

    def inputs(self, cfg: Config, seed: int = 0) -> list[np.ndarray]:
        """Random inputs for the kernel of `cfg` (its weights are inputs too), in parameter order."""
        rng = np.random.default_rng(seed)
        fn = self.group_for(cfg)
        out = []
        for p in fn.params:
            shape, dtype = tuple(int(d) for d in p.type.shape), str(p.type.dtype)
            if np.dtype(dtype).kind == "f":
                out.append(rng.standard_normal(shape).astype(dtype))
            elif np.dtype(dtype).kind == "b":
                out.append(rng.random(shape) < 0.5)
            else:
                out.append(rng.integers(0, 4, shape).astype(dtype))
        if self.template.valid_inputs is not None:
            fixed = self.template.valid_inputs(fn, dict(enumerate(out)), rng)
            out = [fixed.get(i, a) for i, a in enumerate(out)]
        return out

    def reference(self, cfg: Config, inputs: list[np.ndarray]) -> np.ndarray:
        """The NumPy reference output of the kernel of `cfg` on `inputs` (the interpreter on its group)."""
        return np.asarray(evaluate(self.group_for(cfg), list(inputs)))


def extract_tasks(mod: IRModule, target) -> list[Task]:
    """The distinct tasks of a fused module (after the pass pipeline), in first-use order."""
    plan = mod.attrs.get("memory_plan")
    views = set(plan.views) if plan is not None else set()
    tasks: dict[str, Task] = {}
    calls = [e for e in post_order(mod.main.body) if isinstance(e, Call)]
    for i, c in enumerate(calls):
        if not isinstance(c.op, Function) or i in views:
            continue
        template, wl = task_of(c.op, target)
        task = tasks.get(wl.key)
        if task is None:
            flops = sum(e.op.count_flops([a.type for a in e.args], e.attrs) for e in Group(c.op).calls)
            weights = sum(a.value.nbytes for a in c.args if isinstance(a, Constant))
            task = tasks[wl.key] = Task(template, wl, c.op, target, 0, flops, weights)
        task.count += 1
        task.names.append(c.span or f"k{i}")
    return list(tasks.values())

