"""Each pass on hand-built graphs and real models: the interpreter's answer never changes, inputs are never
mutated, and each pass leaves the invariant its docstring promises."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln import zoo
from kiln.frontend import from_onnx
from kiln.ir import Call, Function, IRModule, call, const, print_ir, run_module, var
from kiln.ir.ops import elementwise as ew
from kiln.ir.ops.norm import BATCH_NORM
from kiln.ir.ops.transform import RESHAPE, TRANSPOSE
from kiln.ir.visitor import calls
from kiln.passes import (
    O2, eliminate_common_subexpr, fold_batch_norm, fold_constants, fuse_ops, group_ops, plan_memory, run,
    simplify_inference,
)

from ..tolerances import assert_close
from .graphs import resnet_basic_block


def outputs(mod, seed=0):
    rng = np.random.default_rng(seed)
    feeds = {p.name: rng.standard_normal(p.ttype.shape).astype(p.ttype.dtype) for p in mod.main.params}
    return run_module(mod, **feeds)


@pytest.mark.parametrize("p", O2, ids=lambda p: p.__name__)
def test_every_pass_keeps_the_answer_and_the_input(p):
    mod = resnet_basic_block()
    before = print_ir(mod)
    after = p(mod)
    assert print_ir(mod) == before  # the module given is untouched
    for a, b in zip(outputs(mod), outputs(after)):
        assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_residual_block_fuses_into_two_kernels():
    mod = run(resnet_basic_block(), [fold_batch_norm, fold_constants, fuse_ops])
    assert group_ops(mod) == [["nn.conv2d", "add", "nn.relu"], ["nn.conv2d", "add", "add", "nn.relu"]]


def test_fold_batch_norm_leaves_none():
    mod = fold_constants(fold_batch_norm(resnet_basic_block()))
    assert not [c for c in calls(mod.main.body) if c.op is BATCH_NORM]


def test_lone_batch_norm_becomes_scale_and_shift():
    x = var("x", "f32[2, 3, 4, 4]")
    r = np.random.default_rng(1)
    bn = call(BATCH_NORM, x, *[const((r.random(3) + 0.5).astype(np.float32)) for _ in range(4)], epsilon=1e-3)
    mod = IRModule({"main": Function((x,), bn)})
    after = fold_batch_norm(mod)
    assert [c.op_name for c in calls(after.main.body)] == ["multiply", "add"]
    assert_close(outputs(after)[0], outputs(mod)[0], rtol=1e-5, atol=1e-6)


def test_fold_constants_evaluates_constant_subgraphs():
    x = var("x", "f32[3]")
    c = call(ew.MULTIPLY, const(np.ones(3, np.float32)), const(np.full(3, 2.0, np.float32)))
    after = fold_constants(IRModule({"main": Function((x,), call(ew.ADD, x, c))}))
    assert [e.op_name for e in calls(after.main.body)] == ["add"]
    assert_close(outputs(after)[0], outputs(IRModule({"main": Function((x,), call(ew.ADD, x, c))}))[0])


def test_cse_merges_identical_calls():
    x = var("x", "f32[4]")
    a, b = call(ew.EXP, x), call(ew.EXP, x)
    mod = IRModule({"main": Function((x,), call(ew.ADD, a, b))})
    after = eliminate_common_subexpr(mod)
    add = after.main.body
    assert add.args[0] is add.args[1]
    assert len([c for c in calls(after.main.body)]) == 2


def test_simplify_collapses_reshapes_and_cancels_transposes():
    x = var("x", "f32[2, 3, 4]")
    r = call(RESHAPE, call(RESHAPE, x, newshape=(6, 4)), newshape=(24,))
    t = call(TRANSPOSE, call(TRANSPOSE, x, axes=(1, 2, 0)), axes=(2, 0, 1))
    after = simplify_inference(IRModule({"main": Function((x,), call(ew.ADD, call(RESHAPE, t, newshape=(24,)), r))}))
    ops = [c.op_name for c in calls(after.main.body)]
    assert "transpose" not in ops and ops.count("reshape") == 2
    reshapes = [c for c in calls(after.main.body) if c.op is RESHAPE]
    assert all(c.args[0] is x for c in reshapes)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["relu", "exp", "add", "mul", "reshape", "sum"]), st.integers(0, 5)),
                min_size=1, max_size=12), st.integers(0, 10_000))
def test_random_graphs_keep_their_answer_through_o2(steps, seed):
    """Random DAGs of elementwise, injective and reduction ops: fusion and planning change nothing."""
    from kiln.ir.ops.reduce import SUM

    x = var("x", "f32[4, 6]")
    values = [x]
    for op, pick in steps:
        a = values[pick % len(values)]
        b = values[(pick * 7 + 3) % len(values)]
        if op == "relu":
            values.append(call(ew.RELU, a))
        elif op == "exp":
            values.append(call(ew.TANH, a))
        elif op == "add":
            values.append(call(ew.ADD, a, b))
        elif op == "mul":
            values.append(call(ew.MULTIPLY, a, const(np.float32(0.5))))
        elif op == "reshape":
            values.append(call(RESHAPE, call(RESHAPE, a, newshape=(24,)), newshape=(4, 6)))
        else:
            values.append(call(ew.ADD, a, call(SUM, a, axes=(1,), keepdims=True)))
    mod = IRModule({"main": Function((x,), values[-1])})
    after = run(mod, O2)
    feeds = np.random.default_rng(seed).standard_normal((4, 6)).astype(np.float32)
    assert_close(run_module(after, feeds)[0], run_module(mod, feeds)[0], rtol=1e-4, atol=1e-5)
    for f in (e.op for e in calls(after.main.body) if isinstance(e.op, Function)):
        assert f.attr("primitive") is True


def test_memory_plan_reuses_blocks():
    mod = run(resnet_basic_block().with_attrs(layout_block=0), O2)  # NCHW: no layout transforms
    plan = mod.attrs["memory_plan"]
    # two kernels: the first's output is the only intermediate, the second's is the model's output
    assert len(plan.assignment) == 1 and plan.planned_bytes == 8 * 6 * 6 * 4 == plan.naive_bytes


def test_resnet50_fusion_and_memory_plan():
    mod = run(from_onnx(zoo.zoo_model("resnet50")), O2)
    groups = group_ops(mod)
    assert groups.count(["nn.conv2d_nchwc", "add", "nn.relu"]) == 33
    assert groups.count(["nn.conv2d_nchwc", "add", "add", "nn.relu"]) == 16
    # one, after the global pool: the first conv reads the 3-channel NCHW input as one block
    assert sum(g.count("layout_transform") for g in groups) == 1
    assert len(groups) == 58
    plan = mod.attrs["memory_plan"]
    assert plan.planned_bytes <= 0.35 * plan.naive_bytes, f"{plan.planned_bytes} of {plan.naive_bytes}"


def test_dump_dir_writes_ir_after_every_pass(tmp_path):
    run(resnet_basic_block(), O2, dump_dir=tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0] == "00_input.kir" and names[-1].endswith("plan_memory.kir") and len(names) == len(O2) + 1
    assert "primitive" in (tmp_path / names[-1]).read_text()


def _residual_blocks(n: int, layout_block: int = 0) -> IRModule:
    """`n` residual blocks in a row: each block's output is a planned tensor the next one adds back."""
    from .graphs import batch_norm, conv

    x = var("x", "f32[1, 8, 6, 6]")
    y = x
    for seed in range(1, 4 * n, 4):
        z = call(ew.RELU, batch_norm(conv(y, 8, 8, seed=seed), 8, seed=seed + 1))
        z = batch_norm(conv(z, 8, 8, seed=seed + 2), 8, seed=seed + 3)
        y = call(ew.RELU, call(ew.ADD, z, y))
    return IRModule({"main": Function((x,), y)}).with_attrs(layout_block=layout_block)


def test_residual_output_overwrites_its_dying_input():
    from kiln.passes.fuse_ops import fused_groups
    from kiln.passes.plan_memory import inplace_params

    mod = run(_residual_blocks(3), O2)
    groups = fused_groups(mod)
    # conv + bias + residual add + relu: the residual param (read once, at the output's index) may be overwritten;
    # the conv's data input may not (its 3x3 window reads neighbours the output would already have overwritten)
    second = groups[1]
    safe = inplace_params(second)
    assert len(safe) == 1 and second.params[next(iter(safe))].type == second.body.type
    assert not inplace_params(groups[0])
    # kernels 0-4 are planned (kernel 5 writes the model's output); kernel 3 adds back kernel 1's output, which
    # dies there: it writes over it, so two blocks do (three without). The model's input is never overwritten.
    blocks = [b for _, b, _ in mod.attrs["memory_plan"].assignment]
    assert len(blocks) == 5 and blocks[3] == blocks[1] and len(set(blocks)) == 2


def test_plan_memory_is_deterministic_and_covers_every_intermediate():
    mod = fuse_ops(resnet_basic_block())
    a, b = plan_memory(mod).attrs["memory_plan"], plan_memory(mod).attrs["memory_plan"]
    assert a == b
    assert isinstance(mod.main.body, Call)


def test_pack_dense_weights_keeps_the_answer():
    from kiln.ir.ops.dense import DENSE, DENSE_PACKED
    from kiln.passes import pack_dense_weights

    x = var("x", "f32[3, 20]")
    w = const(np.random.default_rng(0).standard_normal((48, 20)).astype(np.float32))
    mod = IRModule({"main": Function((x,), call(DENSE, x, w))})
    after = pack_dense_weights(mod)
    assert after.main.body.op is DENSE_PACKED and after.main.body.args[1].type.shape == (3, 20, 16)
    assert_close(outputs(after)[0], outputs(mod)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout_block,units,block", [(8, 48, 8), (8, 20, 4), (16, 40, 8), (4, 48, 16), (0, 48, 16)])
def test_dense_weights_pack_in_blocks_of_one_vector_register(layout_block, units, block):
    """AVX2 (8 lanes) packs 8 units a block so its register tile can take 3 vector columns; AVX-512 16; NEON and
    CUDA (4, 0) keep 16. A unit count the block does not divide takes a half or a quarter block."""
    from kiln.ir.ops.dense import DENSE
    from kiln.passes import pack_dense_weights

    x = var("x", "f32[3, 20]")
    w = const(np.random.default_rng(0).standard_normal((units, 20)).astype(np.float32))
    mod = IRModule({"main": Function((x,), call(DENSE, x, w))}).with_attrs(layout_block=layout_block)
    after = pack_dense_weights(mod)
    assert after.main.body.attrs.block == block and after.main.body.args[1].type.shape == (units // block, 20, block)
    assert_close(outputs(after)[0], outputs(mod)[0], rtol=1e-5, atol=1e-5)


def test_dead_code_elimination_drops_literal_tuple_items_and_uncalled_functions():
    from kiln.ir import Tuple, TupleGetItem
    from kiln.passes import eliminate_dead_code

    x = var("x", "f32[4]")
    a, b = call(ew.EXP, x), call(ew.RELU, x)
    unused = Function((x,), call(ew.TANH, x))
    mod = IRModule({"main": Function((x,), TupleGetItem(Tuple((a, b)), 1)), "helper": unused})
    after = eliminate_dead_code(mod)
    assert list(after.functions) == ["main"]
    assert after.main.body is b
    assert [c.op_name for c in calls(after.main.body)] == ["nn.relu"]


def test_split_items_become_slices_of_the_input():
    from kiln.ir import TupleGetItem
    from kiln.ir.ops.transform import SPLIT, STRIDED_SLICE

    x = var("x", "f32[2, 9]")
    parts = call(SPLIT, x, axis=-1, sizes=(2, 3, 4))
    out = call(ew.ADD, TupleGetItem(parts, 2), const(np.ones(4, np.float32)))
    before = IRModule({"main": Function((x,), out)})
    after = simplify_inference(before)
    sliced = list(calls(after.main.body))
    assert [e.op for e in sliced] == [STRIDED_SLICE, ew.ADD]
    assert sliced[0].attrs.begin == (0, 5) and sliced[0].attrs.end == (None, 9)
    v = np.arange(18, dtype=np.float32).reshape(2, 9)
    np.testing.assert_array_equal(run_module(after, x=v)[0], run_module(before, x=v)[0])


def _concat_graph(extra_reader: bool) -> IRModule:
    from kiln.ir.ops.transform import CONCATENATE

    from .graphs import conv

    x = var("x", "f32[1, 8, 6, 6]")
    a, b = call(ew.RELU, conv(x, 8, 8, seed=1)), call(ew.RELU, conv(x, 8, 8, seed=2))
    y = call(ew.RELU, conv(call(CONCATENATE, a, b, axis=1), 16, 8, seed=3))
    if extra_reader:  # `a` is read by the concat and by this add: it cannot live inside the concat's block
        y = call(ew.ADD, y, a)
    return IRModule({"main": Function((x,), y)}).with_attrs(layout_block=0)


@pytest.mark.parametrize("extra_reader", [False, True])
def test_concat_is_a_view_when_its_inputs_have_no_other_reader(extra_reader):
    mod = run(_concat_graph(extra_reader), O2)
    plan = mod.attrs["memory_plan"]
    if extra_reader:
        assert plan.views == () and all(off == 0 for _, _, off in plan.assignment)
    else:
        assert len(plan.views) == 1
        (_, ba, oa), (_, bb, ob), (_, bc, oc) = plan.assignment[:3]  # conv a, conv b, the concat
        assert ba == bb == bc and (oa, ob, oc) == (0, 8 * 6 * 6 * 4, 0)
