"""What a ``cggr bench`` invocation runs with: ``Settings`` (one field per setting, declared once) and the
names of every choice a flag offers. Standard library only, so that ``cggr --help`` needs nothing but the
package; ``cggr.bench.cli`` builds its flags' defaults from ``Settings`` and a test checks that every flag
and every field match."""
import dataclasses
import hashlib
import json
import os
from typing import List, Optional

REGIMES = ("pretrain", "finetune", "target")
CLOCKS = ("step", "span")
COMPILE_MODES = ("blocks", "blocks-cudagraphs")
FORWARD_IMPLS = ("model", "trunk")  # cggr.options.FORWARD_IMPLS, for every training of the bench
DATA_PARALLEL = ("per_rank", "global")  # cggr.distributed.SELECTIONS, under torchrun
PRESET_NAMES = ("tiny", "small", "medium", "smollm-135m")  # cggr.bench.models.PRESETS (a test checks)
EMBEDDED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
# bf16: autocast over float32 weights (float32 master weights and optimizer state).
# bf16-weights: the model and the optimizer state in bfloat16, no autocast: fewer kernels per step (no
# weight casts, no float32 gradient accumulation), which matters when small selective steps are bound by
# the host's kernel launches; the step benchmark (benchmarks/bench_model_step.py) times this setting.
DTYPES = ("bf16", "bf16-weights", "fp32")


@dataclasses.dataclass
class Settings:
    regime: str = "pretrain"
    configs: List[str] = dataclasses.field(default_factory=list)
    ratios: List[float] = dataclasses.field(default_factory=lambda: [0.25, 0.5])
    seeds: List[int] = dataclasses.field(default_factory=lambda: [0])
    budget_kind: str = "time"
    budget: float = 20.0
    eval_every: float = 2.0
    init_budget: Optional[float] = None        # finetune stage 1 (default: the per-configuration budget)
    reference_budget: Optional[float] = None   # target regime reference model (default: the budget)
    model_preset: str = "tiny"
    model_path: Optional[str] = None
    init_checkpoint: Optional[str] = None
    seq_len: int = 128
    batch_size: int = 16
    eval_batch_size: int = 16
    eval_rows: int = 32
    lr: float = 3e-3
    warmup_frac: float = 0.05
    device: str = "cpu"
    dtype: str = "fp32"
    router_layers: int = 4
    selection_warmup_steps: int = 0
    finetune_source: str = "python_doc"
    target_source: str = "python_doc"
    reference_preset: str = "tiny"
    reference_frac: float = 0.5
    reference_holdout_frac: float = 0.1  # of the clean slice's documents: never trained on, calibrates the domain threshold
    untimed_warmup_steps: int = 2
    compile: Optional[str] = None  # a mode of models.COMPILE_MODES: every training of the bench (runs, stage 1, reference)
    clock: str = "step"  # train.CLOCKS: a synchronisation around every step, or only at evaluations ("span")
    forward_impl: str = "model"  # cggr.model.FORWARD_IMPLS: how every training of the bench runs the model
    world_size: int = 1  # processes of a torchrun launch (cggr.bench.parallel): batch_size rows split across them
    data_parallel: str = "per_rank"  # selection with world_size > 1: per rank, or over the global batch
    out: str = "bench_out"
    cache_dir: str = os.path.join(os.path.expanduser("~"), ".cache", "cggr", "bench")  # tokens, stage-1 checkpoints, reference NLL: large, kept out of OUT

    def key_fields(self, corpus_path: str) -> dict:
        """What makes two runs of one configuration comparable (not the lists of configs, ratios, seeds)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("configs", "ratios", "seeds", "out", "cache_dir")}
        if self.regime != "finetune":
            for k in ("init_budget", "init_checkpoint", "finetune_source"):
                fields.pop(k)
        if self.regime != "target":
            for k in ("reference_budget", "reference_preset", "reference_frac", "reference_holdout_frac",
                      "target_source"):
                fields.pop(k)
        if not self.compile:
            fields.pop("compile")  # absent when off, so settings hashes from before the option still match
        if self.clock == "step":
            fields.pop("clock")  # likewise for the default clock
        if self.forward_impl == "model":
            fields.pop("forward_impl")  # and the model's own forward
        if self.world_size == 1:
            fields.pop("world_size")  # and one process
            fields.pop("data_parallel")
        fields["corpus"] = os.path.basename(corpus_path)  # the token file name carries the content hash
        return fields


def settings_hash(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
