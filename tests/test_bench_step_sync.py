"""Every `cggr bench` configuration's training step is issued without a host synchronisation.

`cggr.bench.train.training_step` promises this, and `--clock span` relies on it: a step that waits for
the GPU makes the host idle while the GPU drains, so the span clock cannot overlap the host's work with
the GPU's. On a GPU the steps after a warm-up run under `torch.cuda.set_sync_debug_mode("error")`, which
raises at any synchronising call (`.item()`, `nonzero`, a device-to-host copy). On the CPU the same steps
run without that check: it keeps the construction below honest (every configuration builds and trains).
"""
import os

import numpy as np
import pytest
import torch

from cggr.bench import data as D
from cggr.bench.configs import CONFIGS, StepContext, get_config
from cggr.bench.models import build_preset
from cggr.bench.train import OptimConfig, _batch, make_optimizer, training_step

SEQ, ROWS, BATCH, SOURCES = 17, 64, 8, ["target", "other"]

CUDA_OK = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not CUDA_OK, reason="needs a CUDA GPU (and compiled, not interpreted, Triton)"))]


def _context(device, rng):
    token_nll = torch.from_numpy(rng.uniform(0.5, 6.0, size=(ROWS, SEQ - 1)).astype(np.float32)).to(device)
    row_nll = token_nll.mean(dim=1).cpu().numpy()
    threshold = float(np.quantile(row_nll, 0.3))
    return StepContext(seed=0, router_layers=1, target_source_id=0, reference_token_nll=token_nll,
                       reference_row_nll=row_nll,
                       reference_thresholds={"heldout": threshold, "heldout99": threshold + 0.1, "otsu": threshold},
                       num_sources=len(SOURCES), num_train_rows=ROWS)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_a_training_step_is_issued_without_a_host_sync(config, device):
    rng = np.random.default_rng(0)
    device = torch.device(device)
    rows = D.RowSet(rng.integers(0, 256, size=(ROWS, SEQ)).astype(np.int64),
                    (np.arange(ROWS) % 4 == 0).astype(np.int64) ^ 1, SOURCES)  # a quarter is the target
    model = build_preset("tiny", 256, SEQ, 0, 0).to(device)
    step_obj = get_config(config).build(model, 0.25, _context(device, rng))
    optim = OptimConfig()
    optimizer = make_optimizer(step_obj.module, optim, device)
    autocast = lambda: torch.autocast(device.type, enabled=False)  # noqa: E731
    batches = [rng.choice(ROWS, size=BATCH, replace=False) for _ in range(6)]
    losses = []
    for idx in batches[:3]:  # warm-up: lazy initialisation (context, handles, kernel compilation) may sync
        losses.append(training_step(step_obj, _batch(rows, idx, device), optimizer, autocast, optim.grad_clip))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        for idx in batches[3:]:
            losses.append(training_step(step_obj, _batch(rows, idx, device), optimizer, autocast,
                                        optim.grad_clip))
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    values = torch.stack(losses).float().cpu()
    assert torch.isfinite(values).all(), values
    assert values.std() > 0  # the steps trained on different rows
