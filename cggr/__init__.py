"""CGGR: Confidence-Gated Gradient Routing."""
import torch  # noqa: F401  (loads libtorch before the extension module)

from . import _C  # noqa: F401  (registers torch.ops.cggr.*)

__version__ = "0.6.0.dev0"
