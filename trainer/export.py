"""The consolidated export of a checkpoint: fp32 safetensors, the config and the tokenizer, what the
evaluators and users load (``load_export``). Where it sits: ``trainer.checkpoint``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from common import storage
from common.config import save_config
from trainer.checkpoint import EXPORT_DIR, EXPORT_INFO, WEIGHTS

if TYPE_CHECKING:
    from common.config import Config


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
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / WEIGHTS))
    save_config(cfg, out_dir / "config.yaml")
    (out_dir / EXPORT_INFO).write_text(json.dumps(extra, indent=1))
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
        path = storage.join(path, EXPORT_DIR) if storage.isfile(storage.join(path, EXPORT_DIR, WEIGHTS)) else path
        if not storage.isfile(storage.join(path, WEIGHTS)):
            raise FileNotFoundError(f"{path}: no {WEIGHTS} (expected a checkpoint folder with export/)")
        path = storage.local_dir(path)
    p = Path(path)
    if (p / EXPORT_DIR / WEIGHTS).is_file():
        p = p / EXPORT_DIR
    if not (p / WEIGHTS).is_file():
        raise FileNotFoundError(f"{path}: no {WEIGHTS} (expected a checkpoint folder with export/)")
    cfg = load_config(p / "config.yaml")
    tok = load_tokenizer(p / "tokenizer")
    model = build_model(cfg, len(tok))
    missing, unexpected = model.load_state_dict(load_file(str(p / WEIGHTS)), strict=False)
    if missing or unexpected:
        raise ValueError(f"{p / WEIGHTS}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    info = json.loads((p / EXPORT_INFO).read_text()) if (p / EXPORT_INFO).is_file() else {}
    return model.eval(), tok, cfg, info
