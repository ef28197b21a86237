"""CUDA schedules, compiled for sm_80 and through the local nvcc to PTX (no GPU here to run them): conv and
dense kernels stage tiles in shared memory, every kernel binds blockIdx/threadIdx with more than one thread,
and whole models build with every conv and dense on its template."""

import random
import re
import shutil

import numpy as np
import pytest
from kiln.codegen.build import build
from kiln.codegen.cuda import compile_ptx, device_source, ptx_kernels
from kiln.codegen.target import resolve_target
from kiln.frontend import from_onnx
from kiln.ir import Call
from kiln.ir.ops.conv import CONV2D, ConvAttrs
from kiln.ir.ops.dense import DENSE, DENSE_PACKED, MATMUL, DenseAttrs, PackedDenseAttrs
from kiln.ir.ops.elementwise import ADD, MULTIPLY, RELU, SIGMOID
from kiln.ir.ops.norm import LAYER_NORM, LayerNormAttrs
from kiln.ir.ops.pool import MAX_POOL, PoolAttrs
from kiln.ir.ops.reduce import ARGMAX, ArgReduceAttrs
from kiln.ir.ops.softmax import SOFTMAX, SoftmaxAttrs
from kiln.passes import O2, run
from kiln.schedules.cuda import conv2d_direct, dense_tiled, generic
from kiln.schedules.template import find
from kiln.schedules.workload import Group

import kiln
from kiln import model_builders
from kiln.config import Options
from kiln.errors import ArtifactError
from tests.groups import group, lower, op_group, params

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (the CUDA toolkit) is not on PATH")

KERNEL = re.compile(r'extern "C" __global__ void __launch_bounds__\((\d+)\) (\w+)\(')
TEMPLATES = {"conv2d_direct": conv2d_direct, "dense_tiled": dense_tiled, "generic": generic}


@pytest.fixture(scope="module")
def target():
    return resolve_target("cuda-sm80")


def _kernels(source: str) -> dict[str, tuple[int, str]]:
    """{kernel name: (threads per block, source text)} of CUDA C from TVM."""
    heads = list(KERNEL.finditer(source))
    return {m.group(2): (int(m.group(1)), source[m.start():heads[i + 1].start() if i + 1 < len(heads) else None])
            for i, m in enumerate(heads)}


# --- groups as fuse_ops makes them, lowered through the template registry ----------------------------------

def _conv(x_shape, w_shape, strides=(1, 1), padding=(1, 1, 1, 1), groups=1, relu=True):
    """conv + bias (+ relu), the shape of a CNN's groups."""
    ps = params((x_shape, "float32"), (w_shape, "float32"), ((w_shape[0], 1, 1), "float32"))
    y = Call(ADD, (Call(CONV2D, (ps[0], ps[1]), ConvAttrs(strides, padding, (1, 1), groups)), ps[2]), ADD.attrs_type())
    return group(ps, Call(RELU, (y,), RELU.attrs_type()) if relu else y)


def _dense(m, k, n):
    ps = params(((m, k), "float32"), ((n, k), "float32"), ((n,), "float32"))
    return group(ps, Call(ADD, (Call(DENSE, (ps[0], ps[1]), DenseAttrs()), ps[2]), ADD.attrs_type()))


def _dense_times_input(m, k):
    """(x @ Wᵀ) * x: an epilogue that reads the GEMM's own input, which must keep its global copy (found by
    fuzzing: it was sent to the shared tile, outside the tile's loop)."""
    ps = params(((m, k), "float32"), ((k, k), "float32"))
    return group(ps, Call(MULTIPLY, (Call(DENSE, (ps[0], ps[1]), DenseAttrs()), ps[0]), MULTIPLY.attrs_type()))


def _elementwise(shape):
    ps = params((shape, "float32"), (shape, "float32"))
    return group(ps, Call(ADD, (Call(MULTIPLY, (Call(SIGMOID, (ps[0],), SIGMOID.attrs_type()), ps[1]),
                                     MULTIPLY.attrs_type()), ps[0]), ADD.attrs_type()))


GROUPS = {  # name: (group, template, the schedule steps' start)
    "conv3x3": (_conv((1, 32, 28, 28), (64, 32, 3, 3)), "conv2d_direct", "conv2d_direct.cuda"),
    "conv7x7_s2_rgb": (_conv((1, 3, 56, 56), (64, 3, 7, 7), (2, 2), (3, 3, 3, 3)), "conv2d_direct",
                       "conv2d_direct.cuda"),
    "conv1x1_s2": (_conv((1, 64, 14, 14), (128, 64, 1, 1), (2, 2), (0, 0, 0, 0), relu=False), "conv2d_direct",
                   "conv2d_direct.cuda"),
    "depthwise3x3": (_conv((1, 96, 14, 14), (96, 1, 3, 3), groups=96), "conv2d_direct", "conv2d_direct.cuda"),
    "conv_odd_7x7": (_conv((1, 17, 7, 7), (33, 17, 3, 3)), "conv2d_direct", "conv2d_direct.cuda"),
    "dense_gemv": (_dense(1, 512, 1000), "dense_tiled", "dense_tiled.cuda"),
    "dense_gemm": (_dense(128, 256, 768), "dense_tiled", "dense_tiled.cuda"),
    "dense_packed": (op_group(DENSE_PACKED, [((16, 64), "float32"), ((8, 64, 16), "float32")], PackedDenseAttrs(16)),
                     "dense_tiled", "dense_tiled.cuda"),
    "batch_matmul": (op_group(MATMUL, [((12, 16, 64), "float32"), ((12, 64, 16), "float32")], DenseAttrs()),
                     "dense_tiled", "dense_tiled.cuda"),
    "softmax": (op_group(SOFTMAX, [((8, 1000), "float32")], SoftmaxAttrs(1)), "generic", "row"),
    "layer_norm": (op_group(LAYER_NORM, [((16, 768), "float32"), ((768,), "float32"), ((768,), "float32")],
                            LayerNormAttrs(1)), "generic", "row"),
    "max_pool": (op_group(MAX_POOL, [((1, 64, 56, 56), "float32")],
                          PoolAttrs((3, 3), (2, 2), (1, 1, 1, 1), (1, 1))), "generic", "per_thread"),
    "elementwise": (_elementwise((2, 3, 33, 35)), "generic", "injective"),
    # found by fuzzing (bench/fuzz_models.py): an arg-max writes an index and a value, and both must be local;
    # a matmul whose A tile is one row per block left the shared copy no loop to bind
    "argmax": (op_group(ARGMAX, [((300, 9), "float32")], ArgReduceAttrs(axis=1, keepdims=False)), "generic",
               "per_thread"),
    "dense_epilogue_reads_a": (_dense_times_input(128, 64), "dense_tiled", "dense_tiled.cuda"),
    "matmul_one_row_batches": (op_group(MATMUL, [((2, 1, 5, 12), "float32"), ((12, 8), "float32")], DenseAttrs()),
                               "dense_tiled", "dense_tiled.cuda"),
    # not claimed by a template: the generic schedule takes them
    "matmul_vector": (op_group(MATMUL, [((32,), "float32"), ((32, 300), "float32")], DenseAttrs()), "generic",
                      "per_thread"),
    "dense_f64_wide": (op_group(DENSE, [((17, 64), "float64"), ((512, 64), "float64")], DenseAttrs()), "generic",
                       "per_thread"),  # the default tiles need 64 KiB of shared memory
}


@pytest.fixture(scope="module")
def single_ops(target):
    """Every group of GROUPS lowered, compiled in one tvm.compile and one nvcc run."""
    import tvm

    lowered = {name: lower(fn, target) for name, (fn, _, _) in GROUPS.items()}
    funcs = {name: g.prim_func.with_attr("global_symbol", name) for name, g in lowered.items()}
    source = device_source(tvm.compile(tvm.IRModule(funcs), target=target))
    return lowered, source, compile_ptx(source, target)


@pytest.mark.parametrize("name", GROUPS)
def test_group_gets_its_template(single_ops, name):
    lowered, _, _ = single_ops
    _, template, steps = GROUPS[name]
    g = lowered[name]
    assert g.template == f"cuda.{template}@1", f"{name}: {g.template}"
    assert g.schedule.startswith(steps), f"{name}: {g.schedule}"
    assert g.config_source == "default"


@pytest.mark.parametrize("name", GROUPS)
def test_every_kernel_binds_blocks_and_threads(single_ops, name):
    _, source, _ = single_ops
    kernels = {k: v for k, v in _kernels(source).items() if k.startswith(name + "_kernel")}
    assert kernels, f"no kernel for {name}"
    for kernel, (threads, text) in kernels.items():
        assert threads > 1, f"{kernel} runs on one thread"
        assert "threadIdx.x" in text and "blockIdx.x" in text, kernel


@pytest.mark.parametrize("name", [n for n, (_, t, _) in GROUPS.items() if t != "generic"])
def test_templates_stage_tiles_in_shared_memory(single_ops, name):
    _, source, ptx = single_ops
    (_, text), = [v for k, v in _kernels(source).items() if k.startswith(name + "_kernel")]
    assert "__shared__" in text and "__syncthreads()" in text, name
    assert re.search(r"float \w+_local\w*\[\d+\]", text), f"{name}: no local accumulators"
    body = ptx[ptx.index(f".entry {name}_kernel"):]
    body = body[:body.index("\n}\n")]
    assert ".shared" in body and "bar.sync" in body, name


def test_ptx_is_for_sm80(single_ops):
    _, source, ptx = single_ops
    assert re.search(r"^\.target sm_80\b", ptx, re.MULTILINE)
    assert sorted(ptx_kernels(ptx)) == sorted(_kernels(source))


# --- spaces and configs -------------------------------------------------------------------------------------

def _task(fn, target):
    from kiln.schedules.target_info import target_info

    info = target_info(target)
    template = find(Group(fn), "cuda")
    wl = template.workload(Group(fn), info)
    return template, wl, template.space(wl, info)


@pytest.mark.parametrize("name", GROUPS)
def test_default_config_is_in_the_space(target, name):
    template, wl, space = _task(GROUPS[name][0], target)
    cfg = template.default(wl, None)
    assert cfg in space, f"{name}: default {cfg} not in {template.key}'s space"


def test_spaces_hold_exactly_the_configs_check_accepts(target):
    """The branches encode check(): every config of the knob grid that passes it is in the space, no other."""
    import itertools

    from kiln.errors import InvalidConfig

    def pairs(extent, limits):
        return [p for p in itertools.product(range(1, limits[0] + 1), range(1, limits[1] + 1))
                if extent % (p[0] * p[1]) == 0]

    for module, fn, axes, depth in ((conv2d_direct, _conv((1, 12, 6, 6), (24, 12, 3, 3)), ("oc", "oh", "ow"), "tile_ic"),
                                    (dense_tiled, _dense(12, 40, 20), ("m", "n"), "tile_k")):
        _, wl, space = _task(fn, target)
        accepted = []
        grids = [pairs(wl[a], module.LIMITS[a]) for a in axes]
        reduce_extent = wl["ic"] if depth == "tile_ic" else wl["k"]
        for tiles in itertools.product(*grids):
            for d in range(1, 65):
                cfg = {depth: d, "unroll": 0}
                for a, (t, i) in zip(axes, tiles):
                    cfg[f"{a}_threads"], cfg[f"{a}_per_thread"] = t, i
                try:
                    module.check(wl, cfg) if d <= reduce_extent else None
                except InvalidConfig:
                    continue
                if d <= reduce_extent:
                    accepted.append(cfg)
        in_space = [c for c in space if c["unroll"] == 0]
        key = lambda c: sorted(c.items())
        assert sorted(map(key, in_space)) == sorted(map(key, accepted)), module.NAME
        assert len(space) == 4 * len(accepted)  # every unroll builds


def test_check_rejects_unbuildable_configs(target):
    from kiln.errors import InvalidConfig

    _, wl, _ = _task(_conv((1, 32, 14, 14), (64, 32, 3, 3)), target)
    cfg = conv2d_direct.default(wl)
    for bad in ({**cfg, "oc_threads": 64, "oc_per_thread": 1, "oh_threads": 14, "ow_threads": 14},  # 12544 threads
                {**cfg, "oc_threads": 3, "oc_per_thread": 1}):  # 3 does not divide 64
        with pytest.raises(InvalidConfig):
            conv2d_direct.check(wl, bad)


def test_generic_space_keeps_only_counts_that_change_an_injective_kernel(target):
    _, wl, space = _task(_elementwise((1, 100)), target)
    assert [c["threads"] for c in space] == [32, 64, 128]  # 128 and up: one block of 100 threads
    assert generic.default(wl) == {"threads": 128}
    _, wl, space = _task(GROUPS["softmax"][0], target)
    assert [c["threads"] for c in space] == list(generic.THREADS)
    assert generic.default(wl) == {"threads": 256}


RANDOM_GROUPS = {
    "conv2d_direct": [_conv((1, 32, 16, 16), (64, 32, 3, 3)), _conv((1, 16, 9, 9), (16, 4, 3, 3), (2, 2), groups=4)],
    "dense_tiled": [_dense(32, 64, 96),
                    op_group(MATMUL, [((3, 16, 24), "float32"), ((24, 40), "float32")], DenseAttrs())],
    "generic": [GROUPS["softmax"][0], GROUPS["layer_norm"][0], GROUPS["max_pool"][0], _elementwise((3, 50, 7))],
}


@pytest.mark.parametrize("template", RANDOM_GROUPS)
@pytest.mark.parametrize("seed", range(3))
def test_random_configs_compile_to_ptx(target, template, seed):
    """The default config alone proves little: configs drawn from each template's space build through nvcc."""
    import tvm

    rng = random.Random(seed)
    funcs, drawn = {}, {}
    for i, fn in enumerate(RANDOM_GROUPS[template]):
        t, wl, space = _task(fn, target)
        assert t is TEMPLATES[template].TEMPLATE
        cfg = drawn[f"g{i}"] = space.sample(rng)
        g = lower(fn, target, {wl.key: cfg})
        assert (g.config_source, g.config, g.template) == ("given", cfg, t.key), f"seed {seed}: {cfg}"
        funcs[f"g{i}"] = g.prim_func.with_attr("global_symbol", f"g{i}")
    ptx = compile_ptx(device_source(tvm.compile(tvm.IRModule(funcs), target=target)), target)
    assert sorted(ptx_kernels(ptx)) == sorted(f"{name}_kernel" for name in funcs), f"seed {seed}: {drawn}"
    if template != "generic":
        assert ptx.count(".shared") >= 2 * len(funcs), f"seed {seed}: {drawn}"


# --- whole models -------------------------------------------------------------------------------------------

def test_small_cnn_compiles_to_a_cuda_artifact_with_ptx(tmp_path):
    model = model_builders.small_cnn(0)
    report = kiln.compile(model, tmp_path / "m.so", Options(target="cuda-sm80"))
    ptx = (tmp_path / "m.ptx").read_text()
    assert re.search(r"^\.target sm_80\b", ptx, re.MULTILINE)
    assert len(ptx_kernels(ptx)) == report.kernels  # one kernel per fused group, none split
    with pytest.raises(ArtifactError, match="built for CUDA; no CUDA driver"):
        kiln.load(report.path)


def _build(builder, **kwargs):
    mod = run(from_onnx(builder(**kwargs)).with_attrs(layout_block=0), O2)  # no CPU blocked layouts for CUDA
    return build(mod, resolve_target("cuda-sm80"))


def _check_model(result) -> None:
    target = resolve_target("cuda-sm80")
    source = device_source(result.executable)
    kernels = _kernels(source)
    assert len(kernels) == len(result.groups)
    assert all(threads > 1 for threads, _ in kernels.values())
    for g in result.groups:
        if g.ops[0] in ("nn.conv2d", "nn.dense", "nn.dense_packed", "nn.matmul"):
            assert g.template in ("cuda.conv2d_direct@1", "cuda.dense_tiled@1"), (g.ops, g.template)
            assert g.schedule.split("(")[0] in ("conv2d_direct.cuda", "dense_tiled.cuda"), (g.ops, g.schedule)
    ptx = compile_ptx(source, target)
    assert len(ptx_kernels(ptx)) == len(kernels)


def test_gather_after_concat_compiles(tmp_path):
    # found by fuzzing: the gather's int64 index inlined into the concat's int32 bounds failed CUDA's lowering
    from onnx import TensorProto, helper

    g = model_builders.GraphBuilder("concat_gather")
    y = g.op("Concat", ["x", g.op("Erf", ["x"])], axis=1)
    y = g.op("Gather", [y, g.const(np.array([3, -1], np.int64))], axis=1)
    model = g.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6])], [(y, TensorProto.FLOAT, [4, 2])])
    kiln.compile(model, tmp_path / "m.so", Options(target="cuda-sm80"))


def test_small_bert_layer_builds_on_templates():
    _check_model(_build(model_builders.bert_layer, seq=16, hidden=64, heads=4, ffn=128))


@pytest.mark.slow
@pytest.mark.parametrize("builder", [model_builders.resnet18, model_builders.mobilenet_v2,
                                     model_builders.bert_layer], ids=lambda b: b.__name__)
def test_full_size_model_builds_for_cuda(builder):
    _check_model(_build(builder))


def test_shared_bytes_counts_the_input_window_and_weights(target):
    """A 2x7 output tile of a 3x3 stride-1 conv reads a 4x9 window of 8 channels, and 8x8x3x3 weights."""
    _, wl, _ = _task(_conv((1, 32, 14, 14), (64, 32, 3, 3)), target)
    cfg = {"oc_threads": 4, "oc_per_thread": 2, "oh_threads": 2, "oh_per_thread": 1, "ow_threads": 7,
           "ow_per_thread": 1, "tile_ic": 8, "unroll": 0}
    window = np.zeros((8, (2 - 1) + 3, (7 - 1) + 3))
    weights = np.zeros((8, 8, 3, 3))
    assert conv2d_direct.shared_bytes(wl, cfg) == (window.size + weights.size) * 4
