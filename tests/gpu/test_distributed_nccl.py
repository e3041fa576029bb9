"""NCCL smoke test on the GPU machine: the data-parallel scenarios of tests/distributed_worker.py on CUDA
(one GPU per process; world size 1 on a one-GPU machine, 2 when two GPUs are visible).

    pytest tests/gpu/test_distributed_nccl.py -q

World size 1 runs every collective (NCCL all-gather, all-reduce, the configuration check) on the device:
the loss normalisation, global selection's row exchange and FSDP2's root gathering, against one process
without data parallelism.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_distributed import launch  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SCENARIOS = ["ddp_per_rank", "ddp_no_targets", "fsdp_per_rank", "ddp_global_hardest", "ddp_global_random",
             "fsdp_global_hardest", "loss_module", "ddp_fused", "fsdp_fused", "ddp_accumulation", "fsdp_accumulation",
             "fsdp_inner_root"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    world = min(2, torch.cuda.device_count())
    os.environ["CGGR_TEST_BACKEND"] = "nccl"
    try:
        return launch(world, SCENARIOS, tmp_path_factory.mktemp("nccl"))
    finally:
        del os.environ["CGGR_TEST_BACKEND"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario_on_nccl(results, scenario):
    for rank, r in enumerate(res[scenario] for res in results):
        assert r["ok"], f"rank {rank}: {r.get('traceback', r)}"
        assert r["worst_rel_err"] < 1e-4
        if "union" in r:
            assert r["union"] == r["expected"]
