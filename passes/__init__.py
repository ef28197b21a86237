"""Graph passes, each a pure function IRModule → IRModule, and the pipelines that order them."""

from .alter_layout import alter_layout, count_layout_transforms
from .eliminate_common_subexpr import eliminate_common_subexpr
from .eliminate_dead_code import eliminate_dead_code
from .fold_batch_norm import fold_batch_norm
from .fold_constants import fold_constants
from .pack_dense_weights import pack_dense_weights
from .mixed_precision import PRECISIONS, convert_precision, to_precision
from .fuse_ops import fuse_ops, fused_groups, fusion_summary, group_ops
from .pipeline import LEVELS, O0, O1, O2, O3, optimize, run
from .plan_memory import MemoryPlan, plan_memory
from .simplify_inference import simplify_inference

__all__ = ["alter_layout", "count_layout_transforms", "eliminate_common_subexpr", "eliminate_dead_code", "fold_batch_norm", "fold_constants", "pack_dense_weights", "fuse_ops", "fused_groups",
           "fusion_summary", "group_ops", "LEVELS", "O0", "O1", "O2", "O3", "optimize", "run", "MemoryPlan",
           "plan_memory", "simplify_inference", "PRECISIONS", "convert_precision", "to_precision"]
