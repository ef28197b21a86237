"""Convert a float32 model to float16 or bfloat16 compute: weights become half-precision constants, each op
computes in half unless the table below keeps it in float32, and the model's inputs and outputs stay float32
(one cast at entry, one at exit). After this pass every float32 value left is in an op kept in float32, on
the way into or out of one, or at the model's edge.

Kernels of half-precision matmul, conv, softmax, pools, norms and reductions already sum in float32 and round
once (ir/ops/accumulate.py), so what this pass keeps in float32 is what a single rounding does not protect:
values that leave the half range or lose their meaning at 8 or 11 significant bits.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from kiln.ir import Call, Constant, Expr, Function, IRModule, TensorType, Tuple, Var
from kiln.ir.op import OpDef, OpPattern
from kiln.ir.ops.conv import CONV1D, CONV1D_TRANSPOSE, CONV2D, CONV2D_TRANSPOSE, CONV3D, CONV3D_TRANSPOSE
from kiln.ir.ops.dense import DENSE, EINSUM, MATMUL
from kiln.ir.ops.elementwise import CAST, DEQUANTIZE, OPS, QUANTIZE
from kiln.ir.ops.norm import (
    GROUP_NORM,
    INSTANCE_NORM,
    LAYER_NORM,
    LP_NORMALIZE,
    LRN,
    MEAN_VARIANCE_NORM,
    RMS_NORM,
)
from kiln.ir.ops.pool import AVG_POOL, GLOBAL_AVG_POOL, GLOBAL_LP_POOL, GLOBAL_MAX_POOL, LP_POOL, MAX_POOL
from kiln.ir.ops.reduce import REDUCE_OPS
from kiln.ir.ops.softmax import LOG_SOFTMAX, SOFTMAX
from kiln.ir.ops.transform import CUMPROD, CUMSUM
from kiln.ir.visitor import children, post_order, with_children

Pass = Callable[[IRModule], IRModule]

# The CLI's names → the IR dtype values are stored and computed in. tf32 stores float32: it only tells CUDA
# matmul templates that TF32 tensor cores may round their inputs (mod.attrs["precision"]); on CPU it is fp32.
PRECISIONS = {"fp32": "float32", "tf32": "float32", "int8": "float32", "fp16": "float16", "bf16": "bfloat16"}
HALF = ("float16", "bfloat16")

# Ops that always compute in half: the heavy ones, whose kernels sum in float32 and round once, so half costs
# one rounding of the result and halves the bytes read.
ALWAYS_HALF: frozenset[OpDef] = frozenset({
    CONV1D, CONV2D, CONV3D, CONV1D_TRANSPOSE, CONV2D_TRANSPOSE, CONV3D_TRANSPOSE, DENSE, MATMUL, EINSUM,
    AVG_POOL, MAX_POOL, GLOBAL_AVG_POOL, GLOBAL_MAX_POOL,
    SOFTMAX,  # max, exp and sum in float32 inside the kernel (softmax.py); the output is in [0, 1]
    LAYER_NORM, INSTANCE_NORM, GROUP_NORM, RMS_NORM, MEAN_VARIANCE_NORM,  # statistics in float32 (norm.py)
})

# Ops kept in float32, each for a reason; their half inputs are widened, their consumers follow the rules below.
KEEP_FLOAT32: dict[OpDef, str] = {
    OPS["exp"]: "exp(x) overflows float16 above x = 11; an exp/log chain outside softmax loses its range",
    OPS["log"]: "log near 1 and of tiny values needs more than 11 bits of its input",
    OPS["power"]: "x**2 of a decomposed variance overflows float16 above 256 and squares the rounding",
    OPS["reciprocal"]: "1/x overflows float16 for |x| < 1.5e-5",
    OPS["softplus"]: "log(1 + exp(x)): the exp/log chain again",
    OPS["sinh"]: "an exp inside: overflows float16 above x = 11",
    OPS["cosh"]: "an exp inside: overflows float16 above x = 11",
    LOG_SOFTMAX: "log of small probabilities: outputs near -100 keep 2 decimal digits in float16",
    REDUCE_OPS["sum"]: "a sum of many values leaves float16's range (65504); dividing by it amplifies the error",
    REDUCE_OPS["prod"]: "a product of many values leaves float16's range",
    REDUCE_OPS["l1"]: "a sum of magnitudes: the range of sum",
    REDUCE_OPS["l2"]: "a sum of squares: overflows float16 for values above 256",
    REDUCE_OPS["sum_square"]: "a sum of squares: overflows float16 for values above 256",
    REDUCE_OPS["log_sum"]: "log of a sum: the range of sum, then log",
    REDUCE_OPS["log_sum_exp"]: "exp, sum and log: an exp/log chain",
    CUMSUM: "a running sum grows out of float16's range",
    CUMPROD: "a running product grows out of float16's range",
    LP_NORMALIZE: "a p-norm of the row: a sum of powers, divided by",
    LRN: "a windowed sum of squares raised to a power, divided by",
    LP_POOL: "a windowed sum of powers",
    GLOBAL_LP_POOL: "a sum of powers",
    QUANTIZE: "int8 scales and zero points are calibrated in float32",
    DEQUANTIZE: "int8 scales and zero points are calibrated in float32",
}
# Every other op follows its inputs: half when no float argument is a float32 value computed by the model
# (constants convert; a model input is cast once at entry), else float32, so a float32 island stays float32
# up to the next ALWAYS_HALF op.
# A cast keeps its target dtype: Cast(int → float32) stays float32 (an int above 2048 is not exact in half).


def to_precision(dtype: str) -> Pass:
    """The pass converting a float32 module to `dtype` compute ("float16" or "bfloat16"); for "float32" the
    identity. Inputs and outputs keep their float32 types."""
    if dtype == "float32":
        return lambda mod: mod
    if dtype not in HALF:
        raise ValueError(f"to_precision: {dtype!r} is not float32, float16 or bfloat16")

    def convert(mod: IRModule) -> IRModule:
        return _convert(mod, dtype)

    convert.__name__ = f"to_{dtype}"
    return convert


def convert_precision(mod: IRModule) -> IRModule:
    """The pipeline's step: `to_precision` of the dtype in mod.attrs["precision"] (fp32, tf32, fp16, bf16;
    fp32 when absent), which the driver sets from Options.precision."""
    return to_precision(PRECISIONS[mod.attrs.get("precision", "fp32")])(mod)


def _float(e: Expr) -> str | None:
    """The float dtype of a tensor value we convert (float32 or half), else None."""
    if isinstance(e.type, TensorType) and e.type.dtype in ("float32", "float16", "bfloat16"):
        return e.type.dtype
    return None


def _convert(mod: IRModule, half: str) -> IRModule:
    casts: dict[tuple[int, str], Expr] = {}  # one cast (or converted constant) per value and dtype

    def as_dtype(e: Expr, dtype: str) -> Expr:
        if _float(e) in (None, dtype):
            return e
        key = (id(e), dtype)
        if key not in casts:
            if isinstance(e, Constant):
                casts[key] = Constant(_round_constant(e.value, dtype), e.name)
            else:
                casts[key] = Call(CAST, (e,), CAST.make_attrs(dtype=dtype))
        return casts[key]

    new: dict[int, Expr] = {}
    for node in post_order(mod.main.body):
        args = tuple(new[id(c)] for c in children(node))
        if isinstance(node, Call) and isinstance(node.op, OpDef) and node.op is not CAST:
            dtype = _compute_dtype(node.op, args, half)
            if dtype is not None:
                args = tuple(as_dtype(a, dtype) for a in args)
        new[id(node)] = with_children(node, args) if args else node

    def exit_(out: Expr, was: Expr) -> Expr:
        """An output the model gave as float32, float32 again. An opaque op (layer_norm, softmax) takes no
        epilogue, so its exit cast would be a kernel of its own: it computes in float32 from widened args
        instead, and those casts fuse into the kernels that make the args."""
        if _float(was) != "float32" or _float(out) == "float32":
            return out
        if isinstance(out, Call) and isinstance(out.op, OpDef) and out.op.pattern is OpPattern.OPAQUE \
                and out.op is not CAST:
            return Call(out.op, tuple(as_dtype(a, "float32") for a in out.args), out.attrs, span=out.span)
        return as_dtype(out, "float32")

    body, old_out = new[id(mod.main.body)], mod.main.body
    if isinstance(old_out, Tuple):
        body = Tuple(tuple(exit_(f, o) for f, o in zip(body.fields, old_out.fields)))
    else:
        body = exit_(body, old_out)
    if body is mod.main.body:
        return mod
    return mod.with_main(Function(mod.main.params, body, mod.main.attrs))


def _compute_dtype(op: OpDef, args: tuple[Expr, ...], half: str) -> str | None:
    """The float dtype `op` computes in, given its (converted) args; None when it has no float args."""
    floats = [a for a in args if _float(a)]
    if not floats:
        return None
    if op in ALWAYS_HALF:
        return half
    if op in KEEP_FLOAT32:
        return "float32"
    if any(_float(a) == "float32" and not isinstance(a, (Constant, Var)) for a in floats):
        return "float32"
    return half if any(_float(a) == half for a in floats) else None


def _round_constant(value: np.ndarray, dtype: str) -> np.ndarray:
    """A float32 constant as `dtype`. Finite values beyond float16's range are clipped to its largest finite
    value rather than becoming inf: attention masks of -1e9 or -FLT_MAX must stay "very negative", since
    inf - inf and 0 * inf are NaN."""
    if dtype == "float16":
        limit = np.finfo(np.float16).max
        finite = np.isfinite(value)
        return np.where(finite, np.clip(value, -limit, limit), value).astype(np.float16)
    if dtype == "bfloat16":
        import ml_dtypes

        return value.astype(ml_dtypes.bfloat16)
    return value.astype(dtype)
