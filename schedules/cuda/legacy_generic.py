"""TRANSITIONAL: registers the CUDA generic schedule under the template interface until cuda/ is ported."""

from kiln.schedules.space import Space
from kiln.schedules.template import Template
from kiln.schedules.workload import Workload


TEMPLATE = Template("cuda.legacy", 1, "cuda", applies=lambda g: True,
                    workload=lambda g, i: Workload.of("cuda.legacy@1", g), space=lambda wl, i: Space.of(),
                    default=lambda wl, i: {}, schedule=lambda sch, wl, cfg: [], priority=-100)
