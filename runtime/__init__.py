"""Loading and running compiled artifacts. Imports neither the compiler nor anything of Kiln's but errors."""

from .model import Model, load, set_num_threads

__all__ = ["Model", "load", "set_num_threads"]
