"""Loading and running compiled artifacts. Imports neither the compiler nor anything of Kiln's but errors."""

from .model import Model, aligned_empty, load, set_num_threads

__all__ = ["Model", "aligned_empty", "load", "set_num_threads"]
