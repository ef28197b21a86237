"""Importing this package registers every op. Each module owns a family of ops and their handles."""

from . import conv, dense, elementwise, image, norm, pool, reduce, softmax, transform  # noqa: F401
