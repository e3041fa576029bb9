"""Hugging Face integration: ``CGGRTrainer`` (``transformers.Trainer``), ``CGGRSFTTrainer`` (TRL's
``SFTTrainer``, when ``trl`` is installed), ``CGGRConfig`` and ``CGGRCallback``. Usage and caveats: docs/hf.md.

``CGGRSFTTrainer`` is imported on first use, so that ``cggr.hf`` works without TRL.
"""
import importlib

from .config import CGGRConfig
from .reference_column import add_reference_nll
from .trainer import CGGRCallback, CGGRTrainer, CGGRTrainerMixin

__all__ = ["CGGRCallback", "CGGRConfig", "CGGRSFTTrainer", "CGGRTrainer", "CGGRTrainerMixin", "add_reference_nll"]


def __getattr__(name):
    if name == "CGGRSFTTrainer":
        value = importlib.import_module(".sft", __name__).CGGRSFTTrainer
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cggr.hf' has no attribute {name!r}")
