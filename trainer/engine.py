"""DeepSpeed engine around the plain T3D model: config, init, save/load, consolidated export.

Runner code (imports DeepSpeed); the model itself stays free of it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.config import Config

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import storage
from common.config import save_config

TAG = "ds"
EXPORT = "model.safetensors"


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


def init_engine(model: torch.nn.Module, cfg: Config, universal: bool = False):
    """Wraps ``model``; reuses the torch.distributed group that Ray Train created (or a one-process
    group outside Ray). ``universal``: see ``deepspeed_config``."""
    import deepspeed

    ensure_process_group()
    if torch.cuda.is_available():
        # fixed input shapes (the canonical grid, the view size): cuDNN picks its fastest 3D convolutions once
        torch.backends.cudnn.benchmark = True
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")   # joins the group above
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, cfg),
                                           config=deepspeed_config(cfg, universal),
                                           lr_scheduler=wsd_scheduler(cfg) if cfg.train.schedule == "wsd" else None)
    return engine


def to_universal(ckpt_dir: str | Path, out_dir: str | Path) -> Path:
    """DeepSpeed's ``ds_to_universal`` (in process, one worker) on ``ckpt_dir/TAG``: a checkpoint
    that any number of ranks can load. Returns the folder to hand ``load(..., universal=...)``."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = Path(out_dir) / f"{TAG}_universal"
    ds_to_universal(argparse.Namespace(
        input_folder=str(Path(ckpt_dir) / TAG), output_folder=str(out), num_extract_workers=1,
        num_merge_workers=1, keep_temp_folder=False, strict=True,
        inject_missing_state=True))   # ZeRO-1/2 of a plain nn.Module saves no universal_checkpoint_info
    return out


def _fix_zero3_universal_groups(engine, saved_groups: list[dict[str, Any]]) -> None:
    """Two DeepSpeed 0.19 ZeRO-3 universal-load bugs (found by comparing against an uninterrupted
    run): every param group gets group 0's hyper-parameters (our groups differ in weight decay and
    lr), and one ``step`` tensor object is shared by all flat groups, so AdamW advances it once per
    group. Restore the groups' own values (lr from the resumed scheduler) and unshare the steps."""
    from deepspeed.runtime.lr_schedules import update_lr

    for g, saved in zip(engine.optimizer.param_groups, saved_groups):
        g.update({k: v for k, v in saved.items() if k not in ("params", "lr")})
    if engine.lr_scheduler is not None:
        update_lr(engine.optimizer.param_groups, engine.lr_scheduler.get_lr())
    base = engine.optimizer.optimizer
    for p in getattr(engine.optimizer, "fp32_partitioned_groups_flat", []):
        st = base.state.get(p)
        if st is not None and torch.is_tensor(st.get("step")):
            st["step"] = st["step"].clone()


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain values (loadable with ``weights_only=True``)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"python": [version, torch.tensor(mt, dtype=torch.int64), gauss],
          "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    version, mt, gauss = st["python"]
    random.setstate((version, tuple(int(v) for v in mt.tolist()), gauss))
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save(engine, ckpt_dir: str | Path, rank: int, state: dict[str, Any]) -> None:
    """Every rank: DeepSpeed state (its ZeRO partitions) + its RNG; rank 0: the loop state."""
    ckpt_dir = Path(ckpt_dir)
    engine.save_checkpoint(str(ckpt_dir), tag=TAG)
    torch.save(rng_state(), ckpt_dir / f"rng_rank{rank}.pt")
    # per-rank buffers (BatchNorm running stats): DeepSpeed neither syncs them nor saves them per rank
    torch.save({k: b.detach().cpu().clone() for k, b in engine.module.named_buffers()},
               ckpt_dir / f"buffers_rank{rank}.pt")
    if rank == 0:
        (ckpt_dir / "state.json").write_text(json.dumps(state, indent=1))


def write_checksums(ckpt_dir: str | Path, rank: int) -> None:
    """Size and sha256 of every file this rank wrote into its checkpoint folder (each rank has its
    own folder until Ray merges them), in ``checksums_rank{rank}.json``, written last."""
    d = Path(ckpt_dir)
    files = {str(p.relative_to(d)): {"bytes": p.stat().st_size, "sha256": storage.sha256(p)}
             for p in sorted(d.rglob("*")) if p.is_file() and not p.name.startswith("checksums_rank")}
    tmp = d / f".checksums_rank{rank}.tmp"
    tmp.write_text(json.dumps(files, indent=0))
    tmp.replace(d / f"checksums_rank{rank}.json")


def verify_checkpoint(ckpt_dir: str | Path) -> str | None:
    """None when every rank's files are there with their recorded size and sha256; else the reason.
    ``ckpt_dir``: a local folder or a URI (read in place)."""
    d = str(ckpt_dir)
    name, state = storage.name(d), storage.join(d, "state.json")
    if not storage.isfile(state):
        return f"{name}: no state.json"
    try:
        world = json.loads(storage.read_text(state)).get("world")
    except json.JSONDecodeError as e:
        return f"{name}: state.json is not JSON ({e})"
    sums = storage.glob(d, "checksums_rank*.json")
    if not sums or (world is not None and len(sums) != world):
        return f"{name}: checksums of {len(sums)} rank(s), expected {world}"
    for f in sums:
        try:
            listed = json.loads(storage.read_text(f))
        except json.JSONDecodeError as e:
            return f"{name}/{storage.name(f)} is not JSON ({e})"
        for rel, want in listed.items():
            p = storage.join(d, rel)
            if not storage.isfile(p):
                return f"{name}/{rel} is missing"
            if storage.size(p) != want["bytes"]:
                return f"{name}/{rel} has {storage.size(p)} bytes, {want['bytes']} were written"
            if storage.sha256(p) != want["sha256"]:
                return f"{name}/{rel}: sha256 differs from the one written"
    return None


def load(engine, ckpt_dir: str | Path, rank: int, universal: Path | None = None) -> dict[str, Any]:
    """Loads ``ckpt_dir`` into ``engine`` (built with ``universal=True`` when ``universal``, the
    ``to_universal`` folder of a checkpoint saved by another number of ranks). Ranks the
    checkpoint did not have take rank 0's buffers and a fresh RNG seeded by rank and step."""
    ckpt_dir = Path(ckpt_dir)
    state = json.loads((ckpt_dir / "state.json").read_text())
    groups = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    load_dir, tag = (universal.parent, universal.name) if universal is not None else (ckpt_dir, TAG)
    path, _ = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"{load_dir}: no DeepSpeed checkpoint with tag {tag!r}")
    if universal is not None and engine.zero_optimization_stage() == 3:
        _fix_zero3_universal_groups(engine, groups)
    buf = ckpt_dir / f"buffers_rank{rank}.pt"
    if not buf.is_file():
        buf = ckpt_dir / "buffers_rank0.pt"
    if buf.is_file():
        saved = torch.load(buf, weights_only=True)
        with torch.no_grad():
            for k, b in engine.module.named_buffers():
                if k in saved:
                    b.copy_(saved[k].to(b.device))
    rng = ckpt_dir / f"rng_rank{rank}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=True))
    else:
        seed = 7919 * (rank + 1) + int(state.get("step", 0))
        random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    return state


def full_fp32_state_dict(engine) -> dict[str, torch.Tensor]:
    """Collective (all ranks call it): fp32 weights gathered from any ZeRO stage."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p) if engine.zero_optimization() else None
        out[name] = (full if full is not None else p.data).detach().float().cpu().clone()
    persistent = set(engine.module.state_dict().keys())   # skips HF's non-persistent buffers
    for name, b in engine.module.named_buffers():
        if name in persistent:
            out[name] = b.detach().cpu().clone()
    return out


def export(engine, out_dir: str | Path, cfg: Config, rank: int, extra: dict[str, Any]) -> None:
    """Consolidated fp32 safetensors + config + tokenizer: what evaluators and users load."""
    state = full_fp32_state_dict(engine)
    if rank != 0:
        return
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / EXPORT))
    save_config(cfg, out_dir / "config.yaml")
    (out_dir / "export.json").write_text(json.dumps(extra, indent=1))
    tok = extra.get("tokenizer_dir")
    if tok and storage.isdir(tok):
        import shutil

        shutil.copytree(storage.local_dir(tok), out_dir / "tokenizer", dirs_exist_ok=True)


def load_export(path: str | Path):
    """(model, tokenizer, cfg, info) from an export folder (a checkpoint dir or its export/)."""
    from safetensors.torch import load_file

    from common.config import load_config
    from common.text import load_tokenizer
    from trainer.model import build_model

    if storage.is_remote(path):                     # a copy in the local cache, made once per URI
        path = storage.normalize(path)
        path = storage.join(path, "export") if storage.isfile(storage.join(path, "export", EXPORT)) else path
        if not storage.isfile(storage.join(path, EXPORT)):
            raise FileNotFoundError(f"{path}: no {EXPORT} (expected a checkpoint folder with export/)")
        path = storage.local_dir(path)
    p = Path(path)
    if (p / "export" / EXPORT).is_file():
        p = p / "export"
    if not (p / EXPORT).is_file():
        raise FileNotFoundError(f"{path}: no {EXPORT} (expected a checkpoint folder with export/)")
    cfg = load_config(p / "config.yaml")
    tok = load_tokenizer(p / "tokenizer")
    model = build_model(cfg, len(tok))
    missing, unexpected = model.load_state_dict(load_file(str(p / EXPORT)), strict=False)
    if missing or unexpected:
        raise ValueError(f"{p / EXPORT}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    info = json.loads((p / "export.json").read_text()) if (p / "export.json").is_file() else {}
    return model.eval(), tok, cfg, info


os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
