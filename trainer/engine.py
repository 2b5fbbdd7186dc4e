"""The DeepSpeed engine around the plain T3D model: its config, the LR schedule, the parameter
groups, the process group, and ``init_engine``. Checkpoints (save, load, verify, RNG, the run
folder's layout) are ``trainer.checkpoint``; the consolidated export is ``trainer.export``.

Runner code (imports DeepSpeed); the model itself stays free of it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.config import Config

import os
from typing import Any

import torch


def use_bf16(cfg: Config) -> bool:
    on_gpu = torch.cuda.is_available() and cfg.ray.use_gpu
    return cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and on_gpu)


def deepspeed_config(cfg: Config, universal: bool = False) -> dict[str, Any]:
    """``universal``: the engine will load a universal checkpoint (``to_universal``): a resume
    with another number of workers than the checkpoint was saved with."""
    t, on_gpu = cfg.train, torch.cuda.is_available() and cfg.ray.use_gpu
    zero: dict[str, Any] = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.offload_optimizer and cfg.deepspeed.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.deepspeed.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16(cfg)},
        "optimizer": {"type": "AdamW", "params": adamw_params(cfg, on_gpu)},
        # WSD is not a DeepSpeed scheduler type: init_engine passes it as an object instead
        **({} if t.schedule == "wsd" else {"scheduler": {"type": "WarmupCosineLR", "params": schedule_params(cfg)}}),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        **({"checkpoint": {"load_universal": True}} if universal else {}),
    }


def schedule_params(cfg: Config) -> dict[str, Any]:
    t = cfg.train
    return {"total_num_steps": max(t.steps, t.warmup_steps + 1),  # DeepSpeed needs >= 1 warmup step
            "warmup_num_steps": max(1, t.warmup_steps),
            "warmup_min_ratio": 0.0, "cos_min_ratio": t.min_lr_ratio, "warmup_type": "linear"}


def wsd_scheduler(cfg: Config):
    """``train.schedule=wsd``: a callable optimizer -> warmup-stable-decay scheduler. DeepSpeed's
    ``WarmupCosineLR`` (same warmup, state and checkpointing) held at the peak lr until the last
    ``train.decay_fraction`` of the steps, which decay on a cosine to ``train.min_lr_ratio``
    (Hägele et al. 2024, "Scaling laws and compute-optimal training beyond fixed training durations")."""
    import math

    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    decay = max(1, round(cfg.train.steps * cfg.train.decay_fraction))

    class WarmupStableDecayLR(WarmupCosineLR):
        def get_lr_ratio(self):
            it, start = self.last_batch_iteration, self.total_num_steps - decay
            if it < self.warmup_num_steps:
                return super().get_lr_ratio()
            p = min(1.0, max(0, it - start + 1) / decay)
            return self.cos_min_ratio + (1.0 - self.cos_min_ratio) * (1 + math.cos(math.pi * p)) / 2

    return lambda optimizer: WarmupStableDecayLR(optimizer, **schedule_params(cfg))


def adamw_params(cfg: Config, on_gpu: bool) -> dict[str, Any]:
    """PyTorch's AdamW everywhere (``torch_adam``), its fused CUDA kernel on a GPU: DeepSpeed's own
    FusedAdam would JIT-compile a CUDA op (nvcc + ninja, about a minute) on every fresh worker. With
    the optimizer offloaded to the CPU, DeepSpeed's CPU Adam (its op is built for that case)."""
    t = cfg.train
    offload = cfg.deepspeed.offload_optimizer and cfg.deepspeed.zero_stage > 0
    p: dict[str, Any] = {"lr": t.lr, "weight_decay": t.weight_decay, "betas": [0.9, 0.98], "eps": 1e-6,
                         "torch_adam": not (on_gpu and offload)}
    if on_gpu and not offload:
        p["fused"] = True
    return p


def param_groups(model: torch.nn.Module, cfg: Config) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on 1-d parameters (biases, norms, the temperature), as CLIP
    does; the text tower (``text.*``) at ``train.lr x train.text_lr_mult``."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((name.startswith("text."), p.ndim >= 2), []).append(p)
    t = cfg.train
    return [{"params": ps, "lr": t.lr * (t.text_lr_mult if text else 1.0),
             "weight_decay": t.weight_decay if decay else 0.0}
            for (text, decay), ps in sorted(groups.items())]


# CUDA tensors through NCCL, host tensors (the loop's batch-size agreement) through gloo: a host
# integer never waits on the GPU's queue
BACKEND_GPU = "cpu:gloo,cuda:nccl"


def ensure_process_group() -> None:
    """A one-process group when none exists (single-process runs, tests, ``benchmarks.train_step``):
    NCCL on a GPU, else gloo, so that the same DeepSpeed engine serves them as the Ray Train workers."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)), ("RANK", "0"), ("WORLD_SIZE", "1"),
                 ("LOCAL_RANK", "0")):
        os.environ.setdefault(k, v)
    dist.init_process_group(BACKEND_GPU if torch.cuda.is_available() else "gloo", rank=0, world_size=1)


def skip_cpu_shm_op() -> None:
    """DeepSpeed's CPU accelerator JIT-builds a shared-memory all-reduce op (``deepspeed_shm_comm``)
    in every process that starts its comm backend, whatever the config. Only its inference
    all-reduce (tensor-parallel inference) uses it; ZeRO's collectives go through torch.distributed's
    gloo group. The build is a minute of both cores on the 2-core machine in every fresh environment
    (a new venv, a launcher node, CI), and a ninja check and a load in every process after. Marking
    it incompatible in the op table DeepSpeed keeps for that purpose (``deepspeed.ops``; "edits to
    it persist") leaves the comm backend to gloo, as without the op."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_engine(model: torch.nn.Module, cfg: Config, universal: bool = False):
    """Wraps ``model``; reuses the torch.distributed group that Ray Train created (or a one-process
    group outside Ray). ``universal``: see ``deepspeed_config``."""
    import deepspeed

    ensure_process_group()
    if torch.cuda.is_available():
        # fixed input shapes (the canonical grid, the view size): cuDNN picks its fastest 3D convolutions once
        torch.backends.cudnn.benchmark = True
    else:
        skip_cpu_shm_op()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")   # joins the group above
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, cfg),
                                           config=deepspeed_config(cfg, universal),
                                           lr_scheduler=wsd_scheduler(cfg) if cfg.train.schedule == "wsd" else None)
    return engine


os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
