"""The weights blob of a fused module: every constant a kernel reads, in the order build() meets them, each at a
64-byte aligned offset. Pure IR and NumPy (no TVM), so `python -m kiln.rebuild_weights` makes the same bytes on a
machine without a compiler."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from kiln.ir import Call, Constant, IRModule
from kiln.ir.visitor import post_order
from kiln.runtime.artifact import ALIGN


@dataclass(frozen=True)
class WeightsLayout:
    blob: bytes
    offsets: dict[int, int] = field(default_factory=dict)  # id(Constant) → its byte offset in `blob`

    @property
    def crc32(self) -> int:
        return zlib.crc32(self.blob)


def kernel_calls(mod: IRModule) -> list[Call]:
    """The calls of `mod.main` in execution order: the order build() gives kernels and the memory plan indexes."""
    return [e for e in post_order(mod.main.body) if isinstance(e, Call)]


def layout(mod: IRModule) -> WeightsLayout:
    """Each constant argument of a kernel, at its first use, padded to ALIGN; a concat planned as a view has no
    kernel, so its arguments take no place here."""
    plan = mod.attrs.get("memory_plan")
    views = set(plan.views) if plan is not None else set()
    blob, offsets = bytearray(), {}
    for i, c in enumerate(kernel_calls(mod)):
        if i in views:
            continue
        for a in c.args:
            if isinstance(a, Constant) and id(a) not in offsets:
                blob.extend(b"\0" * ((-len(blob)) % ALIGN))
                offsets[id(a)] = len(blob)
                blob.extend(np.ascontiguousarray(a.value).tobytes())
    return WeightsLayout(bytes(blob), offsets)
