"""cuda.dense_tensorcore, compiled for sm_80 and sm_90 through the local nvcc (no GPU here, so nothing runs:
bench/gpu_gemm.py checks the numerics and the speed on the GPU machine): float16 and bfloat16 dense and matmul
take the template and nothing else does, the PTX holds mma.sync m16n8k16 with float32 accumulators fed by
ldmatrix from shared memory that cp.async fills, the default config fits 255 registers without spilling, and
configs from the knob space build (all of them in the slow suite)."""

import itertools
import random
import re
import shutil
import subprocess

import pytest
from kiln.codegen.cuda import compile_ptx, device_source, ptx_kernels
from kiln.codegen.target import resolve_target
from kiln.ir import Call
from kiln.ir.ops.dense import DENSE, DENSE_PACKED, MATMUL, DenseAttrs, PackedDenseAttrs
from kiln.ir.ops.elementwise import ADD, RELU
from kiln.schedules.cuda import dense_tensorcore, dense_tiled
from kiln.schedules.dispatch import task_of
from kiln.schedules.space import Space
from kiln.schedules.template import find
from kiln.schedules.workload import Group

from kiln.errors import InvalidConfig
from tests.groups import group, lower, op_group, params

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("ptxas") is None,
                                reason="nvcc and ptxas (the CUDA toolkit) are not on PATH")

SM80, SM90 = "cuda-sm80", "cuda-sm90"
SHORT = {"float16": "f16", "bfloat16": "bf16"}


def _dense(m, k, n, dtype, epilogue=True):
    """x @ w.T (+ bias, relu): a Gemm layer's group."""
    ps = params(((m, k), dtype), ((n, k), dtype), ((n,), dtype))
    y = Call(DENSE, (ps[0], ps[1]), DenseAttrs())
    if not epilogue:
        return group(ps[:2], y)
    return group(ps, Call(RELU, (Call(ADD, (y, ps[2]), ADD.attrs_type()),), RELU.attrs_type()))


def _matmul(a_shape, b_shape, dtype):
    return op_group(MATMUL, [(a_shape, dtype), (b_shape, dtype)], DenseAttrs())


def _compile(funcs: dict, target):
    """PTX of the lowered groups {symbol: LoweredGroup}, in one tvm.compile and one nvcc run."""
    import tvm

    mod = tvm.IRModule({name: g.prim_func.with_attr("global_symbol", name) for name, g in funcs.items()})
    ptx = compile_ptx(device_source(tvm.compile(mod, target=target)), target)
    assert sorted(ptx_kernels(ptx)) == sorted(f"{name}_kernel" for name in funcs)
    return ptx


def _ptxas(ptx: str, arch: str, tmp_path) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) of the PTX's one kernel, from `ptxas -v`."""
    path = tmp_path / "k.ptx"
    path.write_text(ptx)
    out = subprocess.run(["ptxas", "-v", f"-arch={arch}", str(path), "-o", str(tmp_path / "k.cubin")],
                         capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    stores, loads = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out).groups())
    return regs, stores, loads


# --- which GEMMs it takes -----------------------------------------------------------------------------------

TAKEN = {
    "dense_f16_bias_relu": _dense(256, 512, 384, "float16"),
    "dense_bf16": _dense(512, 256, 128, "bfloat16", epilogue=False),
    "matmul_f16_batched": _matmul((4, 128, 256), (4, 256, 192), "float16"),
    "matmul_bf16_broadcast_b": _matmul((2, 64, 128), (128, 256), "bfloat16"),
    "dense_f16_3d_x": op_group(DENSE, [((2, 128, 64), "float16"), ((128, 64), "float16")], DenseAttrs()),
    # what alter_layout makes of a transformer's dense layers: w packed [n / 16, k, 16], read as [k, 16] tiles
    "dense_packed_f16": op_group(DENSE_PACKED, [((1, 128, 256), "float16"), ((16, 256, 16), "float16")],
                                 PackedDenseAttrs(16)),
}
NOT_TAKEN = {  # (group, the template that takes it)
    "dense_f32": (_dense(256, 512, 384, "float32"), "cuda.dense_tiled"),
    "dense_f16_m_not_a_tile": (_dense(100, 512, 384, "float16"), "cuda.dense_tiled"),
    "dense_f16_k_not_a_chunk": (_dense(128, 80, 128, "float16"), "cuda.dense_tiled"),
    "matmul_f16_vector": (_matmul((256,), (256, 128), "float16"), "cuda.generic"),
    "dense_packed_f16_block_8": (op_group(DENSE_PACKED, [((128, 256), "float16"), ((32, 256, 8), "float16")],
                                          PackedDenseAttrs(8)), "cuda.dense_tiled"),  # 8 columns: no 16 x 16 tile
}


@pytest.mark.parametrize("name", TAKEN)
def test_float16_and_bfloat16_gemms_take_the_template(name):
    assert find(Group(TAKEN[name]), "cuda") is dense_tensorcore.TEMPLATE


def test_every_taken_gemm_compiles_to_one_tensor_core_kernel():
    """Batched, broadcast-B and 3-D-x GEMMs and fused epilogues too: one kernel each, no fallback."""
    target = resolve_target(SM80)
    funcs = {name: lower(fn, target) for name, fn in TAKEN.items()}
    assert {g.template for g in funcs.values()} == {dense_tensorcore.TEMPLATE.key}
    ptx = _compile(funcs, target)
    for name in funcs:
        body = ptx[ptx.index(f".entry {name}_kernel("):]
        body = body[:body.index("\n}")]
        assert "mma.sync.aligned.m16n8k16" in body and "cp.async" in body and "ldmatrix" in body, name


@pytest.mark.parametrize("name", NOT_TAKEN)
def test_other_gemms_keep_their_templates(name):
    """float32 kernels stay on dense_tiled (unchanged), and so do half-precision shapes no tile divides."""
    fn, template = NOT_TAKEN[name]
    assert find(Group(fn), "cuda").name == template


def test_space_holds_exactly_the_configs_check_accepts():
    """The branches encode check(): every knob combination that passes it is in the space, no other; the
    shared memory of each fits the sm_80 limit."""
    for fn in (_dense(256, 128, 512, "float16"), _matmul((4, 128, 256), (4, 256, 192), "bfloat16"),
               TAKEN["dense_packed_f16"]):
        _, wl = task_of(fn, resolve_target(SM80))
        space = dense_tensorcore.space(wl)
        accepted = []
        for (bm, bn), (wm, wn), bk, stages, vector in itertools.product(
                dense_tensorcore.BLOCK_TILES, dense_tensorcore.WARP_TILES, dense_tensorcore.CHUNKS,
                dense_tensorcore.STAGES, dense_tensorcore.VECTORS):
            cfg = {"block_m": bm, "block_n": bn, "warp_m": wm, "warp_n": wn, "chunk_k": bk, "stages": stages,
                   "vector": vector}
            try:
                dense_tensorcore.check(wl, cfg)
            except InvalidConfig:
                assert cfg not in space, cfg
                continue
            accepted.append(cfg)
            assert cfg in space, cfg
            assert dense_tensorcore.shared_bytes(wl, cfg) <= dense_tensorcore.SHARED_BYTES
        assert len(space) == len(accepted) > 10, wl.summary()
        assert dense_tensorcore.default(wl) in space


def test_shared_bytes_counts_padded_stages_or_the_output_tile():
    """128 × 128 × 32 in 3 stages: (128 + 128) rows of 32 + 8 halves per stage, against the 128 × 132 float32
    output tile that reuses that memory after the reduction."""
    _, wl = task_of(_dense(256, 128, 256, "float16"), resolve_target(SM80))
    cfg = {"block_m": 128, "block_n": 128, "warp_m": 64, "warp_n": 64, "chunk_k": 32, "stages": 3, "vector": 8}
    assert dense_tensorcore.shared_bytes(wl, cfg) == max(3 * 256 * 40 * 2, 128 * 132 * 4)
    assert dense_tensorcore.shared_bytes(wl, {**cfg, "stages": 4, "chunk_k": 64}) == 4 * 256 * 72 * 2


def test_check_rejects_unbuildable_configs():
    _, wl = task_of(_dense(256, 128, 256, "float16"), resolve_target(SM80))
    cfg = dense_tensorcore.default(wl)
    for bad in ({**cfg, "block_m": 256, "block_n": 256},  # 16 warps of 64 x 64
                {**cfg, "stages": 4, "chunk_k": 64},  # k=128 has 2 chunks of 64, fewer than 4 stages
                {**cfg, "warp_m": 32, "warp_n": 32}):  # 16 warps
        with pytest.raises(InvalidConfig):
            dense_tensorcore.check(wl, bad)


# --- the PTX --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target_name, arch", [(SM80, "sm_80"), (SM90, "sm_90")])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_default_config_compiles_to_tensor_core_ptx(target_name, arch, dtype, tmp_path):
    """Dense + bias + relu at the default config (128 x 128 blocks of four 64 x 64 warps, k chunks of 32 in 3
    stages): one kernel; its PTX holds mma.sync m16n8k16 with f32 accumulators on this dtype, ldmatrix x4,
    16-byte cp.async with commit/wait groups; ptxas fits it in 255 registers with no spills."""
    target = resolve_target(target_name)
    g = lower(_dense(512, 512, 512, dtype), target)
    assert g.template == dense_tensorcore.TEMPLATE.key and g.config_source == "default"
    assert g.config == {"block_m": 128, "block_n": 128, "warp_m": 64, "warp_n": 64, "chunk_k": 32, "stages": 3,
                        "vector": 8}
    ptx = _compile({"gemm": g}, target)
    assert re.search(rf"^\.target {arch}\b", ptx, re.MULTILINE)
    short = SHORT[dtype]
    mma = ptx.count(f"mma.sync.aligned.m16n8k16.row.col.f32.{short}.{short}.f32")
    # per k chunk each warp runs (64/16)² tiles × 2 k steps × 2 n8 halves = 64 mma; the pipelines unroll a few
    assert mma > 0 and mma % 64 == 0, mma
    assert "mma.sync" not in ptx.replace(f"mma.sync.aligned.m16n8k16.row.col.f32.{short}.{short}.f32", "")
    assert ptx.count("ldmatrix.sync.aligned.m8n8.x4.shared.b16") > 0
    assert "ldmatrix.sync.aligned.m8n8.x4.trans" not in ptx  # dense's B is [n, k]: mma's col operand as stored
    assert ptx.count("cp.async.cg.shared.global") > 0  # 16-byte copies, L1 bypassed
    assert "cp.async.commit_group" in ptx and "cp.async.wait_group" in ptx
    regs, spill_stores, spill_loads = _ptxas(ptx, arch, tmp_path)
    print(f"{dtype} {arch}: {regs} registers, spills {spill_stores}/{spill_loads} bytes")
    assert regs <= 255 and spill_stores == spill_loads == 0


def test_bfloat16_kernel_is_the_float16_kernel_with_its_types_renamed():
    """TVM 0.27 defines ldmatrix and mma.sync for float16 only; the template's bfloat16 intrinsics must give the
    very same kernel with nv_bfloat16 for half and .bf16 for .f16, index for index."""
    import tvm

    target = resolve_target(SM80)
    kernels = {}
    for dtype in ("float16", "bfloat16"):
        g = lower(_dense(256, 256, 256, dtype, epilogue=False), target)
        source = device_source(tvm.compile(tvm.IRModule({"main": g.prim_func}), target=target))
        kernels[dtype] = source[source.index('extern "C" __global__'):]
    assert "nv_bfloat16" in kernels["bfloat16"] and "bf16.bf16.f32" in kernels["bfloat16"]
    assert kernels["bfloat16"].replace("nv_bfloat16", "half").replace("bf16", "f16") == kernels["float16"]


def _events(text: str) -> list[str]:
    """ldmatrix reads, cp.async copies and barriers of CUDA source, in text order."""
    found = [(m.start(), "read") for m in re.finditer(r"ldmatrix\.sync", text)]
    found += [(m.start(), "copy") for m in re.finditer(r"ptx_cp_async\w*\(\(", text)]
    found += [(m.start(), "sync") for m in re.finditer(r"__syncthreads\(\)", text)]
    return [kind for _, kind in sorted(found)]


def _block(text: str, start: int) -> str:
    """The text from `start` (just after an opening brace) to its closing brace."""
    depth, at = 1, start
    while depth:
        depth += {"{": 1, "}": -1}.get(text[at], 0)
        at += 1
    return text[start:at]


def _copy_after_read(kinds: list[str], cyclic: bool) -> bool:
    """Some copy has a read before it (cyclically: also from the end of a loop body) with no barrier between."""
    last = None
    for kind in kinds + kinds if cyclic else kinds:
        if kind == "copy" and last == "read":
            return True
        if kind != "copy":
            last = kind
    return False


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_a_barrier_separates_fragment_reads_from_the_next_copies_into_shared(stages):
    """cp.async into the pipeline stage warps read with ldmatrix an iteration before: every copy issued after an
    ldmatrix, in the kernel and around the k loop, has a __syncthreads between them (a write-after-read race
    otherwise)."""
    import tvm

    target = resolve_target(SM80)
    fn = _dense(512, 256, 256, "float16")
    _, wl = task_of(fn, target)
    g = lower(fn, target, {wl.key: {**dense_tensorcore.default(wl), "stages": stages}})
    source = device_source(tvm.compile(tvm.IRModule({"main": g.prim_func}), target=target))
    kernel = source[source.index('extern "C" __global__'):]
    bodies = (_block(kernel, m.end()) for m in re.finditer(r"for \(int \w+[^{]*\{", kernel))
    loop = _events(next(b for b in bodies if "ptx_cp_async" in b and "ldmatrix" in b))  # the k loop
    assert loop.count("copy") >= 2 and "read" in loop, loop
    assert not _copy_after_read(loop, cyclic=True), f"stages={stages}: k loop {loop}"
    assert not _copy_after_read(_events(kernel), cyclic=False), f"stages={stages}"


def test_matmul_reads_b_through_transposing_ldmatrix(tmp_path):
    """matmul's B is [k, n]: ldmatrix .trans gives mma its column-major operand; 8-byte copies use cp.async.ca;
    the batch goes to blockIdx.y."""
    target = resolve_target(SM80)
    fn = _matmul((4, 128, 256), (4, 256, 192), "float16")
    _, wl = task_of(fn, target)
    cfg = {**dense_tensorcore.default(wl), "vector": 4}
    g = lower(fn, target, {wl.key: cfg})
    assert g.config_source == "given"
    ptx = _compile({"bmm": g}, target)
    assert "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in ptx
    assert "cp.async.ca.shared.global" in ptx and "cp.async.cg" not in ptx
    assert "%ctaid.y" in ptx


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2))
def test_random_configs_compile_to_ptx(seed):
    """Configs drawn from the space (not only the default) build, for each dtype and B layout."""
    target = resolve_target(SM80)
    rng = random.Random(seed)
    funcs, drawn = {}, {}
    groups = (_dense(256, 256, 512, "float16"), _matmul((2, 256, 128), (2, 128, 256), "bfloat16"),
              TAKEN["dense_packed_f16"])
    for i, fn in enumerate(groups):
        _, wl = task_of(fn, target)
        cfg = drawn[f"g{i}"] = dense_tensorcore.space(wl).sample(rng)
        g = lower(fn, target, {wl.key: cfg})
        assert (g.config_source, g.config) == ("given", cfg), f"seed {seed}: {cfg}"
        funcs[f"g{i}"] = g
    ptx = _compile(funcs, target)
    assert "mma.sync.aligned.m16n8k16" in ptx and "cp.async" in ptx, f"seed {seed}: {drawn}"


@pytest.mark.slow
@pytest.mark.parametrize("dtype, b_layout", [("float16", "nk"), ("bfloat16", "kn")])
def test_every_config_of_the_space_builds(dtype, b_layout):
    """All configs of a 512 x 512 x 512 GEMM's space (128 of them) lower and compile through nvcc."""
    target = resolve_target(SM80)
    fn = _dense(512, 512, 512, dtype) if b_layout == "nk" else _matmul((512, 512), (512, 512), dtype)
    _, wl = task_of(fn, target)
    space: Space = dense_tensorcore.space(wl)
    assert len(space) == 128
    configs = list(space)
    for start in range(0, len(configs), 32):
        funcs = {}
        for i, cfg in enumerate(configs[start:start + 32]):
            g = lower(fn, target, {wl.key: cfg})
            assert (g.config_source, g.config) == ("given", cfg)
            funcs[f"g{start + i}"] = g
        ptx = _compile(funcs, target)
        assert ptx.count(".visible .entry") == len(funcs)


def test_dense_tiled_space_is_unchanged_for_float16_it_still_takes():
    """Half-precision shapes the tensor-core template leaves go on to dense_tiled with its full space."""
    fn = _dense(100, 512, 384, "float16")
    template, wl = task_of(fn, resolve_target(SM80))
    assert template is dense_tiled.TEMPLATE
    assert dense_tiled.default(wl) in dense_tiled.space(wl)


def test_gpu_gemm_bench_builds_a_bundle_the_gpu_side_can_read(tmp_path):
    """bench/gpu_gemm.py --build: a library and PTX per point and a manifest; the GPU side's compile callback
    answers the library's CUDA source with that PTX (no compiler there)."""
    from tests.bench_scripts import load_bench

    bench = load_bench("gpu_gemm")
    manifest = bench.build(tmp_path, SM90, bench.POINTS[:1])
    (point,) = manifest["points"]
    assert point["config"] == dense_tensorcore.default(task_of(_dense(4096, 4096, 4096, "float16", False),
                                                               resolve_target(SM90))[1])
    assert point["ptxas"]["registers"] <= 255 and point["ptxas"]["spill_store_bytes"] == 0
    assert bench.check_bundle(tmp_path) == {"ok": True, "points": [point["name"]], "missing": [],
                                            "ptx_lacking": {}}
    ptx = (tmp_path / point["ptx"]).read_text()
    assert re.search(r"^\.target sm_90\b", ptx, re.MULTILINE)
    bench._PTX.update({name: ptx for name in ptx_kernels(ptx)})
    source = f'extern "C" __global__ void __launch_bounds__(128) {point["function"]}_kernel(half* x) {{}}'
    assert bench._compile_callback(source, None) == ptx.encode()
    with pytest.raises(RuntimeError, match="no bundled PTX"):
        bench._compile_callback('extern "C" __global__ void other_kernel(half* x) {}', None)


@pytest.mark.slow
@pytest.mark.parametrize("b_layout", ["nk", "kn"])
def test_kiln_intrinsics_give_the_kernel_tvms_float16_intrinsics_give(b_layout, monkeypatch):
    """The template registers its own ldmatrix / mma.sync / fill / store intrinsics (importing TVM's parses
    minutes of TVMScript); with TVM's registered float16 ones in their place the CUDA source is the same."""
    import tvm

    target = resolve_target(SM80)
    fn = _dense(256, 256, 256, "float16") if b_layout == "nk" else _matmul((256, 256), (256, 256), "float16")

    def source():
        g = lower(fn, target)
        return device_source(tvm.compile(tvm.IRModule({"main": g.prim_func}), target=target))

    ours = source()
    from tvm.s_tir.tensor_intrin import cuda as tvm_intrin

    kiln_intrinsics = dense_tensorcore._intrinsics

    def tvms(dtype, layout, vector):
        nk = layout == "nk"
        return {**kiln_intrinsics(dtype, layout, vector), "load_a": tvm_intrin.LDMATRIX_f16_A_DYN_INTRIN,
                "load_b": tvm_intrin.LDMATRIX_f16_B_TRANS_DYN_INTRIN if nk else tvm_intrin.LDMATRIX_f16_B_DYN_INTRIN,
                "mma": tvm_intrin.MMA_f16f16f32_TRANS_B_INTRIN if nk else tvm_intrin.MMA_f16f16f32_INTRIN,
                "fill": tvm_intrin.MMA_fill_16x16_f32_INTRIN,
                "store": tvm_intrin.MMA_store_16x16_f32_shared_dyn_INTRIN_SIMPLE}

    monkeypatch.setattr(dense_tensorcore, "_intrinsics", tvms)
    assert source() == ours



@pytest.mark.parametrize("arch,sm,tensor_cores", [("sm_75", 75, False), ("sm_80", 80, True), ("sm_90", 90, True)])
def test_tensor_core_templates_need_sm80(arch, sm, tensor_cores):
    """mma.sync m16n8k16 on f16/bf16 and cp.async exist from sm_80: on an sm_75 target the same fp16 group goes
    to the tiled template (code a Turing GPU can run)."""
    from kiln.schedules.target_info import target_info
    from tvm.target import Target

    target = Target({"kind": "cuda", "arch": arch, "host": {"kind": "llvm"}})
    assert target_info(target).sm == sm
    want = dense_tensorcore.TEMPLATE if tensor_cores else dense_tiled.TEMPLATE
    assert task_of(TAKEN["dense_f16_bias_relu"], target)[0] is want
    no_arch = Target({"kind": "cuda", "host": {"kind": "llvm"}})  # TVM fills in sm_50: no tensor cores
    assert target_info(no_arch).sm < dense_tensorcore.MIN_SM
    assert task_of(TAKEN["dense_f16_bias_relu"], no_arch)[0] is dense_tiled.TEMPLATE
