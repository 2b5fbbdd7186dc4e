"""trainer.engine on the CPU: DeepSpeed's comm backend without its JIT-built shared-memory op."""
from __future__ import annotations

import pytest
import torch

from common.config import load_config
from tests.conftest import REPO


def test_cpu_engine_builds_no_shm_op():
    if torch.cuda.is_available():
        pytest.skip("the shared-memory op is DeepSpeed's CPU accelerator's")
    import deepspeed.comm.comm as ds_comm
    import deepspeed.ops

    from trainer.engine import init_engine

    engine = init_engine(torch.nn.Linear(4, 4), load_config(REPO / "configs/debug.yaml", []))
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False
    assert ds_comm.cdb is not None and ds_comm.cdb.shm_comm_op is None      # ZeRO's collectives: gloo
    loss = engine(torch.ones(2, 4)).sum()
    engine.backward(loss)
    engine.step()
