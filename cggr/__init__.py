"""CGGR: Confidence-Gated Gradient Routing."""
import importlib

import torch  # noqa: F401  (loads libtorch before the extension module)

from . import _C  # noqa: F401  (registers the C++ ops torch.ops.cggr.*)
from . import ops  # noqa: F401  (fake kernels of the C++ ops; the Triton-backed ops)

__version__ = "0.6.0.dev0"

# Public names, imported on first use so that `import cggr` stays light (transformers only when needed).
_EXPORTS = {
    "CGGRLoss": "loss",
    "CGGRModel": "model",
    "RowPolicy": "policies",
    "RandomRows": "policies",
    "HardestRows": "policies",
    "ExcessLossRows": "policies",
    "ReferenceFilter": "policies",
    "ReferenceRanked": "policies",
    "RouterSettings": "policies",
    "StepOptions": "options",
    "RatioSchedule": "schedule",
    "create_truncated_router": "router",
    "ModelTrunk": "router",
    "ReferenceModel": "reference",
    "domain_threshold": "reference",
    "fused_linear_selective_ce": "linear",
    "token_stats_from_hidden": "linear",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in ("RunningBaseline", "otsu_threshold"):
        from ._legacy import MovedError

        raise MovedError(f"cggr.{name} moved to cggr.experimental.{name} (it lost in every measured regime; "
                             "BENCHMARKS.md)")
    raise AttributeError(f"module 'cggr' has no attribute {name!r}")
