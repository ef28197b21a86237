"""Importing this package registers every op. Each module owns a family of ops and their handles."""

from . import elementwise  # noqa: F401
