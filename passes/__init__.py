"""Graph passes of vwn_transform: capture (probe), block tracing, residual matching and GHC rewriting."""

from .block_graph import BlockRunner, CallSpec, ResidualUpdate, find_residual_updates, rewrite_block_graph, trace_block
from .probe import ModelStructure, default_example_inputs, is_norm_module, probe_model

__all__ = [
    "BlockRunner",
    "CallSpec",
    "ModelStructure",
    "ResidualUpdate",
    "default_example_inputs",
    "find_residual_updates",
    "is_norm_module",
    "probe_model",
    "rewrite_block_graph",
    "trace_block",
]
