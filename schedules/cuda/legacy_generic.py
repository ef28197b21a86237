"""TRANSITIONAL: registers the CUDA generic schedule under the template interface until cuda/ is ported."""

from kiln.schedules.space import Space
from kiln.schedules.template import Template
from kiln.schedules.workload import Workload

from . import generic


def _schedule(sch, wl, cfg):
    raise NotImplementedError("transitional: codegen/lower.py schedules CUDA groups through schedules/cuda")


TEMPLATE = Template("cuda.generic", 1, "cuda", applies=lambda g: True,
                    workload=lambda g, i: Workload.of("cuda.generic@1", g), space=lambda wl, i: Space.of(),
                    default=lambda wl, i: {}, schedule=lambda sch, wl, cfg: [], priority=-100)
