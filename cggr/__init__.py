"""CGGR: Confidence-Gated Gradient Routing."""
import importlib

import torch  # noqa: F401  (loads libtorch before the extension module)

# Where a compiled module that does not load comes from: built against another torch (after an upgrade, the
# C++ symbols it links to are gone or changed), or not built at all.
_ABI_MISMATCH_MARKS = ("undefined symbol", "symbol not found", "version mismatch", "was compiled against",
                       "compiled using", "specified procedure could not be found", "glibcxx_")
REBUILD_COMMAND = "bash scripts/setup.sh (or: pip install --no-build-isolation -e .) in the cggr source folder"


def _extension_import_error(error: BaseException, installed_torch: str = torch.__version__):
    """The ImportError to raise instead of ``error`` (from importing ``cggr._C``), or None to re-raise it:
    names the torch installed, the one ``cggr._C`` was built with (cggr/_build_info.py, written by the
    build) and the command that rebuilds it."""
    text = str(error)
    if isinstance(error, ModuleNotFoundError) and getattr(error, "name", None) == f"{__name__}._C":
        return ImportError(f"cggr's compiled ops (cggr._C) are not built for this source folder; build them "
                           f"against the torch installed ({installed_torch}): {REBUILD_COMMAND}")
    if not any(mark in text.lower() for mark in _ABI_MISMATCH_MARKS):
        return None
    try:
        from ._build_info import TORCH_VERSION as built_with
    except ImportError:
        built_with = None
    built = f"torch {built_with}" if built_with else "another torch (its version was not recorded)"
    return ImportError(f"cggr's compiled ops (cggr._C) were built against {built} and do not load with the "
                       f"torch installed now ({installed_torch}); rebuild them: {REBUILD_COMMAND}. "
                       f"The loader said: {text}")


try:
    from . import _C  # noqa: F401  (registers the C++ ops torch.ops.cggr.*)
except (ImportError, OSError) as _error:
    _replacement = _extension_import_error(_error)
    if _replacement is None:
        raise
    raise _replacement from None  # the message quotes the loader; its traceback would only hide it
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
    "DataParallel": "distributed",
    "ConfidenceGate": "pruning",
    "ConfidenceGatedSampler": "pruning",
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
