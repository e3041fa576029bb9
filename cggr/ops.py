"""The single import point for the ops: selection (C++/CUDA), token statistics (Triton/CPU) and the
in-place building blocks of the fused linear cross-entropy (Triton or cuBLAS on CUDA, torch on CPU)."""
from .linear_ops import addmm_f32_, linear_ce_grad_, softcap_  # noqa: F401
from .selection_ops import compact_indices, select_sequence_aware, select_stratified, select_topk  # noqa: F401
from .stats_ops import TokenStats, selective_ce_backward, token_stats  # noqa: F401
