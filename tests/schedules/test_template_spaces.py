"""Every template's knob space, checked the way a tuner uses it (issue 11): configs drawn at random from each
task's space, on the tasks of real models, build and match the NumPy reference (the interpreter on the group);
on CUDA they compile to PTX. The default suite draws from small builder models; the slow suite from the zoo."""

from __future__ import annotations

import random

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from kiln import model_builders as mb
from kiln import zoo
from kiln.config import Options
from kiln.driver import model_tasks

from ..groups import run_lowered

SMALL = {
    "resnet18": lambda: mb.resnet18(size=32),
    "mobilenet_v2": lambda: mb.mobilenet_v2(size=32),
    "bert_layer": lambda: mb.bert_layer(seq=16, hidden=64, heads=4, ffn=128),
}


def _tasks(models: dict, target: str):
    out = []
    for name, make in models.items():
        for t in model_tasks(make(), Options(target=target)):
            out.append((name, t))
    return out


def _check(task, cfg, target):
    g = task.lower(cfg)
    assert g.config_source == "given", (task.workload.summary(), cfg, g.config_source)
    assert g.template == task.workload.template
    inputs = task.inputs(cfg, seed=1)
    got = run_lowered(g, target, inputs)
    want = task.reference(cfg, inputs)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3,
                               err_msg=f"{task.workload.summary()} config {cfg}")


def _draws(task, n: int, seed: int):
    space = task.space()
    rng = random.Random(seed)
    picks = {space.index(task.default())} | {rng.randrange(len(space)) for _ in range(n)}
    return [space.at(i) for i in sorted(picks)]


@pytest.fixture(scope="module", params=[pytest.param("x86-avx512", marks=pytest.mark.slow), "x86-avx2"])  # avx512: -m slow
def small_tasks(request):
    from kiln.codegen.target import resolve_target

    return request.param, resolve_target(request.param), _tasks(SMALL, request.param)


def test_every_template_is_exercised(small_tasks):
    _, _, tasks = small_tasks
    names = {t.template.name for _, t in tasks}
    assert {"x86.conv2d_nchwc", "x86.depthwise_pointwise", "x86.pool_nchwc", "x86.dense_packed",
            "x86.batch_matmul", "x86.softmax", "x86.layer_norm", "x86.generic"} <= names, names


@pytest.mark.slow  # 35 s on AVX2 alone; each template's own random-config tests stay in the default run
def test_random_configs_build_and_match_the_reference(small_tasks):
    _, target, tasks = small_tasks
    checked = 0
    for i, (model, task) in enumerate(tasks):
        if len(task.space()) == 1:
            continue
        for cfg in _draws(task, 2, seed=i):
            _check(task, cfg, target)
            checked += 1
    assert checked >= 20


def test_defaults_lie_in_their_spaces(small_tasks):
    _, _, tasks = small_tasks
    for _, task in tasks:
        assert task.default() in task.space(), task.workload.summary()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["resnet50", "mobilenet_v2", "bert_layer", "shufflenet", "inception_v1"])
def test_random_configs_on_zoo_models(model):
    from kiln.codegen.target import resolve_target

    target = resolve_target("x86-avx512")
    tasks = model_tasks(zoo.resolve(f"zoo:{model}"), Options(target="x86-avx512"))
    for i, task in enumerate(tasks):
        if len(task.space()) > 1:
            for cfg in _draws(task, 3, seed=i):
                _check(task, cfg, target)


def test_cuda_configs_compile_to_ptx():
    import shutil

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed: CUDA kernels cannot be compiled here")
    from kiln.codegen.target import resolve_target

    target = resolve_target("cuda-sm80")
    tasks = _tasks({"resnet18": SMALL["resnet18"], "bert_layer": SMALL["bert_layer"]}, "cuda-sm80")
    built = 0
    for i, (_, task) in enumerate(tasks):
        if len(task.space()) == 1 and task.template.name == "cuda.generic":
            continue
        for cfg in _draws(task, 1, seed=i):
            g = task.lower(cfg)
            assert g.config_source == "given"
            tvm.compile(tvm.IRModule({"main": g.prim_func}), target=target)
            built += 1
    assert built >= 3
