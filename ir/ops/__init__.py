"""Importing this package registers every op. Each module owns a family of ops and their handles."""

from . import blocked, conv, dense, elementwise, image, norm, pool, reduce, softmax, transform, winograd  # noqa: F401
