"""The one configuration object. The CLI and the driver build an `Options`; layers below take plain arguments.

`Options.from_env(**given)` is the only place Kiln reads the environment (KILN_OPT_LEVEL, KILN_VERIFY,
KILN_DUMP_IR, KILN_TARGET), so a run's behaviour is visible in one value.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kiln.errors import KilnError


@dataclass(frozen=True)
class Options:
    target: str = "native"  # a preset name or a TVM target dict as JSON
    opt_level: int = 2
    verify: bool = True  # run the IR verifier after every pass
    dump_dir: Path | None = None  # write the IR after every pass here
    tuning_logs: tuple[Path, ...] = ()  # extra tuning-record files or folders
    input_shapes: Mapping[str, tuple[int | str, ...]] = field(default_factory=dict)
    num_threads: int | None = None
    measure: bool = False  # time each conv's candidate algorithms instead of trusting the cost model
    fuse_depthwise: bool = True  # CPU: a depthwise conv joins the 1x1 conv after it in one kernel
    shipped_logs: bool = True  # apply the tuning logs that ship with Kiln for the target's CPU
    # workload key -> config (autotune records, a tuner's candidate); overrides what tuning_logs give
    configs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # fp32 | tf32 | fp16 | bf16: the compute precision of a float32 model (passes/mixed_precision.py). tf32 keeps
    # float32 storage; only CUDA matmul templates read it (TF32 tensor cores); on CPU it is fp32
    precision: str = "fp32"
    # --precision int8: tensor key -> (lo, hi) range (kiln/calibrate.py's CalibrationTable is one); convs and
    # matmuls whose activation input has a range compute in int8 (passes/quantize.py), the rest in float32
    calibration: Mapping[str, tuple[float, float]] | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.opt_level <= 3:
            raise KilnError(f"opt level must be 0..3, got {self.opt_level}")
        if self.precision not in ("fp32", "tf32", "fp16", "bf16", "int8"):
            raise KilnError(f"precision must be fp32, tf32, fp16, bf16 or int8, got {self.precision!r}")
        if self.precision == "int8" and self.calibration is None:
            raise KilnError("precision int8 needs a calibration: the ranges of the activations it quantizes "
                            "(kiln calibrate MODEL --data SAMPLES, or kiln compile --calibration SAMPLES)")
        if self.precision == "int8" and self.opt_level < 2:
            raise KilnError(f"precision int8 needs opt level 2 or 3 (the quantization passes), got {self.opt_level}")

    @classmethod
    def from_env(cls, **given: Any) -> Options:
        """Options from explicit values, falling back on KILN_* environment variables, then defaults."""
        env = os.environ
        values: dict[str, Any] = {}
        if "KILN_TARGET" in env:
            values["target"] = env["KILN_TARGET"]
        if "KILN_OPT_LEVEL" in env:
            values["opt_level"] = _int(env["KILN_OPT_LEVEL"], "KILN_OPT_LEVEL")
        if "KILN_VERIFY" in env:
            values["verify"] = env["KILN_VERIFY"].lower() not in ("0", "false", "no", "")
        if env.get("KILN_DUMP_IR"):
            values["dump_dir"] = Path(env["KILN_DUMP_IR"])
        values.update({k: v for k, v in given.items() if v is not None})
        return cls(**values)

    def with_(self, **changes: Any) -> Options:
        return replace(self, **changes)


def _int(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise KilnError(f"{name} must be an integer, got {text!r}") from None


def parse_input_shapes(specs: list[str] | None) -> dict[str, tuple[int | str, ...]]:
    """['data=1,3,224,224', 'ids=N,128'] → {'data': (1, 3, 224, 224), 'ids': ('N', 128)}."""
    out: dict[str, tuple[int | str, ...]] = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition("=")
        if not sep or not name or not dims:
            raise KilnError(f"--input-shape takes name=d0,d1,..., got {spec!r}")
        out[name] = tuple(int(d) if d.strip().lstrip("-").isdigit() else d.strip() for d in dims.split(","))
    return out
