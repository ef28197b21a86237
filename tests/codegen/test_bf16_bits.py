"""bfloat16 on LLVM targets is stored as bfloat16 and computed in float32, converted by integer arithmetic on the
bits (codegen/lower.py): float32 → bfloat16 must round to nearest even exactly as ml_dtypes does, ties, NaN,
infinities and subnormals included, and bfloat16 → float32 must be exact."""

import ml_dtypes
import numpy as np
import pytest

BF16 = np.dtype(ml_dtypes.bfloat16)


def _kernel(fn, in_dtype: str, out_dtype: str, n: int, lanes: int):
    import tvm
    from tvm import s_tir, te

    a = te.placeholder((n,), in_dtype, name="a")
    b = te.compute((n,), lambda i: fn(a[i]), name="b")
    sch = s_tir.Schedule(te.create_prim_func([a, b]))
    if lanes > 1:
        _, inner = sch.split(sch.get_loops(sch.get_sblock("b"))[0], [None, lanes])
        sch.vectorize(inner)
    f = tvm.compile(sch.mod, target=tvm.target.Target({"kind": "llvm"}))

    def run(x):
        out = tvm.runtime.empty((n,), out_dtype)
        f(tvm.runtime.tensor(x), out)
        return out.numpy()

    return run


def _edge_values() -> np.ndarray:
    bits = np.array([0x3F808000, 0x3F818000, 0x3F80C000, 0x3F807FFF, 0x7F7FFFFF, 0x7F800000, 0xFF800000,
                     0x7FC00000, 0xFFC00001, 0x7F800001, 0x00000001, 0x00808000, 0x80000000, 0x3F800000],
                    np.uint32).view(np.float32)
    rng = np.random.default_rng(0)
    rand = (rng.standard_normal(2034) * np.exp2(rng.integers(-130, 120, 2034))).astype(np.float32)
    return np.concatenate([bits, rand])


@pytest.mark.parametrize("lanes", [1, 16])
def test_rounding_to_bfloat16_matches_ml_dtypes_bit_for_bit(lanes):
    from kiln.codegen.lower import _to_bf16

    x = _edge_values()
    got = _kernel(_to_bf16, "float32", "bfloat16", x.size, lanes)(x)
    with np.errstate(invalid="ignore"):  # NaN payloads
        want = x.astype(BF16)
    nan = np.isnan(want.astype(np.float32))
    assert np.array_equal(np.isnan(got.astype(np.float32)), nan)
    assert np.array_equal(got.view(np.uint16)[~nan], want.view(np.uint16)[~nan])


@pytest.mark.parametrize("lanes", [1, 16])
def test_widening_bfloat16_is_exact(lanes):
    from kiln.codegen.lower import _from_bf16

    with np.errstate(invalid="ignore"):
        x = _edge_values().astype(BF16)
    got = _kernel(_from_bf16, "bfloat16", "float32", x.size, lanes)(x)
    assert np.array_equal(got.view(np.uint32), x.astype(np.float32).view(np.uint32))
