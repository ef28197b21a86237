"""One table of numeric tolerances, keyed by dtype, for every comparison in the tests."""

import numpy as np

TOLERANCES = {  # dtype: (rtol, atol)
    "float16": (1e-2, 1e-3),
    "float32": (1e-4, 1e-5),
    "float64": (1e-10, 1e-12),
}


def assert_close(got, want, *, rtol=None, atol=None, what: str = "") -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != expected {want.shape}"
    if want.dtype.kind in "fc":
        r, a = TOLERANCES.get(want.dtype.name, (1e-4, 1e-5))
        np.testing.assert_allclose(got, want, rtol=rtol if rtol is not None else r,
                                   atol=atol if atol is not None else a, err_msg=what)
    else:
        assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != expected {want.dtype}"
        np.testing.assert_array_equal(got, want, err_msg=what)
