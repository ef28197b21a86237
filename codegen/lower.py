"""A fused group (a primitive Function) → one TensorIR PrimFunc: TE placeholders for its params, each op's TE
compute in order, `te.create_prim_func`, then the group's schedule. TVM errors become CodegenErrors that name
the group, its ops and the target."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from kiln.errors import CodegenError
from kiln.ir import Call, Constant, Function, TensorType, Tuple, TupleGetItem, Var
from kiln.ir.op import OpDef
from kiln.ir.ops import float_math
from kiln.ir.visitor import post_order


@dataclass
class LoweredGroup:
    symbol: str
    ops: list[str]
    prim_func: object  # tvm.tirx.PrimFunc, scheduled
    schedule: str  # which schedule steps were applied, for --explain and profiles
    template: str = ""  # name@version of the template that scheduled it
    workload: str = ""  # its workload key: kernels with the same key share a config
    config: dict | None = None
    config_source: str = "default"  # "default", "given" (a tuning record or a caller's mapping), "fallback: ..."
    out_type: object = None  # the group's output TensorType


def group_ops(fn: Function) -> list[str]:
    return [e.op.name for e in post_order(fn.body) if isinstance(e, Call) and isinstance(e.op, OpDef)]


BF16 = "bfloat16"
WIDENED_ON_CPU = frozenset({BF16, "float16"})  # half-precision dtypes an LLVM target computes in float32
WIDENED = "_as_f32"  # the name suffix of the stages that widen a half-precision value (inlined before scheduling)


def to_te(fn: Function, widen: Collection[str] = ()):
    """(placeholders, output tensor) of a primitive function.

    `widen` (LLVM targets: float16 and bfloat16): values of these dtypes are stored in them but computed in
    float32, widened where they are read and rounded once where the group stores them or the graph casts to
    them. bfloat16 goes by integer arithmetic on the bits (a shift up; round to nearest even down), so no
    bfloat16 arithmetic and no bfloat16 cast reaches TVM: TVM 0.27's own bfloat16 legalization for LLVM does
    the same conversions but failed on 40 of 471 random graphs (a Let bound twice, a vector store of the wrong
    width, a buffer used before its declaration, a segfault). float16 goes by casts, which LLVM lowers to the
    CPU's conversion instructions; computed in float16 it ran ResNet-50 2.5x slower than float32, widened 2.0x."""
    from tvm import te, tirx as tir

    env: dict[int, object] = {}
    raw: dict[int, object] = {}  # each parameter's placeholder as stored (a bitcast reads the bits, not a widening)
    placeholders = []

    def widened(t):
        dtype = str(t.dtype)
        if dtype not in widen:
            return t
        up = _from_bf16 if dtype == BF16 else (lambda v: v.astype("float32"))
        return te.compute(t.shape, lambda *i: up(t(*i)), name=f"{t.op.name}{WIDENED}")

    def rounded(t, dtype, name):
        down = _to_bf16 if dtype == BF16 else (lambda v: v.astype(dtype))
        return te.compute(t.shape, lambda *i: down(t(*i).astype("float32")), name=name)

    for i, p in enumerate(fn.params):
        if not isinstance(p.type, TensorType):
            raise CodegenError(f"group parameter %{p.name} is {p.type}; kernels take tensors")
        t = te.placeholder(tuple(int(d) for d in p.type.shape), p.type.dtype, name=f"p{i}")
        env[id(p)] = widened(t)
        raw[id(p)] = t
        placeholders.append(t)
    for e in post_order(fn.body):
        if id(e) in env:
            continue
        if isinstance(e, Constant):
            if e.value.ndim != 0:
                raise CodegenError("a non-scalar constant inside a group; fusion passes weights as params")
            dtype = "float32" if e.type.dtype in widen else e.type.dtype
            env[id(e)] = _scalar_tensor(e, te, tir, dtype)
        elif isinstance(e, Call):
            op = e.op
            if not isinstance(op, OpDef) or op.compute is None:
                raise CodegenError(f"{e.op_name} has no compute yet (node '{e.span}')")
            args = [env[id(a)] for a in e.args]
            if op.name == "bitcast" and id(e.args[0]) in raw:  # opaque, so always a group's parameter
                args = [raw[id(e.args[0])]]
            want = e.type.dtype if isinstance(e.type, TensorType) else None
            if op.name == "cast" and want in widen:
                out = rounded(args[0], want, "cast")  # the graph's own rounding, kept
            else:
                out = op.compute(args, e.attrs) if op.variadic else op.compute(*args, e.attrs)
            if want in widen and str(out.dtype) == "float32":
                # computed from widened inputs: float32 until the group's output, rounded there
                out = rounded(out, want, f"{out.op.name}_{want}") if e is fn.body else out
            elif want is not None and str(out.dtype) != want:
                # a kernel writing float32 into a planned float16 buffer would overrun it; TVM's argument check
                # only catches it at run time, for the group's output
                raise CodegenError(f"{e.op_name} (node '{e.span}'): its compute gives {out.dtype} where its type "
                                   f"says {want}")
            env[id(e)] = out if e is fn.body else widened(out)
        elif isinstance(e, (Tuple, TupleGetItem, Var)):
            raise CodegenError(f"{type(e).__name__} inside a fused group is not supported yet")
    return placeholders, env[id(fn.body)]


def _dtypes(fn: Function) -> frozenset[str]:
    return frozenset(e.type.dtype for e in [*fn.params, *post_order(fn.body)]
                     if isinstance(e, (Var, Call)) and isinstance(e.type, TensorType))


def _inline_widening(prim):
    """The half → float32 stages of `to_te` inlined into their readers before a template sees the group,
    which then has the blocks it has at any other precision (a widened weight left as a block of its own sat
    where the fused depthwise + 1x1 template expects the depthwise row, and was recomputed every row: 28x
    slower)."""
    from tvm import s_tir

    sch = s_tir.Schedule(prim)
    for b in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(b).name_hint.endswith(WIDENED):
            sch.compute_inline(b)
    return sch.mod["main"]


def _from_bf16(x):
    """bfloat16 → float32: its 16 bits are the float32's high half."""
    from tvm import tirx as tir

    bits = tir.reinterpret("uint16", x).astype("uint32") << tir.const(16, "uint32")
    return tir.reinterpret("float32", bits)


def _to_bf16(x):
    """float32 → bfloat16, rounded to nearest even (NaN stays a quiet NaN), in integer arithmetic on the bits,
    which are bound once (a Let), so an operand holding Lets of its own (hard swish's clip) is not repeated."""
    from tvm import tirx as tir

    u32 = "uint32"
    bits = tir.Var("bits", u32)
    one, half, sixteen = tir.const(1, u32), tir.const(0x7FFF, u32), tir.const(16, u32)
    nearest = (bits + half + ((bits >> sixteen) & one)) >> sixteen
    nan = (bits & tir.const(0x7FFFFFFF, u32)) > tir.const(0x7F800000, u32)
    value = tir.Select(nan, tir.const(0x7FC0, u32), nearest).astype("uint16")
    return tir.Let(bits, tir.reinterpret(u32, x), tir.reinterpret(BF16, value))


def _scalar_tensor(c: Constant, te, tir, dtype: str | None = None):
    value = c.value.item()
    return te.compute((), lambda: tir.const(value, dtype or c.type.dtype), name="scalar")


def lower_group(fn: Function, symbol: str, target, configs: Mapping[str, dict] | None = None) -> LoweredGroup:
    """The group as one scheduled PrimFunc named `symbol`; `configs` maps workload keys to tuned configs."""
    from tvm import te

    from kiln.ir.ops.conv import padded_plane
    from kiln.schedules.dispatch import schedule_group

    ops = group_ops(fn)
    try:
        widen = WIDENED_ON_CPU & _dtypes(fn) if target.kind.name == "llvm" else frozenset()

        def build(plane: int = 0):
            with float_math.lowering_for(target.kind.name), padded_plane(plane):
                placeholders, out = to_te(fn, widen)
            prim = te.create_prim_func([*placeholders, out]).with_attr("global_symbol", symbol)
            return _inline_widening(prim) if widen else prim

        s = schedule_group(build(), fn, target, configs, rebuild=build)
    except CodegenError:
        raise
    except Exception as err:  # TVM raises its own error types; name the group for the user
        raise CodegenError(f"group {symbol} ({' + '.join(ops)}) on {target.kind.name}: "
                           f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    return LoweredGroup(symbol, ops, s.prim_func, s.steps, s.template, s.workload.key, s.config, s.source,
                        fn.body.type)

