"""``CGGRSFTTrainer``: TRL's ``SFTTrainer`` with CGGR row selection (imported only when TRL is installed)."""
import importlib

from .trainer import CGGRTrainerMixin

try:
    _trl = importlib.import_module("trl")  # optional: only this module needs it
except ImportError as error:
    raise ImportError("cggr.hf.CGGRSFTTrainer subclasses TRL's SFTTrainer, and TRL is not installed: "
                      "pip install trl") from error


class CGGRSFTTrainer(CGGRTrainerMixin, _trl.SFTTrainer):
    """``trl.SFTTrainer`` that trains each step on the rows a ``cggr`` row policy picks.

    ``CGGRSFTTrainer(model=..., args=trl.SFTConfig(...), train_dataset=..., cggr_config=CGGRConfig(...))``;
    every other argument is TRL's (``peft_config`` included: the adapters are in place before the CGGR
    wrapper is built). TRL's dataset preparation, collator (``padding_free`` too: each packed sequence is a
    row), loss and metrics are unchanged; they see the selected rows only. See docs/hf.md.
    """
