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
from kiln.ir.ops.conv import CONV2D, ConvAttrs
from kiln.ir.ops.dense import DENSE, DENSE_PACKED, MATMUL, DenseAttrs, PackedDenseAttrs
from kiln.passes import O2, run
from kiln.schedules.cuda import conv2d_direct, dense_tiled, schedule_group

import kiln
from kiln import model_builders
from kiln.config import Options
from kiln.errors import ArtifactError

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (the CUDA toolkit) is not on PATH")

KERNEL = re.compile(r'extern "C" __global__ void __launch_bounds__\((\d+)\) (\w+)\(')


@pytest.fixture(scope="module")
def target():
    return resolve_target("cuda-sm80")


def _kernels(source: str) -> dict[str, tuple[int, str]]:
    """{kernel name: (threads per block, source text)} of CUDA C from TVM."""
    heads = list(KERNEL.finditer(source))
    return {m.group(2): (int(m.group(1)), source[m.start():heads[i + 1].start() if i + 1 < len(heads) else None])
            for i, m in enumerate(heads)}


# --- single-op groups, built as the lowering does: the op's own TE compute, then schedule_group -------------

def _conv(x_shape, w_shape, strides=(1, 1), padding=(1, 1, 1, 1), groups=1, relu=True):
    from tvm import te

    attrs = ConvAttrs(strides, padding, (1, 1), groups)
    x, w = te.placeholder(x_shape, name="p0"), te.placeholder(w_shape, name="p1")
    b = te.placeholder((w_shape[0],), name="p2")
    y = CONV2D.compute(x, w, attrs)
    out = te.compute(y.shape, lambda n, c, i, j: te.max(y[n, c, i, j] + b[c], 0.0) if relu else y[n, c, i, j] + b[c],
                     name="epilogue")
    return [x, w, b, out], ("nn.conv2d", attrs)


def _dense(m, k, n):
    from tvm import te

    x, w, b = te.placeholder((m, k), name="p0"), te.placeholder((n, k), name="p1"), te.placeholder((n,), name="p2")
    y = DENSE.compute(x, w, DenseAttrs())
    return [x, w, b, te.compute(y.shape, lambda i, j: y[i, j] + b[j], name="bias")], ("nn.dense", DenseAttrs())


def _dense_packed(m, k, n, block):
    from tvm import te

    attrs = PackedDenseAttrs(block)
    x, wp = te.placeholder((m, k), name="p0"), te.placeholder((n // block, k, block), name="p1")
    return [x, wp, DENSE_PACKED.compute(x, wp, attrs)], ("nn.dense_packed", attrs)


def _matmul(batch, m, k, n):
    from tvm import te

    a, b = te.placeholder((batch, m, k), name="p0"), te.placeholder((batch, k, n), name="p1")
    return [a, b, MATMUL.compute(a, b, DenseAttrs())], ("nn.matmul", DenseAttrs())


def _softmax(rows, n):
    from tvm import te, topi

    x = te.placeholder((rows, n), name="p0")
    return [x, topi.nn.softmax(x, axis=1)], None


def _layer_norm(rows, n):
    from tvm import te

    x = te.placeholder((rows, n), name="p0")
    k1, k2 = te.reduce_axis((0, n), "k1"), te.reduce_axis((0, n), "k2")
    mean = te.compute((rows,), lambda i: te.sum(x[i, k1] / n, axis=k1), name="mean")
    var = te.compute((rows,), lambda i: te.sum((x[i, k2] - mean[i]) * (x[i, k2] - mean[i]) / n, axis=k2), name="var")
    return [x, te.compute(x.shape, lambda i, j: (x[i, j] - mean[i]) / te.sqrt(var[i] + 1e-5), name="norm")], None


def _max_pool(shape):
    from tvm import te, topi

    x = te.placeholder(shape, name="p0")
    return [x, topi.nn.pool2d(x, (3, 3), (2, 2), (1, 1), (1, 1, 1, 1), "max", layout="NCHW")], None


def _elementwise(shape):
    from tvm import te

    a, b = te.placeholder(shape, name="p0"), te.placeholder(shape, name="p1")
    return [a, b, te.compute(shape, lambda *i: te.sigmoid(a(*i)) * b(*i) + 1.0, name="swish_add")], None


GROUPS = {
    "conv3x3": (_conv((1, 32, 28, 28), (64, 32, 3, 3)), "conv2d_direct.cuda"),
    "conv7x7_s2_rgb": (_conv((1, 3, 56, 56), (64, 3, 7, 7), (2, 2), (3, 3, 3, 3)), "conv2d_direct.cuda"),
    "conv1x1_s2": (_conv((1, 64, 14, 14), (128, 64, 1, 1), (2, 2), (0, 0, 0, 0), relu=False), "conv2d_direct.cuda"),
    "depthwise3x3": (_conv((1, 96, 14, 14), (96, 1, 3, 3), groups=96), "conv2d_direct.cuda"),
    "conv_odd_7x7": (_conv((1, 17, 7, 7), (33, 17, 3, 3)), "conv2d_direct.cuda"),
    "dense_gemv": (_dense(1, 512, 1000), "dense_tiled.cuda"),
    "dense_gemm": (_dense(128, 256, 768), "dense_tiled.cuda"),
    "dense_packed": (_dense_packed(16, 64, 128, 16), "dense_tiled.cuda"),
    "batch_matmul": (_matmul(12, 16, 64, 16), "dense_tiled.cuda"),
    "softmax": (_softmax(8, 1000), "row"),
    "layer_norm": (_layer_norm(16, 768), "row"),
    "max_pool": (_max_pool((1, 64, 56, 56)), "per_thread"),
    "elementwise": (_elementwise((2, 3, 33, 35)), "injective"),
}


@pytest.fixture(scope="module")
def single_ops(target):
    """Every group of GROUPS scheduled, compiled in one tvm.compile and one nvcc run."""
    import tvm
    from tvm import te

    funcs, how = {}, {}
    for name, ((tensors, anchor), _) in GROUPS.items():
        prim = te.create_prim_func(tensors).with_attr("global_symbol", name)
        funcs[name], how[name] = schedule_group(prim, target, anchor)
    source = device_source(tvm.compile(tvm.IRModule(funcs), target=target))
    return how, source, compile_ptx(source, target)


@pytest.mark.parametrize("name", GROUPS)
def test_group_gets_its_schedule(single_ops, name):
    how, _, _ = single_ops
    assert how[name].startswith(GROUPS[name][1]), f"{name}: {how[name]}"


@pytest.mark.parametrize("name", GROUPS)
def test_every_kernel_binds_blocks_and_threads(single_ops, name):
    _, source, _ = single_ops
    kernels = {k: v for k, v in _kernels(source).items() if k.startswith(name + "_kernel")}
    assert kernels, f"no kernel for {name}"
    for kernel, (threads, text) in kernels.items():
        assert threads > 1, f"{kernel} runs on one thread"
        assert "threadIdx.x" in text and "blockIdx.x" in text, kernel


@pytest.mark.parametrize("name", [n for n, (_, how) in GROUPS.items() if how.endswith(".cuda")])
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


# --- template configs ---------------------------------------------------------------------------------------

CONV_WL = conv2d_direct.Workload(n=1, oc=64, oh=14, ow=14, ic=32, kh=3, kw=3, stride=(1, 1), dilation=(1, 1),
                                 groups=1)
DENSE_WL = dense_tiled.Workload(batch=1, m=32, n=96, k=64)


def test_default_configs_are_in_the_space_and_valid():
    for template, wl in ((conv2d_direct, CONV_WL), (dense_tiled, DENSE_WL)):
        cfg = template.default(wl)
        template.check(wl, cfg)
        space = template.space(wl)
        for knob, value in vars(cfg).items():
            assert value in space[knob], f"{template.__name__}: default {knob}={value} not in its space"


def test_check_rejects_unbuildable_configs():
    from kiln.errors import InvalidConfig

    cfg = conv2d_direct.default(CONV_WL)
    for bad in (conv2d_direct.Config((64, 4), (14, 1), (14, 1), 32, 0),  # 12544 threads
                conv2d_direct.Config((3, 1), cfg.tile_oh, cfg.tile_ow, cfg.tile_ic, 0)):  # 3 does not divide 64
        with pytest.raises(InvalidConfig):
            conv2d_direct.check(CONV_WL, bad)


@pytest.mark.parametrize("seed", range(3))
def test_random_configs_compile_to_ptx(target, seed):
    """The default config alone proves little: random valid configs of both templates build through nvcc."""
    import tvm
    from tvm import s_tir, te

    rng = random.Random(seed)
    funcs = {}
    tensors, _ = _conv((1, 32, 16, 16), (64, 32, 3, 3))
    conv_wl = conv2d_direct.Workload(1, 64, 16, 16, 32, 3, 3, (1, 1), (1, 1), 1)
    conv_cfg = rng.choice(list(conv2d_direct.configs(conv_wl)))
    sch = s_tir.Schedule(te.create_prim_func(tensors).with_attr("global_symbol", "conv"))
    for b in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(b).name_hint not in ("conv2d_nchw", "pad_temp", "epilogue"):
            sch.compute_inline(b)
    conv2d_direct.schedule(sch, sch.get_sblock("conv2d_nchw"), sch.get_sblock("epilogue"), conv_wl, conv_cfg)
    funcs["conv"] = sch.mod["main"]
    tensors, _ = _dense(32, 64, 96)
    dense_cfg = rng.choice(list(dense_tiled.configs(DENSE_WL)))
    sch = s_tir.Schedule(te.create_prim_func(tensors).with_attr("global_symbol", "dense"))
    dense_tiled.schedule(sch, sch.get_sblock("dense"), sch.get_sblock("bias"), DENSE_WL, dense_cfg)
    funcs["dense"] = sch.mod["main"]
    ptx = compile_ptx(device_source(tvm.compile(tvm.IRModule(funcs), target=target)), target)
    assert sorted(ptx_kernels(ptx)) == ["conv_kernel", "dense_kernel"], f"seed {seed}: {conv_cfg} {dense_cfg}"
    assert ptx.count(".shared") >= 4, f"seed {seed}: {conv_cfg} {dense_cfg}"


# --- whole models -------------------------------------------------------------------------------------------

def test_small_cnn_compiles_to_a_cuda_artifact_with_ptx(tmp_path):
    model = model_builders.resnet18(size=32)
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
            assert g.schedule.split("(")[0] in ("conv2d_direct.cuda", "dense_tiled.cuda"), (g.ops, g.schedule)
    ptx = compile_ptx(source, target)
    assert len(ptx_kernels(ptx)) == len(kernels)


def test_small_bert_layer_builds_on_templates():
    _check_model(_build(model_builders.bert_layer, seq=16, hidden=64, heads=4, ffn=128))


@pytest.mark.slow
@pytest.mark.parametrize("builder", [model_builders.resnet18, model_builders.mobilenet_v2,
                                     model_builders.bert_layer], ids=lambda b: b.__name__)
def test_full_size_model_builds_for_cuda(builder):
    _check_model(_build(builder))


def test_shared_bytes_counts_the_input_window_and_weights():
    """A 2x7 output tile of a 3x3 stride-1 conv reads a 4x9 window of 8 channels, and 8x8x3x3 weights."""
    cfg = conv2d_direct.Config((4, 2), (2, 1), (7, 1), 8, 0)
    window = np.zeros((8, (2 - 1) + 3, (7 - 1) + 3))
    weights = np.zeros((8, 8, 3, 3))
    assert conv2d_direct.shared_bytes(CONV_WL, cfg) == (window.size + weights.size) * 4
