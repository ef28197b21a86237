"""Builder and local runner: candidates build in worker processes and time in an isolated child; a crash, a hang
or a wrong result costs one candidate and the rest of the batch still runs."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from kiln.autotune.builder import BuildResult, LocalBuilder, MeasureInput, build_one
from kiln.autotune.runner import LocalRunner, MeasureResult, compare
from kiln.autotune.tasks import Task
from kiln.codegen.target import resolve_target
from kiln.ir.ops.elementwise import RELU
from kiln.ir.ops.softmax import SOFTMAX
from kiln.schedules.dispatch import task_of
from kiln.schedules.template import template_named

from tests.groups import op_group

SHAPE = ((8, 64), "float32")


def make_task(op, attrs, target) -> Task:
    fn = op_group(op, [SHAPE], attrs)
    template, wl = task_of(fn, target)
    return Task(template, wl, fn, target)


@pytest.fixture(scope="module")
def target():
    return resolve_target("x86-avx2")  # runs on any x86-64 host with AVX2; lanes pinned, not the host's


@pytest.fixture(scope="module")
def softmax(target) -> Task:
    return make_task(SOFTMAX, SOFTMAX.make_attrs(axis=1), target)


def native_kernel(tmp_path, name: str, body: str) -> str:
    """A library whose `main` (TVM-FFI ABI) runs `body`: a candidate that crashes or hangs in native code."""
    src, lib = tmp_path / f"{name}.c", tmp_path / f"{name}.so"
    src.write_text(
        f"int __tvm_ffi_main(void* self, const void* args, int n, void* ret) {{ {body} return 0; }}\n"
    )
    subprocess.run(["gcc", "-shared", "-fPIC", "-O0", str(src), "-o", str(lib)], check=True)
    return str(lib)


def test_pickled_task_keeps_op_and_template_identity(softmax, target):
    back = pickle.loads(pickle.dumps(softmax))
    assert back.group.body.op is SOFTMAX  # passes compare handles: `call.op is SOFTMAX`
    assert back.template is template_named("x86.softmax")
    assert str(back.target) == str(target) and back.key == softmax.key
    assert back.default() == softmax.default()


def test_build_errors_and_timeouts_are_results(softmax, tmp_path):
    riscv = Task(
        softmax.template,
        softmax.workload,
        softmax.group,
        resolve_target({"kind": "llvm", "mtriple": "riscv64-linux-gnu"}),
    )
    failed = build_one(riscv, riscv.default(), str(tmp_path / "r.so"))
    assert failed.path is None and failed.error.startswith("build: "), failed
    late = build_one(softmax, softmax.default(), str(tmp_path / "t.so"), timeout_s=0.001)
    assert late.path is None and late.error == "build timeout after 0.001 s", late


def test_candidates_build_in_workers_and_time_with_reference_check(softmax):
    configs = list(softmax.space())[::3]  # lanes 1, 2, 8, 16; store_exp both ways
    inputs = [MeasureInput(softmax, cfg, check=True) for cfg in configs]
    with LocalBuilder(workers=2) as builder:
        builds = builder.build(inputs)
        assert [b.error for b in builds] == [None] * len(configs)
        results = LocalRunner(repeat=3, timeout_s=20).run(inputs, builds)
    for cfg, r in zip(configs, results):
        assert r.error is None and len(r.costs_s) == 3 and min(r.costs_s) > 0, (cfg, r)
        assert r.build_s > 0 and r.run_s > 0


def test_crash_hang_and_wrong_result_each_cost_one_candidate(softmax, target, tmp_path):
    relu = make_task(RELU, None, target)  # same signature as the softmax, another result
    good = MeasureInput(softmax, softmax.default(), check=True)
    with LocalBuilder(workers=1, build_dir=str(tmp_path)) as builder:
        ok, wrong = builder.build([good, MeasureInput(relu, relu.default())])
    crash = BuildResult(native_kernel(tmp_path, "crash", "*(volatile int*)0 = 1;"), None, 0.0)
    hang = BuildResult(native_kernel(tmp_path, "hang", "for (volatile int i = 0; ; ) i++;"), None, 0.0)
    unbuilt = BuildResult(None, "build: InvalidConfig: lanes 3 does not divide 64", 0.5)
    batch = [(good, ok), (good, crash), (good, ok), (good, hang), (good, wrong), (good, unbuilt), (good, ok)]
    results = LocalRunner(repeat=2, timeout_s=3).run([i for i, _ in batch], [b for _, b in batch])
    errors = [r.error for r in results]
    assert errors[0] is None and errors[2] is None and errors[6] is None, errors
    assert errors[1] == "crash: signal 11"
    assert errors[3] == "timeout after 3 s"
    assert errors[4].startswith("wrong result: max abs err"), errors[4]
    assert errors[5] == unbuilt.error and results[5].build_s == 0.5
    assert all(len(results[i].costs_s) == 2 for i in (0, 2, 6)) and not results[1].costs_s


def test_compare_lets_a_quantized_output_flip_one_step_rarely():
    want = np.arange(4000, dtype=np.int64).reshape(40, 100) % 200
    got = want.copy()
    got[3, 7] += 1  # a float sum in another order rounding next to a .5 the other way
    assert compare(got.astype(np.uint8), want.astype(np.uint8)) is None
    assert compare(got.astype(np.int32), want.astype(np.int32)).startswith("wrong result")  # integer math: exact
    got[5, :10] += 1  # 11 of 4,000: more than one in a thousand
    assert compare(got.astype(np.uint8), want.astype(np.uint8)).startswith("wrong result")
    got = want.copy()
    got[0, 0] += 2  # two steps: never a rounding flip
    assert compare(got.astype(np.uint8), want.astype(np.uint8)).startswith("wrong result: max abs err 2")


def test_compare_lets_a_dequantized_output_flip_one_step_rarely():
    want = np.linspace(-3, 3, 4000).astype(np.float32)
    got = want.copy()
    got[[5, 900]] += 0.0342  # one step of 0.0342, 2 of 4,000 values
    assert compare(got, want).startswith("wrong result")  # a float output: no flips allowed
    assert compare(got, want, step=0.0342) is None
    got[100:110] += 0.0342  # 12 of 4,000
    assert compare(got, want, step=0.0342).startswith("wrong result")
    got = want.copy()
    got[7] += 0.07  # two steps
    assert compare(got, want, step=0.0342).startswith("wrong result")


def test_compare_uses_the_dtype_tolerance():
    want = np.linspace(-1, 1, 12, dtype="float32").reshape(3, 4)
    assert compare(want * (1 + 5e-4), want) is None  # inside rtol 1e-3
    assert compare(want + 0.01, want).startswith("wrong result: max abs err 0.01")
    assert compare(np.full_like(want, np.nan), want).startswith("wrong result: max abs err inf")
    assert compare(want.astype("float16") + np.float16(0.004), want.astype("float16")) is None
    assert compare(np.arange(4, dtype="int32") + 1, np.arange(4, dtype="int32")).startswith("wrong result")


def test_a_batch_file_measures_where_it_is_run(softmax, tmp_path):
    """The GPU-machine shape: built files and a pickled batch go over, a pickled list of results comes back."""
    inputs = [MeasureInput(softmax, softmax.default(), check=True), MeasureInput(softmax, {"lanes": 3})]
    with LocalBuilder(workers=1, build_dir=str(tmp_path)) as builder:
        (built,) = builder.build(inputs[:1])
    builds = [
        BuildResult(os.path.basename(built.path), None, built.build_s),
        BuildResult(None, "build: x", 0.1),
    ]
    batch = {"inputs": inputs, "builds": builds, "options": {"repeat": 2, "timeout_s": 20}}
    (tmp_path / "batch.pkl").write_bytes(pickle.dumps(batch))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "kiln.autotune.runner",
            str(tmp_path / "batch.pkl"),
            str(tmp_path / "results.pkl"),
        ],
        check=True,
        cwd="/",
    )
    results = pickle.loads((tmp_path / "results.pkl").read_bytes())
    assert [type(r) for r in results] == [MeasureResult, MeasureResult]  # the package's class, not __main__'s
    assert results[0].error is None and len(results[0].costs_s) == 2, results[0]
    assert results[1].error == "build: x" and not results[1].costs_s
