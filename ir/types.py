"""Types of IR values: tensors (shape + dtype) and tuples of them.

A dimension is an int, or a str naming a symbolic dim (a batch size bound at compile time). Types are frozen
and hashable, so they serve as dictionary keys and take part in structural equality.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np

from kiln.errors import TypeCheckError

Dim = Union[int, str]

# The dtypes Kiln knows, with the short names the printer uses.
_SHORT = {
    "float16": "f16",
    "float32": "f32",
    "float64": "f64",
    "bfloat16": "bf16",
    "int8": "i8",
    "int16": "i16",
    "int32": "i32",
    "int64": "i64",
    "uint8": "u8",
    "uint16": "u16",
    "uint32": "u32",
    "uint64": "u64",
    "bool": "bool",
    "string": "str",
}
_LONG = {v: k for k, v in _SHORT.items()}
DTYPES = frozenset(_SHORT)
FLOAT_DTYPES = frozenset({"float16", "float32", "float64", "bfloat16"})
INT_DTYPES = frozenset({"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"})


def short_dtype(dtype: str) -> str:
    return _SHORT[dtype]


def normalize_dtype(dtype: object) -> str:
    """'f32', 'float32', np.float32 and np.dtype('float32') all become 'float32'."""
    if isinstance(dtype, str) and dtype in _LONG:
        return _LONG[dtype]
    if isinstance(dtype, str) and dtype in _SHORT:
        return dtype
    try:
        name = np.dtype(dtype).name  # type: ignore[arg-type]
    except TypeError as err:
        raise TypeCheckError(f"unknown dtype {dtype!r}") from err
    if name.startswith("str") or name == "object":
        return "string"
    if name not in _SHORT:
        raise TypeCheckError(f"unsupported dtype {name!r}; Kiln knows {sorted(_SHORT)}")
    return name


def is_float(dtype: str) -> bool:
    return dtype in FLOAT_DTYPES


def is_int(dtype: str) -> bool:
    return dtype in INT_DTYPES


class Type:
    """Base of all IR types."""


@dataclass(frozen=True)
class TensorType(Type):
    shape: tuple[Dim, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        shape = tuple(d if isinstance(d, str) else int(d) for d in self.shape)
        for d in shape:
            if isinstance(d, int) and d < 0:
                raise TypeCheckError(f"negative dimension in shape {list(shape)}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "dtype", normalize_dtype(self.dtype))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    @property
    def size(self) -> int:
        """Number of elements; symbolic dims raise, since the answer is not known yet."""
        if not self.is_static:
            raise TypeCheckError(f"{self} has symbolic dims; bind them (--input-shape) to size it")
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * (1 if self.dtype == "bool" else np.dtype(self.dtype).itemsize)

    def __str__(self) -> str:
        return f"{short_dtype(self.dtype)}[{', '.join(str(d) for d in self.shape)}]"

    @staticmethod
    def parse(text: str) -> TensorType:
        """'f32[1, 3, 224, 224]' or 'f32[N, 8]' back into a type (tests and the CLI use this)."""
        head, _, rest = text.strip().partition("[")
        dims = [d.strip() for d in rest.rstrip("]").split(",") if d.strip()]
        return TensorType(tuple(int(d) if d.lstrip("-").isdigit() else d for d in dims), head)


@dataclass(frozen=True)
class TupleType(Type):
    fields: tuple[Type, ...]

    def __str__(self) -> str:
        return "(" + ", ".join(str(f) for f in self.fields) + ")"


def tensor_type_of(value: np.ndarray) -> TensorType:
    return TensorType(tuple(value.shape), normalize_dtype(value.dtype))


def broadcast_shapes(*shapes: tuple[Dim, ...], what: str = "broadcast") -> tuple[Dim, ...]:
    """NumPy broadcasting over possibly symbolic dims: 1 stretches, equal symbols match."""
    ndim = max((len(s) for s in shapes), default=0)
    out: list[Dim] = []
    for axis in range(ndim):
        dims = {s[axis - ndim + len(s)] for s in shapes if axis - ndim + len(s) >= 0}
        dims.discard(1)
        if any(isinstance(d, int) for d in dims):
            # A symbol meeting a fixed size is either that size or 1: the result is the fixed size both ways.
            dims = {d for d in dims if isinstance(d, int)}
        if len(dims) > 1:
            shown = " and ".join(str(list(s)) for s in shapes)
            raise TypeCheckError(f"{what}: shapes {shown} do not broadcast (axis {axis}: {sorted(map(str, dims))})")
        out.append(dims.pop() if dims else 1)
    return tuple(out)
