"""The single import point for the ops: selection (C++/CUDA) and token statistics (Triton/CPU)."""
from .selection_ops import compact_indices, select_sequence_aware, select_stratified, select_topk  # noqa: F401
from .stats_ops import TokenStats, selective_ce_backward, token_stats  # noqa: F401
