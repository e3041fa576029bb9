"""Triton kernels and their launchers (installed as ``cggr.triton_kernels``).

The launchers take plain tensors and do only the checks needed for memory safety; argument
validation, op registration and the CPU implementations live in ``cggr.stats_ops`` and
``cggr.linear_ops``.
"""
from .linear_ce import launch_linear_ce_grad_, launch_softcap_
from .selective_ce_backward import launch_selective_ce_backward, selective_ce_backward_config
from .token_stats import launch_token_stats, token_stats_config

__all__ = [
    "launch_token_stats",
    "token_stats_config",
    "launch_selective_ce_backward",
    "selective_ce_backward_config",
    "launch_softcap_",
    "launch_linear_ce_grad_",
]
