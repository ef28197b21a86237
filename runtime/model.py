"""A loaded artifact: `kiln.load(path)` → Model. Inputs are checked against the metadata before any kernel
runs. Weights are read once at load and shared; each concurrent run gets its own execution context (activation
blocks, input staging, outputs, descriptor table), allocated once and reused, so a run allocates only the copies
of the outputs it returns and runs on several threads never share a buffer.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import os
import tempfile
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kiln.errors import ArtifactError, InputError

from .artifact import (ALIGN, META_SYMBOL, WEIGHTS_SYMBOL, WEIGHTS_VIEW_SYMBOL, dlpack_code, read_artifact,
                       read_weights_file, tensor_dtype, validate_metadata, weights_path)
from .cpu import host_arch, missing_features
from .cuda import (CudaExecutor, bundle_dir, device_inputs, load_bundle_runtime, load_cuda_runtime,
                   ptx_for_source)
from .threads import OwnPool, load_tvm_runtime, pool_limit, run_kernels, set_num_threads, usable_cpus
from .timing import time_ms

log = logging.getLogger(__name__)
# Below this size an input is copied into the context's staging buffer rather than pointed at: a 64 KB copy
# costs about what reading a NumPy array's address and repointing the table does.
ZERO_COPY_MIN_BYTES = 64 << 10


def _open_private_copy(tvm_ffi, data: memoryview, name: str):
    """Load the library from a private copy of `data`, the bytes whose checksum was just verified.

    dlopen maps the file it is given: truncating or rewriting that file later (a redeploy with `cp`) would
    kill this process with SIGBUS or SIGSEGV, or change its code under it; and glibc hands back the library
    already loaded under a name even after the file was replaced. A copy no one else can name, unlinked once
    mapped, has none of these problems and is what was checked.
    """
    fd, tmp = tempfile.mkstemp(prefix=f"kiln-{Path(name).stem}-", suffix=".so")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return tvm_ffi.load_module(tmp, keep_module_alive=False)  # unloaded when the Model goes
    finally:
        os.unlink(tmp)


def aligned_empty(shape: Sequence[int], dtype: str | np.dtype) -> np.ndarray:
    """An uninitialized C-contiguous array whose data starts on a 64-byte boundary: as an input of 64 KB or
    more, the kernels read it in place (NumPy's own large arrays are seldom aligned so, and are copied)."""
    dt = tensor_dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    raw = np.empty(n + ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start:start + n].view(dt).reshape(shape)


class TensorInfo:
    def __init__(self, d: dict):
        self.name: str = d["name"]
        self.shape: tuple[int, ...] = tuple(d["shape"])
        self.dtype: str = d["dtype"]
        self.np_dtype = tensor_dtype(self.dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.np_dtype.itemsize

    def __repr__(self) -> str:
        return f"{self.name}: {self.dtype}{list(self.shape)}"


class _Context:
    """The memory one run writes: activation blocks, input staging, outputs and the descriptor table that
    points the kernels at them (weights are shared, read-only). A run owns its context until it returns."""

    def __init__(self, model: Model, tvm_ffi):
        meta = model.meta
        blocks = [aligned_empty((n,), "uint8") for n in meta["blocks"]]
        self.inputs = [aligned_empty(t.shape, t.dtype) for t in model.inputs]
        self.outputs = [aligned_empty(t.shape, t.dtype) for t in model.outputs]
        arrays: list[np.ndarray] = []
        for v in meta["values"]:
            shape, dtype = tuple(v["shape"]), tensor_dtype(v["dtype"])
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            kind = v["kind"]
            if kind == "input":
                arrays.append(self.inputs[v["index"]])
            elif kind == "output":
                arrays.append(self.outputs[v["index"]])
            elif kind == "const":
                arrays.append(model._weights[v["offset"]:v["offset"] + nbytes].view(dtype).reshape(shape))
            else:  # a block, at an offset when it is one part of a concat planned as a view
                at = v.get("offset", 0)
                arrays.append(blocks[v["block"]][at:at + nbytes].view(dtype).reshape(shape))
        self._keepalive = (blocks, arrays)
        self.table, self._shapes = _descriptor_table(arrays)
        self.table_tensor = tvm_ffi.from_dlpack(self.table.view(np.uint8))
        self._kernels, self._step_args = model._kernels, [step["args"] for step in meta["steps"]]
        self.staging_at = [a.ctypes.data for a in self.inputs]
        self.bound = list(self.staging_at)  # where the table points each input now
        # the caller's array each input was last read in place from, with its strides, or None: passing the same
        # array again skips reading its address (see Model._bind_inputs); held, so its memory cannot move
        self.held: list = [None] * len(self.inputs)
        self.out_at = [a.ctypes.data for a in self.outputs]
        self.out_bound = list(self.out_at)  # and each output

    @functools.cached_property
    def steps(self) -> list[tuple]:
        """Each kernel with its arguments as TVM tensors: for artifacts without an entry function and for
        per-kernel profiles (runs go through the table). Built on first use."""
        import tvm_ffi

        arrays = self._keepalive[1]
        if any(a.dtype.kind == "V" for a in arrays):
            raise ArtifactError("kernels of bfloat16 tensors run only through the entry function (NumPy cannot "
                                "hand bfloat16 over DLPack); per-kernel profiles are not available")
        tensors = [tvm_ffi.from_dlpack(a) for a in arrays]
        return [(fn, [tensors[i] for i in args]) for fn, args in zip(self._kernels, self._step_args)]


class Model:
    """A compiled model. `model.run(x)` or `model(x)`; inputs positionally or by name; returns a list.

    `run` may be called from several threads at once: each concurrent run takes an execution context of its
    own (its activation memory: `activation_bytes`), up to `max_concurrency` of them (default: twice the
    usable cores); further callers wait for one to be free.

    A CUDA artifact (`device == "cuda"`) runs on GPU 0 (runtime/cuda.py): its plan in device memory, each
    context's launches replayed as a CUDA graph (`cuda_graphs=False` or KILN_CUDA_GRAPHS=0: launched each run);
    inputs are NumPy arrays or DLPack device tensors (torch CUDA tensors), `run_dlpack` leaves outputs there.

    `thread_pool`: "kiln" (the artifact's own pool, codegen/pool.py; the default) or "tvm" (TVM's, as
    KILN_THREAD_POOL=tvm): the autotuner times candidates, which only know TVM's pool, between the model's
    kernels, and two pools on the same cores stall each other (autotune/context.py).
    """

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None,
                 max_concurrency: int | None = None, cuda_graphs: bool | None = None, thread_pool: str | None = None):
        self.path = Path(path).resolve()
        data, sealed = read_artifact(self.path, expect_arch=host_arch())
        if bundle_dir() is not None:
            load_bundle_runtime()  # a runtime-only machine: TVM's libraries from KILN_TVM_RUNTIME_DIR
        else:
            load_tvm_runtime()
        import tvm_ffi

        if num_threads is not None and num_threads < 1:
            raise InputError(f"num_threads must be ≥ 1, got {num_threads}")
        self.num_threads = num_threads
        try:
            self._lib = self._open(tvm_ffi, data)
            meta_fn = self._lib[META_SYMBOL]
        except ArtifactError:
            raise
        except Exception as err:  # noqa: BLE001  (a library that loads but is not ours, or does not load at all)
            raise ArtifactError(f"{path} is not a loadable Kiln artifact: {str(err).splitlines()[0]}") from None
        del data
        try:
            meta = json.loads(bytes(meta_fn()))
        except (ValueError, UnicodeDecodeError) as err:
            raise ArtifactError(f"{path}: metadata is corrupted ({err})") from None
        validate_metadata(meta, self.path)
        if meta.get("sealed") and not sealed:
            raise ArtifactError(f"{path} lost its seal (the checksum at its end): truncated or corrupted; copy or "
                                f"rebuild it")
        lacking = missing_features(meta.get("cpu_features", []))
        if lacking:
            raise ArtifactError(f"{path} was compiled for {meta.get('cpu', '?')} and uses CPU features this "
                                f"machine lacks: {', '.join(lacking)}; recompile with --target native")
        self.meta = meta
        self.inputs = [TensorInfo(d) for d in meta["inputs"]]
        self.outputs = [TensorInfo(d) for d in meta["outputs"]]
        self.activation_bytes = sum(meta["blocks"]) + sum(t.nbytes for t in self.inputs + self.outputs)
        if max_concurrency is not None and max_concurrency < 1:
            raise InputError(f"max_concurrency must be ≥ 1, got {max_concurrency}")
        # two contexts a core: callers past that wait (a run in flight per core, one more ready to start)
        self.max_concurrency = max_concurrency or 2 * usable_cpus()
        self._weights = self._read_weights(check_crc=not sealed)  # a seal already covers the weights
        self._entry = self._function(meta["entry"], "entry function") if meta.get("entry") else None
        self._kernels = [self._function(step["kernel"], "kernel") for step in meta["steps"]]
        self._input_values = {v["index"]: i for i, v in enumerate(meta["values"]) if v["kind"] == "input"}
        self._output_values = {v["index"]: i for i, v in enumerate(meta["values"]) if v["kind"] == "output"}
        self._small_outputs = all(t.nbytes < ZERO_COPY_MIN_BYTES for t in self.outputs)
        self.device = "cuda" if meta.get("target", {}).get("kind") == "cuda" else "cpu"
        self._parallel: OwnPool | None = None
        thread_pool = thread_pool or os.environ.get("KILN_THREAD_POOL", "kiln")
        if thread_pool not in ("kiln", "tvm"):
            raise InputError(f"thread_pool {thread_pool!r}: expected 'kiln' or 'tvm'")
        if self.device == "cpu" and meta.get("pool") and thread_pool == "kiln":
            self._parallel = OwnPool(self._function(meta["pool"], "thread pool"), num_threads or pool_limit())
            if not self._parallel.installed:
                self._parallel = None
        if self._parallel is None and num_threads is not None:
            set_num_threads(num_threads)
        self._cuda = None
        if self.device == "cuda":
            if self._entry is None:
                raise ArtifactError(f"{path}: a CUDA artifact needs the entry function; rebuild it")
            self._cuda = CudaExecutor(self, tvm_ffi, graphs=cuda_graphs)  # weights uploaded once
            self._weights = None  # the host copy is not needed any more
        self._idle = [self._new_context(tvm_ffi)]  # one at load: a bad plan fails here, one thread never waits
        self._contexts = 1
        self._waiting = 0  # callers waiting for a context
        self._pool = threading.Condition(threading.Lock())

    def _open(self, tvm_ffi, data: memoryview):
        """The artifact's library. A CUDA artifact needs TVM's CUDA runtime, loaded on the first one; a CUDA module
        stored as CUDA source gets the PTX built beside it (`model.ptx`) instead of a compiler."""
        try:
            return _open_private_copy(tvm_ffi, data, self.path.name)
        except Exception as err:  # TVM-FFI's errors: only the CUDA loader's is handled here
            if "load_from_bytes.cuda" not in str(err):  # TVM's CUDA runtime registers this loader
                raise
        why = load_cuda_runtime()
        if why is not None:
            raise ArtifactError(f"{self.path} was built for CUDA; no CUDA driver on this machine (TVM's CUDA runtime "
                                f"is not available: {why.splitlines()[0]}); run it on a machine with an NVIDIA GPU; "
                                f"its kernels are in {self.path.with_suffix('.ptx').name} beside it")
        with ptx_for_source(self.path.with_suffix(".ptx")):
            return _open_private_copy(tvm_ffi, data, self.path.name)

    def _new_context(self, tvm_ffi):
        return self._cuda.new_context() if self._cuda is not None else _Context(self, tvm_ffi)

    def _function(self, symbol: str, what: str):
        try:
            return self._lib[symbol]
        except Exception:  # noqa: BLE001  (TVM-FFI raises its own error for a missing symbol)
            raise ArtifactError(f"{self.path}: {what} {symbol} is missing") from None

    def _read_weights(self, check_crc: bool) -> np.ndarray:
        """The weights, copied once into an aligned arena that every context shares. Read in place through the
        blob's address where the artifact exports it (ResNet-50: 350 ms less than through a bytes object), or from
        the weights file beside the artifact (format 3, `weights_file`), checked against its size and CRC-32."""
        n = self.meta.get("weights_nbytes", 0)
        arena = aligned_empty((n,), "uint8")
        if not n:
            return arena
        if weights_path(self.path, self.meta) is not None:
            arena[:] = np.frombuffer(read_weights_file(self.path, self.meta), np.uint8)
            return arena
        try:
            view = self._lib[WEIGHTS_VIEW_SYMBOL]
        except AttributeError:  # built before the view existed
            view = None
        if view is not None:
            arena[:] = np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(view().value))
            weights = arena
        else:
            weights = bytes(self._lib[WEIGHTS_SYMBOL]())
            if len(weights) != n:
                raise ArtifactError(f"{self.path}: weights blob is {len(weights)} bytes, metadata says {n}")
            arena[:] = np.frombuffer(weights, np.uint8)
        if check_crc and "weights_crc32" in self.meta and zlib.crc32(weights) != self.meta["weights_crc32"]:
            raise ArtifactError(f"{self.path}: weights are corrupted (checksum mismatch); rebuild the artifact")
        return arena

    def _acquire(self) -> _Context:
        try:
            return self._idle.pop()  # atomic under the GIL: the uncontended case takes no lock
        except IndexError:
            pass
        with self._pool:
            self._waiting += 1  # before looking at _idle, so a release either sees it or we see its context
            try:
                while not self._idle:
                    if self._contexts < self.max_concurrency:
                        self._contexts += 1
                        break
                    self._pool.wait(0.05)
                else:
                    return self._idle.pop()
            finally:
                self._waiting -= 1
        import tvm_ffi

        try:
            return self._new_context(tvm_ffi)
        except BaseException:
            with self._pool:
                self._contexts -= 1
                self._pool.notify()
            raise

    def _release(self, ctx: _Context) -> None:
        self._idle.append(ctx)
        if self._waiting:
            with self._pool:
                self._pool.notify()

    def _check(self, args: tuple, named: dict) -> list[np.ndarray]:
        return check_inputs(self.inputs, args, named)

    def run(self, *args: np.ndarray, **named: np.ndarray) -> list[np.ndarray]:
        """Run the model; returns fresh arrays (later runs never change what an earlier run returned).

        Safe to call from several threads at once on one Model.
        """
        if self._cuda is not None:
            return self._run_cuda(args, named, lambda ctx, checked: ctx.run(checked))
        # a large output is written by the kernels straight into the array returned: copying it out of the
        # context afterwards was a second pass over it (a 1x1 conv + ReLU with 8 MB out: 2.7 -> 2.0 ms a run,
        # with 21 MB out: 4.9 -> 2.8 ms; interleaved, one process)
        checked = self._check(args, named)
        if self._small_outputs:  # the common case: the outputs are copied out of the context
            ctx = self._acquire()
            try:
                self._launch(ctx, checked, None)
                return [o.copy() for o in ctx.outputs]
            finally:
                self._release(ctx)
        fresh = [aligned_empty(t.shape, t.np_dtype) if t.nbytes >= ZERO_COPY_MIN_BYTES
                 else np.empty(t.shape, t.np_dtype) for t in self.outputs]
        return self._run_into(fresh, checked)

    __call__ = run

    def empty_inputs(self) -> list[np.ndarray]:
        """One uninitialized array per input, aligned for the kernels: fill them and pass them to `run`, and the
        kernels read them where they are. Any C-contiguous array works, but a large one that is not 64-byte
        aligned (NumPy's own allocations usually are not) is copied first: with a 21 MB input, 5.5 against 3.1 ms
        a run.

        >>> x, = m.empty_inputs()  # doctest: +SKIP
        >>> for frame in video: x[...] = frame; y = m.run(x)  # doctest: +SKIP
        """
        return [aligned_empty(t.shape, t.np_dtype) for t in self.inputs]

    def run_into(self, outputs: Sequence[np.ndarray], *args: np.ndarray, **named: np.ndarray) -> list[np.ndarray]:
        """Run the model, writing its outputs into `outputs` (one C-contiguous, writable array per output, of its
        shape and dtype) instead of new arrays: for hot loops. Large aligned buffers are written in place by the
        kernels; others get a copy. Returns `outputs`.

        >>> y = np.empty(m.outputs[0].shape, np.float32)  # doctest: +SKIP
        >>> for x in frames: m.run_into([y], x)  # doctest: +SKIP
        """
        if self._cuda is not None:
            for o, got in zip(check_outputs(self.outputs, outputs), self.run(*args, **named)):
                np.copyto(o, got)
            return list(outputs)
        checked = self._check(args, named)
        return self._run_into(check_outputs(self.outputs, outputs), checked)

    def _run_into(self, outs: list[np.ndarray], checked: list[np.ndarray]) -> list[np.ndarray]:
        ctx = self._acquire()
        try:
            self._launch(ctx, checked, outs)
            for k, (o, mine) in enumerate(zip(outs, ctx.outputs)):
                if ctx.out_bound[k] == ctx.out_at[k]:
                    np.copyto(o, mine)
            return list(outs)
        finally:
            self._release(ctx)

    def run_dlpack(self, *args, **named) -> list:
        """Run a CUDA artifact and leave its outputs on the device: fresh tensors that any DLPack consumer takes
        without a copy (`torch.from_dlpack(y)`). Inputs as for `run`, NumPy or DLPack device tensors."""
        if self._cuda is None:
            raise InputError(f"run_dlpack is for CUDA artifacts; {self.path.name} runs on the CPU: use run")
        return self._run_cuda(args, named, lambda ctx, checked: ctx.run_dlpack(checked))

    def _run_cuda(self, args: tuple, named: dict, fn):
        ctx = self._acquire()
        try:
            return fn(ctx, device_inputs(self.inputs, args, named, ctx.stream, check_inputs))
        finally:
            self._release(ctx)

    def _launch(self, ctx: _Context, checked: list[np.ndarray], outs: list[np.ndarray] | None) -> None:
        """`_execute` on the thread and pool the model's runs use (runtime/threads.py)."""
        run_kernels(lambda: self._execute(ctx, checked, outs), self.num_threads, self._parallel)

    def _execute(self, ctx: _Context, checked: list[np.ndarray], outs: list[np.ndarray] | None) -> None:
        if self._entry is None:
            for staging, v in zip(ctx.inputs, checked):
                np.copyto(staging, v)
            for fn, fargs in ctx.steps:
                fn(*fargs)
            return
        self._bind_inputs(ctx, checked)
        if outs is not None:
            table = ctx.table["data"]
            for k in range(len(ctx.outputs)):
                at = ctx.out_at[k]
                mine = _in_place(outs[k], self.outputs[k].nbytes)
                if mine is not None and not any(np.may_share_memory(outs[k], v) for v in checked):
                    at = mine  # the kernels write the caller's buffer (never one an input lies in)
                if at != ctx.out_bound[k]:
                    table[self._output_values[k]] = ctx.out_bound[k] = at
        elif ctx.out_bound != ctx.out_at:  # a run_into before pointed them at the caller's buffers
            table = ctx.table["data"]
            for k, at in enumerate(ctx.out_at):
                table[self._output_values[k]] = ctx.out_bound[k] = at
        self._entry(ctx.table_tensor)  # every kernel, in native code

    def _bind_inputs(self, ctx: _Context, checked: list[np.ndarray]) -> None:
        """Point the table at each input where it lies (64 KB or more, aligned, contiguous) or copy it into the
        context's staging buffer. The array read in place last run, passed again, is left as bound: reading an
        array's address (`.ctypes` or `__array_interface__`) costs 30-45 µs right after a run has pushed NumPy out
        of the caches, 2% of a ShuffleNet run. The context holds that array, so NumPy refuses to resize it (its
        address cannot change); its strides are compared because they can still be set in place."""
        for k, v in enumerate(checked):
            held = ctx.held[k]
            if held is not None and v is held[0] and v.strides == held[1]:
                continue
            at = _in_place(v, self.inputs[k].nbytes) or ctx.staging_at[k]
            if at != ctx.bound[k]:
                ctx.table["data"][self._input_values[k]] = ctx.bound[k] = at
            if at == ctx.staging_at[k]:
                np.copyto(ctx.inputs[k], v)  # an unaligned array never reaches a vectorized kernel
                ctx.held[k] = None
            else:
                ctx.held[k] = (v, v.strides)

    def profile(self, repeat: int = 20) -> dict:
        """Per-kernel median times (each kernel called `repeat` times on the current buffers), the whole run's
        and the kernels-only median, and `overhead_ms`, what the executor adds to the kernels (paired)."""
        if self._cuda is not None:
            raise ArtifactError("per-kernel profiles of CUDA artifacts are not implemented (issue 15); time whole "
                                "runs with CUDA events: bench/gpu_check.py")
        feeds = [np.zeros(t.shape, t.dtype) for t in self.inputs]
        self.run(*feeds)
        ctx = self._acquire()
        try:
            self._execute(ctx, feeds, None)
            kernel_rows = []
            for (fn, fargs), step in zip(ctx.steps, self.meta["steps"]):
                ms = float(np.median(time_ms(lambda fn=fn, fargs=fargs: fn(*fargs), repeat)))
                kernel_rows.append({"kernel": step["kernel"], "name": step.get("name", ""),
                                    "ops": step.get("ops", []), "ms": ms,
                                    "gflops": step.get("flops", 0) / (ms * 1e6) if ms > 0 else 0.0,
                                    "schedule": step.get("schedule", ""), "template": step.get("template", ""),
                                    "workload": step.get("workload", ""), "config": step.get("config", {}),
                                    "config_source": step.get("config_source", "")})

            # The whole run and the kernels alone (the native entry, or the loop over kernels), call by call in
            # turn, so each pair sees the same moment of the machine: the median of the pairs' differences is what
            # the executor adds (checks, copies, calls). Two medians taken one after the other read 3.4 ms and
            # -7.6 ms on a loaded VM where the pairs give a few tenths.
            def whole_run() -> None:
                self._execute(ctx, self._check(tuple(feeds), {}), None)
                [o.copy() for o in ctx.outputs]

            if self._entry is not None:
                def kernels() -> None:
                    self._entry(ctx.table_tensor)
            else:
                def kernels() -> None:
                    for fn, fargs in ctx.steps:
                        fn(*fargs)
            whole_run(), kernels()
            pairs = np.array([(time_ms(whole_run, 1, 0)[0], time_ms(kernels, 1, 0)[0])
                              for _ in range(max(repeat, 10))])
            run_ms, kernels_only = float(np.median(pairs[:, 0])), float(np.median(pairs[:, 1]))
            overhead_ms = float(np.median(pairs[:, 0] - pairs[:, 1]))
            for k, ms in zip(kernel_rows, self._in_sequence_ms(ctx, repeat)):
                k["in_sequence_ms"] = ms
        finally:
            self._release(ctx)
        return {"run_ms": run_ms, "kernels_ms": kernels_only, "overhead_ms": overhead_ms, "kernels": kernel_rows,
                "sum_of_isolated_kernels_ms": sum(k["ms"] for k in kernel_rows)}

    @contextlib.contextmanager
    def kernel_sequence(self, feeds: Sequence[np.ndarray] | None = None):
        """The kernels of one run, in order, as (kernel, argument tensors, step metadata), on an execution
        context held until the block ends and after one real run (on `feeds`, zeros by default), so every
        buffer holds what a run leaves there. For timing one kernel where the model runs it, between the
        kernels before and after it: the autotuner's in-model timing (autotune/context.py)."""
        if self._cuda is not None:
            raise ArtifactError("kernel_sequence times kernels on the CPU; CUDA artifacts run as one launch sequence")
        with self._after_one_run(feeds) as ctx:
            yield [(fn, fargs, step) for (fn, fargs), step in zip(ctx.steps, self.meta["steps"])]

    @contextlib.contextmanager
    def _after_one_run(self, feeds: Sequence[np.ndarray] | None):
        """An execution context held for the block, after one real run on `feeds` (zeros by default)."""
        checked = self._check(tuple(feeds or [np.zeros(t.shape, t.dtype) for t in self.inputs]), {})
        ctx = self._acquire()
        try:
            self._execute(ctx, checked, None)
            yield ctx
        finally:
            self._release(ctx)

    def _in_sequence_ms(self, ctx: _Context, repeat: int) -> list[float]:
        """Each kernel's median time inside whole runs (the entry stamps the clock between kernels), where it
        meets cold weights and inputs left in the other core's cache; empty for artifacts without stamps."""
        if self._entry is None:
            return []
        try:
            rows = self._stamped(ctx, repeat + 3)
        except Exception:  # noqa: BLE001  (an artifact built before the entry took stamps)
            return []
        return [float(v) for v in np.median(rows[3:], axis=0)]

    def stamped_runs(self, runs: int, feeds: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """Milliseconds of every kernel (columns, in `meta["steps"]` order) in each of `runs` whole runs (rows),
        stamped by the entry between kernels: the samples behind `profile`'s in-sequence column, for setting a
        model's kernels beside another engine's per-node profile taken in the same stretch of time
        (bench/nodes.py)."""
        if self._cuda is not None or self._entry is None:
            raise ArtifactError("stamped runs need a CPU artifact with the native entry function; rebuild it")
        with self._after_one_run(feeds) as ctx:
            return self._stamped(ctx, runs)

    def _stamped(self, ctx: _Context, runs: int) -> np.ndarray:
        import tvm_ffi

        stamps = np.zeros(len(self._kernels) + 1, np.int64)
        handle = tvm_ffi.from_dlpack(stamps)
        rows = np.empty((runs, len(self._kernels)))
        for i in range(runs):
            self._entry(ctx.table_tensor, handle)
            rows[i] = np.diff(stamps) / 1e6
        return rows

    def __repr__(self) -> str:
        return f"Model({self.path.name}: {self.inputs} -> {self.outputs}, {len(self._kernels)} kernels)"


def _in_place(a: np.ndarray, nbytes: int) -> int | None:
    """The address of `a` if kernels may use it where it is: large enough to be worth it, contiguous, aligned.
    (`__array_interface__` rather than `.ctypes`: 31 against 44 µs with the caches cold after a run.)"""
    if nbytes < ZERO_COPY_MIN_BYTES or not a.flags.c_contiguous:
        return None
    ptr = a.__array_interface__["data"][0]
    return ptr if ptr % ALIGN == 0 else None


def check_outputs(outputs: list[TensorInfo], given: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Caller-provided output buffers, each checked against the output's shape and dtype."""
    if len(given) != len(outputs):
        raise InputError(f"model gives {len(outputs)} outputs {[t.name for t in outputs]}, got {len(given)} "
                         f"output buffers")
    for t, o in zip(outputs, given):
        if not isinstance(o, np.ndarray) or o.dtype != t.np_dtype or o.shape != t.shape:
            got = f"{o.dtype.name}{list(o.shape)}" if isinstance(o, np.ndarray) else type(o).__name__
            raise InputError(f"output '{t.name}' is {t.dtype}{list(t.shape)}; its buffer is {got}")
        if not o.flags.writeable or not o.flags.c_contiguous:
            raise InputError(f"output '{t.name}': its buffer must be writable and C-contiguous")
    return list(given)


def check_inputs(inputs: list[TensorInfo], args: tuple, named: dict) -> list[np.ndarray]:
    """The inputs in the model's order, each checked against its name, dtype and shape."""
    # the hot loop's cases first, positional or named arrays that match, in plain loops: this runs right after the
    # previous run's kernels have pushed the interpreter out of the caches, where every extra call costs µs
    if not named:
        if len(args) == len(inputs):
            for v, t in zip(args, inputs):
                if type(v) is not np.ndarray or v.dtype != t.np_dtype or v.shape != t.shape:
                    break
            else:
                return list(args)
    elif not args and len(named) == len(inputs):
        out = []
        for t in inputs:
            v = named.get(t.name)
            if type(v) is not np.ndarray or v.dtype != t.np_dtype or v.shape != t.shape:
                break
            out.append(v)
        else:
            return out
    names = [t.name for t in inputs]
    if len(args) > len(names):
        raise InputError(f"model takes {len(names)} inputs {names}, got {len(args)} positional")
    given = dict(zip(names, args))
    for k, v in named.items():
        if k in given:
            raise InputError(f"input '{k}' given twice, positionally and by name")
        given[k] = v
    missing = [n for n in names if n not in given]
    extra = [n for n in given if n not in names]
    if missing or extra:
        raise InputError(f"inputs {sorted(given)} do not match the model's {names}"
                         + (f"; missing {missing}" if missing else "") + (f"; unexpected {extra}" if extra else ""))
    out = []
    for t in inputs:
        v = np.asarray(given[t.name])
        if v.dtype.name != t.dtype:
            raise InputError(f"input '{t.name}' expects {t.dtype}{list(t.shape)}, got {v.dtype.name}; "
                             f"pass x.astype(np.{t.dtype})")
        if tuple(v.shape) != t.shape:
            raise InputError(f"input '{t.name}' expects {t.dtype}{list(t.shape)}, got shape {list(v.shape)}")
        out.append(v)
    return out


_DLTENSOR = np.dtype([("data", "u8"), ("device_type", "i4"), ("device_id", "i4"), ("ndim", "i4"),
                      ("code", "u1"), ("bits", "u1"), ("lanes", "u2"), ("shape", "u8"), ("strides", "u8"),
                      ("byte_offset", "u8")])
assert _DLTENSOR.itemsize == 48


def _descriptor_table(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """One DLTensor per value, pointing at the buffers allocated at load: what the native entry hands kernels."""
    table = np.zeros(len(arrays), dtype=_DLTENSOR)
    shapes = np.zeros(sum(max(a.ndim, 1) for a in arrays), dtype=np.int64)
    at = 0
    for i, a in enumerate(arrays):
        shapes[at:at + a.ndim] = a.shape
        table[i] = (a.ctypes.data, 1, 0, a.ndim, *dlpack_code(a.dtype), 1, shapes[at:].ctypes.data, 0, 0)
        at += max(a.ndim, 1)
    return table, shapes


def load(path: str | os.PathLike, num_threads: int | None = None, max_concurrency: int | None = None,
         cuda_graphs: bool | None = None, thread_pool: str | None = None) -> Model:
    """Load a compiled artifact. The whole file is read and its checksum verified first; the kernels then run
    from a private copy, so the file may be replaced or deleted while the model is loaded.

    >>> import kiln  # doctest: +SKIP
    >>> m = kiln.load("model.so"); y = m.run(x)  # doctest: +SKIP
    """
    return Model(path, num_threads, max_concurrency, cuda_graphs, thread_pool)
