"""Importing this package registers every op. Each module owns a family of ops and their handles."""

from . import (  # noqa: F401
    blocked, conv, dense, elementwise, grid_sample, image, norm, pool, qconv, qdense, reduce, softmax, transform,
    winograd,
)
