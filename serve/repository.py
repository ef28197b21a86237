"""The model repository: `REPO/<model>/config.json` and `REPO/<model>/<version>/model_b<N>.so`, one artifact
per batch bucket. A version serves only after every bucket loads, agrees with the others and passes a warm-up
run; a version that fails leaves the serving ones as they were. Swaps are one assignment: requests already
queued on a retired version finish there, new ones go to the new version.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from kiln.runtime.model import Model, load, set_num_threads

from kiln.errors import KilnError

from .batcher import Batcher
from .config import CONFIG_NAME, ConfigError, ModelConfig, parse_config, read_config
from .metrics import Metrics
from .protocol import TO_DATATYPE, BadRequest, InferRequest, LoadFailed, NotFound, Unavailable

log = logging.getLogger(__name__)

ARTIFACT = re.compile(r"^model_b(\d+)\.so$")
READY, LOADING, UNAVAILABLE = "READY", "LOADING", "UNAVAILABLE"
WARMUP_RTOL, WARMUP_ATOL = 1e-3, 1e-4  # float32 buckets differ only in summation order


class LoadError(KilnError):
    """A version directory that cannot serve: no artifacts, artifacts that disagree, or a failed warm-up."""


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str  # KServe name: FP32, INT64, ...
    dtype: str
    sample_shape: tuple[int, ...]  # without the batch dim


def _fingerprint(path: Path) -> tuple:
    """What changes when a directory's files are replaced: names, sizes, modification times."""
    try:
        return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir()
                            if p.is_file()))
    except OSError:
        return ()


def _version_dirs(model_dir: Path) -> dict[int, Path]:
    try:
        return {int(p.name): p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()}
    except OSError:
        return {}


def _batching_key(cfg: ModelConfig) -> tuple:
    return (cfg.max_batch_size, cfg.dynamic_batching, cfg.max_queue_delay_ms, cfg.max_queue_size,
            cfg.batch_buckets)


class LoadedVersion:
    """One version in memory: a Model per bucket and the batcher that feeds them."""

    def __init__(self, model: str, version: int, path: Path, config: ModelConfig, metrics: Metrics,
                 num_threads: int | None):
        self.model, self.version, self.path, self.config = model, version, path, config
        self.fingerprint = _fingerprint(path)
        self.batching_key = _batching_key(config)
        self.label = str(version)
        files = {int(m.group(1)): p for p in sorted(path.iterdir()) if (m := ARTIFACT.match(p.name))}
        if config.batch_buckets:
            missing = sorted(set(config.batch_buckets) - set(files))
            if missing:
                raise LoadError(f"{path}: config batch_buckets {list(config.batch_buckets)} names sizes with no "
                                f"artifact: {[f'model_b{b}.so' for b in missing]}")
            files = {b: files[b] for b in config.batch_buckets}
        if not files:
            raise LoadError(f"{path} holds no model_b<N>.so artifacts (build one with `kiln repo add`)")
        usable = {b: p for b, p in files.items() if b <= config.max_batch_size}
        if not usable:
            raise LoadError(f"{path}: every bucket {sorted(files)} exceeds max_batch_size {config.max_batch_size}")
        self.models: dict[int, Model] = {b: load(p) for b, p in sorted(usable.items())}
        self.inputs, self.outputs = self._agreed_signature()
        self.max_batch_size = min(config.max_batch_size, max(self.models))
        self._warm_up()
        self.batcher = Batcher(self._run_bucket, list(self.models), max_batch_size=self.max_batch_size,
                               max_queue_delay_ms=config.max_queue_delay_ms, max_queue_size=config.max_queue_size,
                               dynamic=config.dynamic_batching, name=f"{model}-{version}",
                               on_batch=metrics.batch_observer(model, self.label),
                               on_depth=metrics.depth_observer(model, self.label),
                               on_start=(lambda: set_num_threads(num_threads)) if num_threads else None)

    def _agreed_signature(self) -> tuple[list[Tensor], list[Tensor]]:
        """Every bucket must take and give the same tensors, with dim 0 its batch size."""
        signature = None
        for b, m in self.models.items():
            sig = []
            for kind, infos in (("input", m.inputs), ("output", m.outputs)):
                part = []
                for t in infos:
                    if not t.shape or t.shape[0] != b:
                        raise LoadError(f"{m.path.name}: {kind} '{t.name}' is {t.dtype}{list(t.shape)}; a batch-{b} "
                                        f"artifact needs dim 0 = {b}")
                    if t.dtype not in TO_DATATYPE:
                        raise LoadError(f"{m.path.name}: {kind} '{t.name}' has dtype {t.dtype}, which the "
                                        f"protocol cannot carry")
                    part.append(Tensor(t.name, TO_DATATYPE[t.dtype], t.dtype, tuple(t.shape[1:])))
                sig.append(part)
            if signature is not None and sig != signature:
                raise LoadError(f"{self.path}: model_b{b}.so takes or gives other tensors than the smaller buckets "
                                f"({sig} vs {signature})")
            signature = sig
        return signature[0], signature[1]

    def _warm_up(self) -> None:
        """Run every bucket on one seeded sample (padded); outputs must be finite and agree across buckets."""
        rng = np.random.default_rng(0)
        sample = [rng.standard_normal((1, *t.sample_shape)).astype(t.dtype) if t.dtype.startswith("float")
                  else np.zeros((1, *t.sample_shape), t.dtype) for t in self.inputs]
        reference = None
        for b in self.models:
            padded = [np.concatenate([s, np.zeros((b - 1, *s.shape[1:]), s.dtype)]) for s in sample]
            try:
                outs = [o[:1] for o in self._run_bucket(b, padded)]
            except Exception as err:  # noqa: BLE001  (whatever the runtime raises, this version cannot serve)
                raise LoadError(f"{self.path}/model_b{b}.so: warm-up run failed: {err}") from None
            for t, o in zip(self.outputs, outs):
                if o.dtype.kind == "f" and not np.all(np.isfinite(o)):
                    raise LoadError(f"{self.path}/model_b{b}.so: warm-up output '{t.name}' is not finite")
            if reference is None:
                reference = outs
                continue
            for t, o, r in zip(self.outputs, outs, reference):
                if not np.allclose(o, r, rtol=WARMUP_RTOL, atol=WARMUP_ATOL):
                    raise LoadError(f"{self.path}/model_b{b}.so: warm-up output '{t.name}' differs from the "
                                    f"batch-{min(self.models)} artifact (max abs diff "
                                    f"{float(np.max(np.abs(o - r))):.3g}); the buckets are not one model")

    def _run_bucket(self, bucket: int, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return self.models[bucket].run(*inputs)

    def check(self, request: InferRequest) -> tuple[list[np.ndarray], int]:
        """The request's inputs in model order and its row count; BadRequest names the field that is wrong."""
        names = [t.name for t in self.inputs]
        missing = [n for n in names if n not in request.inputs]
        unexpected = [n for n in request.inputs if n not in names]
        if missing or unexpected:
            raise BadRequest(f"model '{self.model}' takes inputs {names}"
                             + (f"; missing {missing}" if missing else "")
                             + (f"; unexpected {unexpected}" if unexpected else ""))
        arrays, rows = [], None
        for t in self.inputs:
            value, datatype = request.inputs[t.name], request.datatypes[t.name]
            want = f"{t.datatype}[-1, {', '.join(map(str, t.sample_shape))}]"
            if datatype != t.datatype:
                raise BadRequest(f"input '{t.name}' expects {want}, got datatype {datatype}")
            if value.ndim != len(t.sample_shape) + 1 or tuple(value.shape[1:]) != t.sample_shape:
                raise BadRequest(f"input '{t.name}' expects {want}, got shape {list(value.shape)}")
            if rows is not None and value.shape[0] != rows:
                raise BadRequest(f"input '{t.name}' has batch {value.shape[0]}, other inputs have {rows}")
            rows = value.shape[0]
            arrays.append(value)
        assert rows is not None
        if not 1 <= rows <= self.max_batch_size:
            raise BadRequest(f"batch size (dim 0 of the inputs) must be 1..{self.max_batch_size} for model "
                             f"'{self.model}', got {rows}")
        if request.outputs is not None:
            known = [t.name for t in self.outputs]
            bad = [o for o in request.outputs if o not in known]
            if bad:
                raise BadRequest(f"requested outputs {bad} are not outputs of model '{self.model}' ({known})")
        return arrays, rows

    def metadata(self) -> dict[str, Any]:
        def tensors(ts: list[Tensor]) -> list[dict]:
            return [{"name": t.name, "datatype": t.datatype, "shape": [-1, *t.sample_shape]} for t in ts]

        return {"name": self.model, "versions": [self.label], "platform": "kiln", "inputs": tensors(self.inputs),
                "outputs": tensors(self.outputs),
                "parameters": {"max_batch_size": self.max_batch_size, "batch_buckets": sorted(self.models)}}

    def retire(self) -> None:
        """Finish the queued requests, then stop the worker; the Models go when the last reference does."""
        self.batcher.close()


@dataclass
class ServedModel:
    name: str
    path: Path
    config: ModelConfig = field(default_factory=ModelConfig)
    override: dict | None = None  # a load request's config, kept until a load without one
    serving: dict[int, LoadedVersion] = field(default_factory=dict)  # replaced whole, never mutated
    states: dict[int, tuple[str, str]] = field(default_factory=dict)  # version → (state, reason)
    failed: dict[int, tuple] = field(default_factory=dict)  # version → fingerprint that failed to load
    fingerprint: tuple = ()
    unloaded: bool = False  # by the repository API: the watcher leaves it alone until a load request
    lock: threading.Lock = field(default_factory=threading.Lock)


class ModelRepository:
    def __init__(self, root: str | Path, metrics: Metrics | None = None, *, num_threads: int | None = None,
                 seed: int = 0):
        self.root = Path(root)
        if not self.root.is_dir():
            raise KilnError(f"model repository {str(root)!r} is not a directory")
        self.metrics = metrics or Metrics()
        self.num_threads = num_threads
        self.models: dict[str, ServedModel] = {}
        self._rng = random.Random(seed)  # traffic split draws; seeded so a test's split is reproducible
        self._models_lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.started = False

    # --- scanning and reconciling -------------------------------------------------------------------------
    def _model_dirs(self) -> dict[str, Path]:
        return {p.name: p for p in sorted(self.root.iterdir()) if p.is_dir() and not p.name.startswith(".")}

    def _model_fingerprint(self, path: Path) -> tuple:
        cfg = path / CONFIG_NAME
        cfg_fp = (cfg.stat().st_size, cfg.stat().st_mtime_ns) if cfg.exists() else None
        return (cfg_fp, tuple((v, _fingerprint(p)) for v, p in sorted(_version_dirs(path).items())))

    def _entry(self, name: str, path: Path) -> ServedModel:
        with self._models_lock:
            if name not in self.models:
                self.models[name] = ServedModel(name, path)
            return self.models[name]

    def load_all(self) -> None:
        """Load every model found; a model that fails is logged and left unavailable."""
        for name in self._model_dirs():
            try:
                self.load(name)
            except (KilnError, BadRequest, LoadFailed) as err:
                log.error("model failed to load", extra={"model": name, "error": str(err)})
        self.started = True

    def poll(self) -> None:
        """One watcher step: reconcile models whose files changed; unload models whose directory went away."""
        found = self._model_dirs()
        for name, path in found.items():
            entry = self._entry(name, path)
            if entry.unloaded:
                continue
            fp = self._model_fingerprint(path)
            if fp != entry.fingerprint:
                try:
                    self._reconcile(entry, force=False)
                except (KilnError, BadRequest, LoadFailed) as err:
                    log.error("model reload failed; serving versions kept", extra={"model": name,
                                                                                   "error": str(err)})
        for name in [n for n in list(self.models) if n not in found]:
            if self.models[name].serving:
                log.info("model directory removed; unloading", extra={"model": name})
                self.unload(name)

    def load(self, name: str, config_override: dict | None = None) -> list[int]:
        """Load or reload a model (the repository API's load): returns the versions now serving."""
        path = self.root / name
        if not path.is_dir() or name.startswith("."):
            raise NotFound(f"model '{name}' is not in the repository {self.root}")
        entry = self._entry(name, path)
        with entry.lock:
            entry.override = config_override
            entry.unloaded = False
        return self._reconcile(entry, force=True)

    def _reconcile(self, entry: ServedModel, *, force: bool) -> list[int]:
        with entry.lock:
            entry.fingerprint = self._model_fingerprint(entry.path)
            try:
                cfg = read_config(entry.path)
                if entry.override is not None:
                    cfg = parse_config(entry.override, "load request config", cfg)
            except ConfigError as err:
                raise BadRequest(str(err)) from None
            dirs = _version_dirs(entry.path)
            available = sorted(dirs)
            policy = cfg.version_policy
            wanted = policy.wanted(available)
            new: dict[int, LoadedVersion] = {}
            errors: list[str] = []
            for v in policy.candidates(available):
                if len(new) >= wanted:
                    break
                current = entry.serving.get(v)
                fp = _fingerprint(dirs[v])
                if current is not None and current.fingerprint == fp and current.batching_key == _batching_key(cfg):
                    new[v] = current
                    continue
                if not force and entry.failed.get(v) == fp:
                    errors.append(f"version {v}: {entry.states.get(v, ('', 'failed before'))[1]}")
                    continue
                loaded = self._load_version(entry, v, dirs[v], cfg)
                if isinstance(loaded, str):
                    entry.failed[v] = fp
                    errors.append(f"version {v}: {loaded}")
                else:
                    entry.failed.pop(v, None)
                    new[v] = loaded
            if policy.kind == "specific":
                absent = [v for v in policy.versions if v not in dirs]
                errors += [f"version {v}: no directory {entry.path / str(v)}" for v in absent]
            if not new:
                what = "; ".join(errors) or f"no version directories in {entry.path}"
                if entry.serving:
                    log.warning("no version could load; serving versions kept",
                                extra={"model": entry.name, "serving": sorted(entry.serving), "error": what})
                    raise LoadFailed(f"model '{entry.name}': no version could load ({what}); still serving "
                                      f"versions {sorted(entry.serving)}")
                raise LoadFailed(f"model '{entry.name}' has no loadable version: {what}")
            self._swap(entry, new, cfg)
            if errors and force:  # a load request hears about every version that failed, though others serve
                raise LoadFailed(f"model '{entry.name}': {'; '.join(errors)}; still serving versions {sorted(new)}")
            return sorted(new)

    def _load_version(self, entry: ServedModel, v: int, path: Path, cfg: ModelConfig) -> LoadedVersion | str:
        entry.states[v] = (LOADING, "")
        t0 = time.perf_counter()
        try:
            loaded = LoadedVersion(entry.name, v, path, cfg, self.metrics, self.num_threads)
        except KilnError as err:  # ArtifactError, InputError, LoadError: the version's files are at fault
            entry.states[v] = (UNAVAILABLE, str(err))
            self.metrics.loads.labels(entry.name, str(v), "failed").inc()
            log.error("version failed to load", extra={"model": entry.name, "version": v, "error": str(err)})
            return str(err)
        self.metrics.loads.labels(entry.name, str(v), "ok").inc()
        log.info("version loaded and warmed up", extra={"model": entry.name, "version": v,
                                                       "buckets": sorted(loaded.models),
                                                       "load_s": round(time.perf_counter() - t0, 3)})
        return loaded

    def _swap(self, entry: ServedModel, new: dict[int, LoadedVersion], cfg: ModelConfig) -> None:
        old = entry.serving
        entry.serving = new  # the switch: pick() reads this dict, never a half-built one
        entry.config = cfg
        for v in new:
            entry.states[v] = (READY, "")
            self.metrics.ready.labels(entry.name, str(v)).set(1)
        for v, lv in old.items():
            if new.get(v) is not lv:
                lv.retire()
                if v not in new:
                    entry.states[v] = (UNAVAILABLE, "unloaded")
                    self.metrics.ready.labels(entry.name, str(v)).set(0)
        if sorted(old) != sorted(new) or any(new[v] is not old.get(v) for v in new):
            log.info("serving versions changed", extra={"model": entry.name, "before": sorted(old),
                                                        "after": sorted(new)})

    def unload(self, name: str) -> None:
        entry = self.models.get(name)
        if entry is None:
            raise NotFound(f"model '{name}' is not loaded")
        with entry.lock:
            old, entry.serving = entry.serving, {}
            entry.unloaded = True
            for v, lv in old.items():
                lv.retire()
                entry.states[v] = (UNAVAILABLE, "unloaded")
                self.metrics.ready.labels(name, str(v)).set(0)
        log.info("model unloaded", extra={"model": name, "versions": sorted(old)})

    # --- requests --------------------------------------------------------------------------------------
    def pick(self, name: str, version: str | None) -> LoadedVersion:
        """The version a request goes to: the one it names, else a traffic-split draw, else the newest."""
        entry = self.models.get(name)
        if entry is None:
            raise NotFound(f"unknown model '{name}'; GET /v2/repository/index lists the models")
        serving = entry.serving
        if version is not None:
            if not version.isdigit():
                raise BadRequest(f"version must be a positive integer, got {version!r}")
            lv = serving.get(int(version))
            if lv is None:
                state, reason = entry.states.get(int(version), (UNAVAILABLE, "no such version"))
                raise NotFound(f"model '{name}' version {version} is not serving ({state}"
                               + (f": {reason}" if reason else "") + ")")
            return lv
        if not serving:
            raise Unavailable(f"model '{name}' has no serving version"
                              + (" (unloaded)" if entry.unloaded else ""))
        split = entry.config.traffic_split
        if split:
            choices = [(v, w) for v, w in split.items() if v in serving and w > 0]
            if choices:
                return serving[self._rng.choices([v for v, _ in choices], [w for _, w in choices])[0]]
        return serving[max(serving)]

    def ready(self, name: str | None = None) -> bool:
        if name is None:
            return self.started and all(e.serving or e.unloaded for e in list(self.models.values()))
        entry = self.models.get(name)
        return bool(entry and entry.serving)

    def index(self) -> list[dict[str, str]]:
        rows = []
        for name, path in self._model_dirs().items():
            entry = self.models.get(name)
            versions = set(_version_dirs(path)) | (set(entry.states) if entry else set())
            if not versions:
                rows.append({"name": name, "state": UNAVAILABLE, "reason": "no versions"})
            for v in sorted(versions):
                state, reason = entry.states.get(v, (UNAVAILABLE, "not loaded")) if entry else \
                    (UNAVAILABLE, "not loaded")
                rows.append({"name": name, "version": str(v), "state": state, "reason": reason})
        return rows

    # --- watching ----------------------------------------------------------------------------------------
    def watch(self, poll_s: float) -> None:
        """Poll the repository directory every poll_s seconds in a background thread."""
        def loop() -> None:
            while not self._stop.wait(poll_s):
                try:
                    self.poll()
                except Exception:  # the watcher must outlive any one bad poll; the error is logged whole
                    log.exception("repository poll failed")

        self._watcher = threading.Thread(target=loop, name="repository-watcher", daemon=True)
        self._watcher.start()

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
        for name in list(self.models):
            if self.models[name].serving:
                self.unload(name)

