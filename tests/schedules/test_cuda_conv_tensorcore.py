"""cuda.conv2d_tensorcore, compiled for sm_80 and sm_90 through the local nvcc (no GPU here, so nothing runs on
one): float16/bfloat16 NCHW convs with groups 1 take the template, float32 and depthwise ones do not; ResNet-50's
conv shapes compile to PTX with mma.sync fed by ldmatrix in a cp.async pipeline; configs drawn from the knob
space build; ResNet-50 at --precision fp16 puts every conv on it. The only
numeric evidence available here: the template's GEMM form of the conv (the im2col index map, the padded input,
m padded to the block tile), built for the CPU and checked against NumPy."""

import itertools
import random
import re
import shutil
import subprocess
from collections import Counter

import numpy as np
import pytest
from kiln.codegen.cuda import compile_ptx, device_source, ptx_kernels
from kiln.codegen.target import resolve_target
from kiln.ir import Call, Function
from kiln.ir.ops.conv import CONV2D, ConvAttrs, conv_output_size, conv_reference
from kiln.ir.ops.elementwise import ADD, RELU
from kiln.schedules.cuda import conv2d_direct, conv2d_tensorcore
from kiln.schedules.dispatch import task_of
from kiln.schedules.template import find
from kiln.schedules.workload import Group

from kiln.errors import InvalidConfig
from tests.groups import group, lower, params

SM80, SM90 = "cuda-sm80", "cuda-sm90"
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("ptxas") is None,
                                reason="nvcc and ptxas (the CUDA toolkit) are not on PATH")


def _conv(x_shape, w_shape, strides=(1, 1), padding=(1, 1, 1, 1), dtype="float16", groups=1, residual=False,
          dilation=(1, 1)):
    """conv + bias (+ a residual input) + relu: a ResNet group."""
    attrs = ConvAttrs(strides, padding, dilation, groups)
    out_shape = (x_shape[0], w_shape[0], *(conv_output_size(x_shape[2 + i], w_shape[2 + i], strides[i],
                                                             padding[i] + padding[i + 2], dilation[i])
                                           for i in (0, 1)))
    shapes = [(x_shape, dtype), (w_shape, dtype), ((w_shape[0], 1, 1), dtype)]
    ps = params(*shapes, (out_shape, dtype)) if residual else params(*shapes)
    y = Call(ADD, (Call(CONV2D, (ps[0], ps[1]), attrs), ps[2]), ADD.attrs_type())
    if residual:
        y = Call(ADD, (y, ps[3]), ADD.attrs_type())
    return group(ps, Call(RELU, (y,), RELU.attrs_type()))


RESNET = {  # ResNet-50's shapes, batch 1
    "3x3_64ch_56": ((1, 64, 56, 56), (64, 64, 3, 3), (1, 1), (1, 1, 1, 1)),
    "1x1_256to64_56": ((1, 256, 56, 56), (64, 256, 1, 1), (1, 1), (0, 0, 0, 0)),
    "3x3_128ch_stride2_to_28": ((1, 128, 56, 56), (128, 128, 3, 3), (2, 2), (1, 1, 1, 1)),  # m = 784: padded
    "7x7_stem": ((1, 3, 224, 224), (64, 3, 7, 7), (2, 2), (3, 3, 3, 3)),  # k = 147: padded
}


def _resnet(name, dtype="float16", **kwargs):
    x, w, strides, padding = RESNET[name]
    return _conv(x, w, strides, padding, dtype, **kwargs)


# --- which convs it takes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", RESNET)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_convs_take_the_template(name, dtype):
    assert find(Group(_resnet(name, dtype)), "cuda") is conv2d_tensorcore.TEMPLATE


@pytest.mark.parametrize("fn, why", [
    (_resnet("3x3_64ch_56", "float32"), "float32"),
    (_conv((1, 64, 56, 56), (64, 1, 3, 3), groups=64), "depthwise"),
    (_conv((1, 64, 14, 14), (24, 64, 1, 1), padding=(0, 0, 0, 0)), "24 output channels: no block_n divides"),
    (_conv((1, 24, 14, 14), (64, 24, 1, 1), padding=(0, 0, 0, 0)), "1 x 1, k = 24: cp.async rows past k"),
])
def test_other_convs_stay_on_conv2d_direct(fn, why):
    assert find(Group(fn), "cuda") is conv2d_direct.TEMPLATE, why


def test_stem_takes_the_template_with_k_padded():
    """ResNet's 7 x 7 stem on 3 channels: k = 147 is padded to whole chunks (the gather and the weight rows read
    zeros past it), its weights by plain loads."""
    fn = _conv((1, 3, 224, 224), (64, 3, 7, 7), (2, 2), (3, 3, 3, 3))
    assert find(Group(fn), "cuda") is conv2d_tensorcore.TEMPLATE
    _, wl = task_of(fn, resolve_target(SM80))
    assert conv2d_tensorcore.gemm_dims(wl) == (112 * 112, 64, 147)
    assert {cfg["vector"] for cfg in conv2d_tensorcore.space(wl)} == {1}


def test_residual_add_group_takes_the_template():
    """conv + bias + residual add + relu, ResNet's bottleneck ends: the epilogue holds a second input."""
    fn = _resnet("1x1_256to64_56", residual=True)
    assert len(fn.params) == 4
    assert find(Group(fn), "cuda") is conv2d_tensorcore.TEMPLATE


# --- the knob space -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", RESNET)
def test_space_holds_more_than_16_configs_exactly_those_check_accepts(name):
    _, wl = task_of(_resnet(name), resolve_target(SM80))
    space = conv2d_tensorcore.space(wl)
    assert len(space) > 16, len(space)
    accepted = 0
    for (bm, bn), (wm, wn), bk, stages, vector in itertools.product(
            conv2d_tensorcore.BLOCK_TILES, conv2d_tensorcore.WARP_TILES, conv2d_tensorcore.CHUNKS,
            conv2d_tensorcore.STAGES, (1, *conv2d_tensorcore.VECTORS)):
        cfg = {"block_m": bm, "block_n": bn, "warp_m": wm, "warp_n": wn, "chunk_k": bk, "stages": stages,
               "vector": vector}
        try:
            conv2d_tensorcore.check(wl, cfg)
        except InvalidConfig:
            assert cfg not in space, cfg
            continue
        accepted += 1
        assert cfg in space, cfg
        assert conv2d_tensorcore.shared_bytes(wl, cfg) <= conv2d_tensorcore.SHARED_BYTES
    assert accepted == len(space)
    assert conv2d_tensorcore.default(wl) in space


def test_check_rejects_tiles_that_do_not_divide_n_or_k():
    _, wl = task_of(_resnet("3x3_64ch_56"), resolve_target(SM80))
    assert conv2d_tensorcore.gemm_dims(wl) == (3136, 64, 576)
    cfg = conv2d_tensorcore.default(wl)
    conv2d_tensorcore.check(wl, {**cfg, "block_m": 64, "warp_m": 32, "chunk_k": 64, "stages": 4})  # 576 = 9 x 64
    with pytest.raises(InvalidConfig, match="block_n=128"):  # 64 output channels
        conv2d_tensorcore.check(wl, {**cfg, "block_n": 128, "warp_n": 64})
    _, wl = task_of(_conv((1, 64, 56, 56), (64, 64, 1, 1), padding=(0, 0, 0, 0)), resolve_target(SM80))
    with pytest.raises(InvalidConfig, match="fewer chunks"):  # k = 64: one chunk of 64, fewer than 2 stages
        conv2d_tensorcore.check(wl, {**conv2d_tensorcore.default(wl), "chunk_k": 64, "stages": 2})
    _, wl = task_of(_conv((1, 96, 28, 28), (64, 96, 1, 1), padding=(0, 0, 0, 0)), resolve_target(SM80))
    with pytest.raises(InvalidConfig, match="must divide a 1 x 1"):  # k = 96: cp.async rows would pass it
        conv2d_tensorcore.check(wl, {**conv2d_tensorcore.default(wl), "chunk_k": 64, "stages": 2})
    conv2d_tensorcore.check(wl, {**conv2d_tensorcore.default(wl), "chunk_k": 32, "stages": 3})


# --- the index math, on the CPU -------------------------------------------------------------------------------

CPU_CASES = {  # batch 2 (m runs across images), m padded (200, 162 and 49 rows to tiles of 64)
    "3x3_pad1_batch2": ((2, 32, 10, 10), (64, 32, 3, 3), (1, 1), (1, 1, 1, 1)),
    "1x1_batch2": ((2, 64, 9, 9), (64, 64, 1, 1), (1, 1), (0, 0, 0, 0)),
    "3x3_stride2_odd": ((1, 32, 13, 13), (64, 32, 3, 3), (2, 2), (1, 1, 1, 1)),
    "3x3_asymmetric_pad": ((1, 32, 8, 8), (64, 32, 3, 3), (1, 1), (0, 1, 2, 0)),
    "1x3": ((1, 32, 9, 9), (64, 32, 1, 3), (1, 1), (0, 1, 0, 1)),  # kh = 1: the input's reindex has no r axis
    "3x1_stride_2x1": ((1, 32, 9, 9), (64, 32, 3, 1), (2, 1), (1, 0, 1, 0)),
    "3x3_dilation2": ((1, 32, 9, 9), (64, 32, 3, 3), (1, 1), (2, 2, 2, 2), (2, 2)),
    "7x7_stem_k147": ((1, 3, 20, 20), (64, 3, 7, 7), (2, 2), (3, 3, 3, 3)),  # k padded to a chunk, too
}


@pytest.mark.parametrize("name", CPU_CASES)
def test_gemm_form_of_the_conv_matches_numpy_on_the_cpu(name):
    """The schedule's first step (`as_gemm`: reindex to C[m, f] += A[m, k] B[f, k], m padded to the block
    tile, the output block walking (m, f)) is plain TIR: with the gather inlined into the GEMM it builds for
    llvm and must give the conv + bias + relu NumPy computes. A wrong im2col index map fails here."""
    import tvm
    from kiln.codegen.lower import to_te
    from tvm import s_tir, te

    x_shape, w_shape, strides, padding, *dilation = CPU_CASES[name]
    dilation = tuple(dilation[0]) if dilation else (1, 1)
    fn = _conv(x_shape, w_shape, strides, padding, dilation=dilation)
    _, wl = task_of(fn, resolve_target(SM80))
    cfg = conv2d_tensorcore.default(wl)
    m = conv2d_tensorcore.gemm_dims(wl)[0]
    assert m % cfg["block_m"], "each case pads m"
    placeholders, out = to_te(fn)
    sch = s_tir.Schedule(te.create_prim_func([*placeholders, out]))
    conv, _ = conv2d_tensorcore.as_gemm(sch, wl, cfg)
    k = conv2d_tensorcore.gemm_dims(wl)[2]
    assert [int(d) for d in sch.get(conv).writes[0].source.shape] == [-(-m // cfg["block_m"]) * cfg["block_m"],
                                                                       w_shape[0]]
    assert [int(d) for d in sch.get(conv).reads[1].source.shape] == [w_shape[0],
                                                                      -(-k // cfg["chunk_k"]) * cfg["chunk_k"]]
    while producers := sch.get_producers(conv):  # the gather, as the shared-memory copy inlines it
        for p in producers:
            sch.compute_inline(p)
    ex = tvm.compile(tvm.IRModule({"main": sch.mod["main"]}), target="llvm")
    rng = np.random.default_rng(0)
    x, w = (rng.standard_normal(s).astype("float16") for s in (x_shape, w_shape))
    b = rng.standard_normal((w_shape[0], 1, 1)).astype("float16")
    got = tvm.runtime.empty([int(d) for d in fn.body.type.shape], "float16")
    ex["main"](*(tvm.runtime.tensor(a) for a in (x, w, b)), got)
    want = conv_reference(x.astype("float32"), w.astype("float32"), ConvAttrs(strides, padding, dilation, 1))
    want = np.maximum(want + b.astype("float32"), 0)
    assert got.shape == want.shape
    np.testing.assert_allclose(got.numpy().astype("float32"), want, rtol=2e-3, atol=2e-2)


# --- the PTX --------------------------------------------------------------------------------------------------

def _entry(ptx: str, name: str) -> str:
    body = ptx[ptx.index(f".entry {name}_kernel("):]
    return body[:body.index("\n}")]


@needs_nvcc
@pytest.mark.parametrize("target_name, arch", [(SM80, "sm_80"), (SM90, "sm_90")])
def test_resnet_convs_compile_to_tensor_core_ptx(target_name, arch, tmp_path):
    """The ResNet shapes (and a residual-add group, a dilated 1 × 3) at their default configs, in one tvm.compile and one
    nvcc run: each kernel runs mma.sync m16n8k16 with float32 sums on ldmatrix.x4 fragments in a cp.async
    commit/wait pipeline; the 1 × 1 kernels' weight tiles are copied by 16-byte cp.async, the 3 × 3 kernels' by
    plain loads (their rows cross (ic, kh, kw), see the template's docstring); none reads a
    materialised im2col buffer (the kernels take only the group's inputs); ptxas fits each in 255 registers
    without spilling."""
    import tvm

    target = resolve_target(target_name)
    fns = {f"k{i}": _resnet(name) for i, name in enumerate(RESNET)}
    fns["k_residual"] = _resnet("1x1_256to64_56", residual=True)
    fns["k_1x3_dilated"] = _conv((1, 64, 28, 28), (64, 64, 1, 3), padding=(0, 2, 0, 2), dilation=(1, 2))
    funcs = {name: lower(fn, target) for name, fn in fns.items()}
    assert {g.template for g in funcs.values()} == {conv2d_tensorcore.TEMPLATE.key}
    mod = tvm.IRModule({name: g.prim_func.with_attr("global_symbol", name) for name, g in funcs.items()})
    source = device_source(tvm.compile(mod, target=target))
    ptx = compile_ptx(source, target)
    assert re.search(rf"^\.target {arch}\b", ptx, re.MULTILINE)
    assert sorted(ptx_kernels(ptx)) == sorted(f"{name}_kernel" for name in funcs)
    for name, fn in fns.items():
        body = _entry(ptx, name)
        assert body.count("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32") > 0, name
        assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in body, name
        assert "cp.async.commit_group" in body and "cp.async.wait_group" in body, name
        assert len(re.findall(r"\.param \.u64 \w+_param_\d+", body)) == len(fn.params) + 1, name  # inputs and the output, no workspace
    for name in ("k1", "k_residual"):  # 1 x 1: weights by 16-byte cp.async
        assert "cp.async.cg.shared.global" in _entry(ptx, name), name
    for name in ("k0", "k2", "k3", "k_1x3_dilated"):  # 3 x 3, 7 x 7, 1 x 3: weights by plain loads (see the template's docstring)
        assert "cp.async.cg" not in _entry(ptx, name) and "cp.async.ca" not in _entry(ptx, name), name
    path = tmp_path / "k.ptx"
    path.write_text(ptx)
    out = subprocess.run(["ptxas", "-v", f"-arch={arch}", str(path), "-o", str(tmp_path / "k.cubin")],
                         capture_output=True, text=True, check=True).stderr
    registers = [int(r) for r in re.findall(r"Used (\d+) registers", out)]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    assert len(registers) == len(funcs) and max(registers) <= 255, out
    assert all(stores == loads == "0" for stores, loads in spills), out


@needs_nvcc
@pytest.mark.parametrize("stages", [2, 3, 4])
def test_a_barrier_separates_fragment_reads_from_the_next_cp_async_copies(stages):
    """dense_tensorcore's write-after-read check on the 1 × 1 kernel, whose B tile comes by cp.async: every copy
    issued after an ldmatrix, in the k loop (cyclically) and in the kernel, has a __syncthreads between."""
    import tvm

    from tests.schedules.test_cuda_tensorcore import _block, _copy_after_read, _events

    target = resolve_target(SM80)
    fn = _conv((1, 256, 28, 28), (128, 256, 1, 1), padding=(0, 0, 0, 0))
    _, wl = task_of(fn, target)
    g = lower(fn, target, {wl.key: {**conv2d_tensorcore.default(wl), "stages": stages}})
    assert g.config_source == "given"
    source = device_source(tvm.compile(tvm.IRModule({"main": g.prim_func}), target=target))
    kernel = source[source.index('extern "C" __global__'):]
    bodies = (_block(kernel, m.end()) for m in re.finditer(r"for \(int \w+[^{]*\{", kernel))
    loop = _events(next(b for b in bodies if "ptx_cp_async" in b and "ldmatrix" in b))
    assert loop.count("copy") >= 1 and "read" in loop, loop
    assert not _copy_after_read(loop, cyclic=True), f"stages={stages}: k loop {loop}"
    assert not _copy_after_read(_events(kernel), cyclic=False), f"stages={stages}"


@needs_nvcc
def test_bfloat16_conv_compiles_to_bf16_mma():
    import tvm

    target = resolve_target(SM80)
    g = lower(_resnet("1x1_256to64_56", "bfloat16"), target)
    assert g.template == conv2d_tensorcore.TEMPLATE.key
    ptx = compile_ptx(device_source(tvm.compile(tvm.IRModule({"main": g.prim_func}), target=target)), target)
    assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in ptx and "cp.async.cg.shared.global" in ptx


@needs_nvcc
def test_sampled_configs_compile(tmp_path):
    """8 configs drawn from the spaces of the ResNet shapes (not only the defaults) lower as given and
    build in one nvcc run."""
    import tvm

    target = resolve_target(SM80)
    rng = random.Random(0)
    funcs, drawn = {}, {}
    for i in range(8):
        fn = _resnet(list(RESNET)[i % len(RESNET)])
        _, wl = task_of(fn, target)
        cfg = drawn[f"g{i}"] = conv2d_tensorcore.space(wl).sample(rng)
        g = lower(fn, target, {wl.key: cfg})
        assert (g.template, g.config_source, g.config) == (conv2d_tensorcore.TEMPLATE.key, "given", cfg)
        funcs[f"g{i}"] = g.prim_func.with_attr("global_symbol", f"g{i}")
    assert len({str(c) for c in drawn.values()}) > 4
    ptx = compile_ptx(device_source(tvm.compile(tvm.IRModule(funcs), target=target)), target)
    assert sorted(ptx_kernels(ptx)) == sorted(f"{name}_kernel" for name in funcs), drawn
    assert ptx.count("mma.sync.aligned.m16n8k16") >= len(funcs)


# --- a whole model --------------------------------------------------------------------------------------------

def test_resnet50_fp16_puts_its_convs_on_the_template():
    """`kiln compile zoo:resnet50 --target cuda-sm90 --precision fp16`, up to the kernels: all 53 convs (the
    3-channel 7 × 7 stem with k padded) are conv2d_tensorcore groups, and each distinct one lowers on it (no
    fallback: the test suite turns the fallback warning into an error)."""
    from kiln.autotune.tasks import extract_tasks
    from kiln.frontend import from_onnx
    from kiln.ir.visitor import post_order

    from kiln import zoo
    from kiln.config import Options
    from kiln.driver import optimize, prepare

    options = Options(target=SM90, precision="fp16")
    target = resolve_target(options.target)
    mod, _ = optimize(prepare(from_onnx(zoo.zoo_model("resnet50")), target, options), target, options)
    templates = Counter()
    for call in post_order(mod.main.body):
        if isinstance(call, Call) and isinstance(call.op, Function):
            g = Group(call.op)
            if g.anchor is not None and g.anchor.op is CONV2D:
                assert g.anchor.attrs.groups == 1 and str(g.anchor.type.dtype) == "float16"
                templates[find(g, "cuda").name] += 1
    assert templates == {"cuda.conv2d_tensorcore": 53}
    tasks = [t for t in extract_tasks(mod, target) if t.template is conv2d_tensorcore.TEMPLATE]
    assert len(tasks) > 10
    for task in tasks:
        g = lower(task.group, target)
        assert g.template == conv2d_tensorcore.TEMPLATE.key, task.workload.summary()


@needs_nvcc
@pytest.mark.slow
def test_resnet50_fp16_compiles_for_sm90_with_tensor_core_convs(tmp_path):
    """The whole `kiln compile zoo:resnet50 --target cuda-sm90 --precision fp16` (about 45 s here): 53 kernels
    on conv2d_tensorcore, each with mma.sync in the artifact's PTX."""
    import kiln
    from kiln import zoo
    from kiln.config import Options

    report = kiln.compile(zoo.zoo_model("resnet50"), tmp_path / "m.so", Options(target=SM90, precision="fp16"))
    ptx = (tmp_path / "m.ptx").read_text()
    convs = [s["kernel"] for s in report.steps if s["template"] == conv2d_tensorcore.TEMPLATE.key]
    assert len(convs) == 53, [(s["kernel"], s["template"]) for s in report.steps]
    for name in convs:
        assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in _entry(ptx, name), name



@pytest.mark.parametrize("arch,tensor_cores", [("sm_75", False), ("sm_80", True), ("sm_90", True)])
def test_conv_tensor_cores_need_sm80(arch, tensor_cores):
    """An sm_75 target (no m16n8k16 f16 mma, no cp.async) keeps fp16 convs on conv2d_direct."""
    from kiln.schedules.dispatch import task_of
    from tvm.target import Target

    target = Target({"kind": "cuda", "arch": arch, "host": {"kind": "llvm"}})
    want = conv2d_tensorcore.TEMPLATE if tensor_cores else conv2d_direct.TEMPLATE
    assert task_of(_resnet("3x3_64ch_56"), target)[0] is want
