"""`kiln repo add`: compile an ONNX model into a new version of a serving repository, one artifact per batch
bucket (`REPO/<name>/<version>/model_b<N>.so`). The version directory appears whole (built aside, then
renamed), so a watching server never sees half of it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

from kiln.config import Options
from kiln.driver import compile as compile_model
from kiln.errors import KilnError

CONFIG_NAME = "config.json"  # kept equal to kiln.serve.repository.CONFIG_NAME (kiln/ may not be imported there)


@dataclass(frozen=True)
class AddedVersion:
    path: Path
    version: int
    buckets: tuple[int, ...]
    compile_s: float


def default_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two up to max_batch, and max_batch itself: padding wastes less than half a bucket."""
    if max_batch < 1:
        raise KilnError(f"--max-batch must be ≥ 1, got {max_batch}")
    sizes = {1, max_batch}
    b = 2
    while b < max_batch:
        sizes.add(b)
        b *= 2
    return tuple(sorted(sizes))


def _batched_shapes(model: onnx.ModelProto, batch: int) -> dict[str, tuple[int, ...]]:
    """Every graph input with dim 0 set to `batch`; the other dims must be static. With the single bucket 1
    (`--max-batch 1`), a fixed dim 0 stays as exported: a static-batch model, or one with no batch dim at all,
    is compiled as it is and served at its exact shapes."""
    initializers = {t.name for t in model.graph.initializer}
    shapes: dict[str, tuple[int, ...]] = {}
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        dims = vi.type.tensor_type.shape.dim
        if not dims:
            raise KilnError(f"input '{vi.name}' has no shape; a served model needs [batch, ...] inputs")
        fixed = dims[0].dim_value if dims[0].HasField("dim_value") else None
        if fixed is not None and fixed != batch and batch != 1:
            raise KilnError(f"input '{vi.name}' fixes its batch dim to {fixed}; export the model with a symbolic "
                            f"batch dim (e.g. 'N') to compile batch buckets, or serve it as it is with "
                            f"--max-batch 1")
        rest = []
        for i, d in enumerate(dims[1:], start=1):
            if not d.HasField("dim_value"):
                raise KilnError(f"input '{vi.name}' dim {i} is symbolic ({d.dim_param or '?'}); only the batch "
                                f"dim may vary")
            rest.append(d.dim_value)
        shapes[vi.name] = (fixed if fixed is not None and batch == 1 else batch, *rest)
    return shapes


def next_version(model_dir: Path) -> int:
    versions = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()] \
        if model_dir.is_dir() else []
    return max(versions, default=0) + 1


def add_version(model: str | os.PathLike | onnx.ModelProto, repo: str | os.PathLike, name: str, *, version: int | None = None,
                max_batch: int = 8, buckets: Sequence[int] | None = None, options: Options | None = None,
                max_queue_delay_ms: float = 2.0,
                on_progress: Callable[[int, int], None] | None = None) -> AddedVersion:
    """Compile one artifact per bucket into REPO/name/version/; write REPO/name/config.json if it is missing."""
    if not name or "/" in name or name.startswith("."):
        raise KilnError(f"model name {name!r} must be a plain directory name")
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=True)
    sizes = tuple(sorted(set(buckets))) if buckets else default_buckets(max_batch)
    if sizes[0] < 1 or sizes[-1] > max_batch:
        raise KilnError(f"buckets {list(sizes)} must lie in 1..{max_batch} (--max-batch)")
    shapes = {b: _batched_shapes(model, b) for b in sizes}  # every bucket's error before any compile
    model_dir = Path(repo) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    version = next_version(model_dir) if version is None else version
    if version < 1:
        raise KilnError(f"--version must be ≥ 1, got {version}")
    final = model_dir / str(version)
    if final.exists():
        raise KilnError(f"{final} exists; versions are immutable, add a new one (omit --version)")
    building = model_dir / f".building-{version}-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir()
    options = options or Options()
    total_s = 0.0
    try:
        for i, b in enumerate(sizes):
            report = compile_model(model, building / f"model_b{b}.so",
                                   options.with_(input_shapes=shapes[b]))
            total_s += report.total_s
            if on_progress:
                on_progress(i + 1, len(sizes))
        os.rename(building, final)  # atomic: the watcher sees no version, or a whole one
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    config = model_dir / CONFIG_NAME
    if not config.exists():
        config.write_text(json.dumps({"max_batch_size": max_batch, "max_queue_delay_ms": max_queue_delay_ms,
                                      "version_policy": {"latest": {"num_versions": 1}}}, indent=2) + "\n")
    return AddedVersion(final, version, sizes, total_s)
