"""The model repository: `REPO/<model>/config.json` and `REPO/<model>/<version>/model_b<N>.so`, one artifact
per batch bucket. A version serves only after every bucket loads, agrees with the others and passes a warm-up
run; a version that fails leaves the serving ones as they were. Swaps are one assignment: requests already
queued on a retired version finish there, new ones go to the new version. A version loads only once its files
have stopped changing (a half-copied version never goes live), and whatever goes wrong while loading one
version leaves it UNAVAILABLE with the reason, never the server or the other models down.
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
from .protocol import TO_DATATYPE, BadRequest, InferRequest, LoadFailed, NotFound, ServeError, Unavailable

log = logging.getLogger(__name__)

ARTIFACT = re.compile(r"^model_b(\d+)\.so$")
READY, LOADING, UNAVAILABLE = "READY", "LOADING", "UNAVAILABLE"
WARMUP_RTOL, WARMUP_ATOL = 1e-3, 1e-4  # float32 buckets differ only in summation order
SETTLE_S = 1.0  # a version's files must have been still this long before it loads
FILES_CHANGING = "files changing"


class LoadError(KilnError):
    """A version directory that cannot serve: no artifacts, artifacts that disagree, or a failed warm-up."""


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str  # KServe name: FP32, INT64, ...
    dtype: str
    sample_shape: tuple[int, ...]  # without the batch dim


def _fingerprint(path: Path) -> tuple:
    """What changes when a directory's entries are written or replaced: names, kinds, sizes, modification
    times, and change times (ctime: `cp -p` and copytree restore mtimes, nothing restores a ctime)."""
    try:
        entries = []
        for p in path.iterdir():
            st = p.lstat()
            entries.append((p.name, st.st_mode >> 12, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        return tuple(sorted(entries))
    except OSError:
        return ()


def _last_change_s(path: Path, fp: tuple) -> float:
    """The wall-clock time of the latest change to the directory or any entry in it."""
    try:
        dir_ctime_ns = path.stat().st_ctime_ns
    except OSError:
        dir_ctime_ns = 0
    return max([dir_ctime_ns, *(e[4] for e in fp)]) / 1e9


def _version_dirs(model_dir: Path) -> dict[int, Path]:
    try:
        return {int(p.name): p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()}
    except OSError:
        return {}


def _batching_key(cfg: ModelConfig) -> tuple:
    return (cfg.max_batch_size, cfg.dynamic_batching, cfg.max_queue_delay_ms, cfg.max_queue_size,
            cfg.batch_buckets)


class LoadedVersion:
    """One version in memory: a Model per bucket and the batcher that feeds them.

    A version directory holds `model_b<N>.so` buckets, or else exactly one other `*.so` (a plain `kiln compile`
    output). A lone batch-1 artifact (that one, or a lone model_b1.so) serves as a single batch-1 bucket when
    dim 0 of every tensor is 1; otherwise the model has no batch dim and each request must carry the exact
    shapes (`batched` is False)."""

    def __init__(self, model: str, version: int, path: Path, config: ModelConfig, metrics: Metrics,
                 num_threads: int | None, fingerprint: tuple | None = None):
        self.model, self.version, self.path, self.config = model, version, path, config
        self.fingerprint = _fingerprint(path) if fingerprint is None else fingerprint
        self.batching_key = _batching_key(config)
        self.label = str(version)
        self.batched = True
        files = self._artifacts(path, config)
        self.models: dict[int, Model] = {b: _load_artifact(p) for b, p in sorted(files.items())}
        self.inputs, self.outputs = self._agreed_signature(single=list(files) == [1])
        self.max_batch_size = min(config.max_batch_size, max(self.models))
        self._warm_up()
        self.batcher = Batcher(self._run_bucket, list(self.models), max_batch_size=self.max_batch_size,
                               max_queue_delay_ms=config.max_queue_delay_ms, max_queue_size=config.max_queue_size,
                               dynamic=config.dynamic_batching, name=f"{model}-{version}",
                               on_batch=metrics.batch_observer(model, self.label),
                               on_depth=metrics.depth_observer(model, self.label),
                               on_start=(lambda: set_num_threads(num_threads)) if num_threads else None,
                               batched=self.batched)

    @staticmethod
    def _artifacts(path: Path, config: ModelConfig) -> dict[int, Path]:
        """bucket → artifact file; one plain *.so is bucket 1."""
        entries = sorted(path.iterdir())
        for p in entries:
            if p.name.endswith(".so") and not p.is_file():
                raise LoadError(f"{p} is not a regular file (a directory or a dangling link); an artifact is "
                                f"one shared library")
        files = {int(m.group(1)): p for p in entries if (m := ARTIFACT.match(p.name))}
        plain = [p for p in entries if p.name.endswith(".so") and not ARTIFACT.match(p.name)]
        if not files and len(plain) == 1:
            return {1: plain[0]}  # a static-batch model: one bucket of 1; batch_buckets does not apply
        if not files and plain:
            raise LoadError(f"{path} holds {len(plain)} .so files {[p.name for p in plain]}; name batch buckets "
                            f"model_b<N>.so, or keep one artifact")
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
        return usable

    def _agreed_signature(self, single: bool) -> tuple[list[Tensor], list[Tensor]]:
        """Every bucket must take and give the same tensors, with dim 0 its batch size."""
        if single:
            m = self.models[1]
            if not all(t.shape and t.shape[0] == 1 for t in [*m.inputs, *m.outputs]):
                self.batched = False  # no batch dim: tensors are served whole, at their exact shapes
                return tuple([Tensor(t.name, self._datatype(m, kind, t), t.dtype, tuple(t.shape)) for t in infos]
                             for kind, infos in (("input", m.inputs), ("output", m.outputs)))
        signature = None
        for b, m in self.models.items():
            sig = []
            for kind, infos in (("input", m.inputs), ("output", m.outputs)):
                part = []
                for t in infos:
                    if not t.shape or t.shape[0] != b:
                        raise LoadError(f"{m.path.name}: {kind} '{t.name}' is {t.dtype}{list(t.shape)}; a batch-{b} "
                                        f"artifact needs dim 0 = {b}")
                    part.append(Tensor(t.name, self._datatype(m, kind, t), t.dtype, tuple(t.shape[1:])))
                sig.append(part)
            if signature is not None and sig != signature:
                raise LoadError(f"{self.path}: model_b{b}.so takes or gives other tensors than the smaller buckets "
                                f"({sig} vs {signature})")
            signature = sig
        return signature[0], signature[1]

    @staticmethod
    def _datatype(m: Model, kind: str, t) -> str:
        if t.dtype not in TO_DATATYPE:
            raise LoadError(f"{m.path.name}: {kind} '{t.name}' has dtype {t.dtype}, which the protocol cannot "
                            f"carry")
        return TO_DATATYPE[t.dtype]

    def _warm_up(self) -> None:
        """Run every bucket on one seeded sample; outputs must be finite, agree across buckets and, where requests
        are batched, not depend on the other rows of the batch.

        Dynamic batching puts strangers' requests into one batch. A model that mixes rows (a mean over dim 0, a
        reshape that folds the batch into the features) would then answer one request with another's data, and
        each bucket alone would look fine. So each bucket above 1 runs twice, the sample in row 0 and different
        random rows after it, and row 0's outputs must not move."""
        rng = np.random.default_rng(0)
        sample = [rng.standard_normal((1, *t.sample_shape)).astype(t.dtype) if t.dtype.startswith("float")
                  else np.zeros((1, *t.sample_shape), t.dtype) for t in self.inputs]
        reference = None
        if not self.batched:
            sample = [s[0] for s in sample]  # the "sample shape" is the whole shape
        for b in self.models:
            runs = []
            for _ in range(2 if self.batched and b > 1 else 1):
                padded = [np.concatenate([s, _filler(rng, t, b - 1)]) for s, t in zip(sample, self.inputs)] \
                    if self.batched else sample
                try:
                    runs.append([o[:1] if self.batched else o for o in self._run_bucket(b, padded)])
                except Exception as err:  # noqa: BLE001  (whatever the runtime raises, this version cannot serve)
                    raise LoadError(f"{self.path}/model_b{b}.so: warm-up run failed: {err}") from None
            outs = runs[0]
            for t, o in zip(self.outputs, outs):
                if o.dtype.kind == "f" and not np.all(np.isfinite(o)):
                    raise LoadError(f"{self.path}/model_b{b}.so: warm-up output '{t.name}' is not finite")
            for t, o, other in zip(self.outputs, outs, runs[-1]):
                if not _agree(o, other):
                    raise LoadError(f"{self.path}/model_b{b}.so: warm-up output '{t.name}' for one request changed "
                                    f"with the other requests in its batch (max abs diff {_max_diff(o, other):.3g}): "
                                    f"the model mixes the batch dimension, so batching would answer a request with "
                                    f"another's data; serve it with batch-1 artifacts only")
            if reference is None:
                reference = outs
                continue
            for t, o, r in zip(self.outputs, outs, reference):
                if not _agree(o, r):
                    raise LoadError(f"{self.path}/model_b{b}.so: warm-up output '{t.name}' differs from the "
                                    f"batch-{min(self.models)} artifact (max abs diff {_max_diff(o, r):.3g}); the "
                                    f"buckets are not one model")

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
        if not self.batched:
            return self._check_whole(request), 1
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
        self._check_outputs(request)
        return arrays, rows

    def _check_whole(self, request: InferRequest) -> list[np.ndarray]:
        """A model without a batch dim: every input at exactly its shape."""
        arrays = []
        for t in self.inputs:
            value, datatype = request.inputs[t.name], request.datatypes[t.name]
            want = f"{t.datatype}{list(t.sample_shape)}"
            if datatype != t.datatype or tuple(value.shape) != t.sample_shape:
                raise BadRequest(f"input '{t.name}' expects {want} (model '{self.model}' has no batch dim), got "
                                 f"{datatype}{list(value.shape)}")
            arrays.append(value)
        self._check_outputs(request)
        return arrays

    def _check_outputs(self, request: InferRequest) -> None:
        if request.outputs is not None:
            known = [t.name for t in self.outputs]
            bad = [o for o in request.outputs if o not in known]
            if bad:
                raise BadRequest(f"requested outputs {bad} are not outputs of model '{self.model}' ({known})")

    def metadata(self) -> dict[str, Any]:
        def tensors(ts: list[Tensor]) -> list[dict]:
            batch = [-1] if self.batched else []
            return [{"name": t.name, "datatype": t.datatype, "shape": [*batch, *t.sample_shape]} for t in ts]

        return {"name": self.model, "versions": [self.label], "platform": "kiln", "inputs": tensors(self.inputs),
                "outputs": tensors(self.outputs),
                "parameters": {"max_batch_size": self.max_batch_size, "batch_buckets": sorted(self.models)}}

    def retire(self) -> None:
        """Finish the queued requests, then stop the worker. The worker drops its callbacks as it exits, so
        nothing refers back to this version: it and its Models go when the last request lets go of it."""
        self.batcher.close()


def _load_artifact(path: Path) -> Model:
    """kiln.load, with any failure turned into a LoadError that names the file."""
    try:
        return load(path)
    except KilnError as err:
        reason = str(err)
    except Exception as err:  # a garbage file can make the loader raise anything; it is refused
        log.warning("artifact loader raised %s", type(err).__name__, exc_info=True)
        reason = f"cannot load ({type(err).__name__}: {err})"
    raise LoadError(reason if path.name in reason else f"{path}: {reason}")


@dataclass
class ServedModel:
    name: str
    path: Path
    config: ModelConfig = field(default_factory=ModelConfig)
    override: dict | None = None  # a load request's config, kept until a load without one
    serving: dict[int, LoadedVersion] = field(default_factory=dict)  # replaced whole, never mutated
    states: dict[int, tuple[str, str]] = field(default_factory=dict)  # version → (state, reason)
    failed: dict[int, tuple] = field(default_factory=dict)  # version → fingerprint that failed to load
    failed_reasons: dict[int, str] = field(default_factory=dict)  # version → why it failed
    fingerprint: tuple = ()
    unloaded: bool = False  # by the repository API: the watcher leaves it alone until a load request
    settling: bool = False  # a version's files were still changing: the watcher looks again next poll
    seen: dict[int, tuple[tuple, float]] = field(default_factory=dict)  # version → (fingerprint, since, monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


class ModelRepository:
    def __init__(self, root: str | Path, metrics: Metrics | None = None, *, num_threads: int | None = None,
                 seed: int = 0, settle_s: float = SETTLE_S):
        self.root = Path(root)
        if not self.root.is_dir():
            raise KilnError(f"model repository {str(root)!r} is not a directory")
        self.metrics = metrics or Metrics()
        self.num_threads = num_threads
        self.settle_s = settle_s
        self.settle_wait_s = 5 * settle_s + 2  # how long a load request or startup waits for files to settle
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
        """Load every model found; a model that fails is logged and left unavailable, the others serve."""
        for name in self._model_dirs():
            try:
                self.load(name)
            except (KilnError, ServeError) as err:
                log.error("model failed to load", extra={"model": name, "error": str(err)})
            except Exception:  # our bug, in one model's load: the other models must still start
                log.exception("model failed to load", extra={"model": name})
        self.started = True

    def poll(self) -> None:
        """One watcher step: reconcile models whose files changed; unload models whose directory went away."""
        found = self._model_dirs()
        for name, path in found.items():
            entry = self._entry(name, path)
            if entry.unloaded:
                continue
            fp = self._model_fingerprint(path)
            if fp != entry.fingerprint or entry.settling:
                try:
                    self._reconcile(entry, force=False)
                except (KilnError, ServeError) as err:
                    log.error("model reload failed; serving versions kept", extra={"model": name,
                                                                                   "error": str(err)})
                except Exception:  # our bug, in one model: the watcher goes on to the others
                    log.exception("model reload failed; serving versions kept", extra={"model": name})
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

    def _settled(self, entry: ServedModel, v: int, path: Path, fp: tuple) -> bool:
        """Whether version v's files have been still for settle_s: by their change times, or by the same
        fingerprint seen over settle_s (which also copes with a clock that jumped)."""
        now = time.monotonic()
        seen = entry.seen.get(v)
        if seen is None or seen[0] != fp:
            entry.seen[v] = seen = (fp, now)
        return time.time() - _last_change_s(path, fp) >= self.settle_s or now - seen[1] >= self.settle_s

    def _wait_settled(self, entry: ServedModel, v: int, path: Path, force: bool) -> tuple | None:
        """Version v's fingerprint once its files are still; None while they change. A load request (force)
        waits up to settle_wait_s for that; the watcher looks again at its next poll."""
        deadline = time.monotonic() + (self.settle_wait_s if force else 0)
        while True:
            fp = _fingerprint(path)
            if self._settled(entry, v, path, fp):
                return fp
            if time.monotonic() >= deadline:
                return None
            time.sleep(min(0.05, self.settle_s / 4))

    def _reconcile(self, entry: ServedModel, *, force: bool) -> list[int]:
        with entry.lock:
            entry.fingerprint = self._model_fingerprint(entry.path)
            entry.settling = False
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
            notes: dict[int, str] = {}  # reasons shown beside READY: a serving version whose reload failed
            errors: list[str] = []
            for v in policy.candidates(available):
                if len(new) >= wanted:
                    break
                current = entry.serving.get(v)
                fp = _fingerprint(dirs[v])
                if current is not None and current.fingerprint == fp and current.batching_key == _batching_key(cfg):
                    new[v] = current
                    continue
                fp = self._wait_settled(entry, v, dirs[v], force)
                if fp is None:  # half-copied or being edited: never load it bucket by bucket
                    entry.settling = True
                    errors.append(f"version {v}: {FILES_CHANGING}")
                    if current is not None:
                        new[v], notes[v] = current, f"{FILES_CHANGING}; serving the copy loaded before"
                    else:
                        entry.states[v] = (LOADING, FILES_CHANGING)
                    continue
                if not force and entry.failed.get(v) == fp:
                    reason = entry.failed_reasons.get(v, "failed before")
                    errors.append(f"version {v}: {reason}")
                    if current is not None:
                        new[v], notes[v] = current, f"reload failed, serving the earlier load: {reason}"
                    continue
                loaded = self._load_version(entry, v, dirs[v], cfg, fp)
                if isinstance(loaded, str):
                    entry.failed[v] = fp
                    entry.failed_reasons[v] = loaded
                    errors.append(f"version {v}: {loaded}")
                    if current is not None:  # a failed reload leaves the version serving as it was
                        new[v], notes[v] = current, f"reload failed, serving the earlier load: {loaded}"
                else:
                    entry.failed.pop(v, None)
                    entry.failed_reasons.pop(v, None)
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
            self._swap(entry, new, cfg, notes)
            if errors and force:  # a load request hears about every version that failed, though others serve
                raise LoadFailed(f"model '{entry.name}': {'; '.join(errors)}; still serving versions {sorted(new)}")
            return sorted(new)

    def _load_version(self, entry: ServedModel, v: int, path: Path, cfg: ModelConfig,
                      fp: tuple) -> LoadedVersion | str:
        """The loaded version, or the reason it cannot serve. Whatever goes wrong, the version ends in a state
        with its reason, and a version that was serving before keeps its READY state."""
        serving = v in entry.serving
        if not serving:
            entry.states[v] = (LOADING, "")
        t0 = time.perf_counter()
        try:
            loaded = LoadedVersion(entry.name, v, path, cfg, self.metrics, self.num_threads, fingerprint=fp)
        except (KilnError, OSError) as err:  # ArtifactError, LoadError, a directory removed: the files are at fault
            reason = str(err)
        except Exception as err:  # our bug or the runtime's; this version only cannot serve
            log.exception("version failed to load", extra={"model": entry.name, "version": v})
            reason = f"{path}: load failed ({type(err).__name__}: {err})"
        else:
            if _fingerprint(path) == fp:
                self.metrics.loads.labels(entry.name, str(v), "ok").inc()
                log.info("version loaded and warmed up", extra={"model": entry.name, "version": v,
                                                               "buckets": sorted(loaded.models),
                                                               "load_s": round(time.perf_counter() - t0, 3)})
                return loaded
            loaded.retire()  # its files changed while it loaded: it may hold old and new buckets mixed
            reason = f"{path}: {FILES_CHANGING} while it loaded; it loads once they are still"
        if not serving:
            entry.states[v] = (UNAVAILABLE, reason)
        self.metrics.loads.labels(entry.name, str(v), "failed").inc()
        log.error("version failed to load", extra={"model": entry.name, "version": v, "error": reason})
        return reason

    def _swap(self, entry: ServedModel, new: dict[int, LoadedVersion], cfg: ModelConfig,
              notes: dict[int, str] | None = None) -> None:
        old = entry.serving
        entry.serving = new  # the switch: pick() reads this dict, never a half-built one
        entry.config = cfg
        for v in new:
            entry.states[v] = (READY, (notes or {}).get(v, ""))
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


def _filler(rng: np.random.Generator, t: Tensor, rows: int) -> np.ndarray:
    """Rows to fill a warm-up batch with: random floats; 0s and 1s for integer and bool inputs (valid token ids,
    masks and indices for any model that takes such inputs at all)."""
    shape = (rows, *t.sample_shape)
    if t.dtype.startswith("float"):
        return rng.standard_normal(shape).astype(t.dtype)
    return rng.integers(0, 2, shape).astype(t.dtype)


def _agree(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype.kind in "fc":
        return bool(np.allclose(a, b, rtol=WARMUP_RTOL, atol=WARMUP_ATOL, equal_nan=True))
    return bool(np.array_equal(a, b))


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
