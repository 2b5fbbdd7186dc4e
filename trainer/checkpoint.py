"""A run's checkpoints: the run folder's layout, save, load, verify and the RNG state.

Layout (the one place it is spelled; everything else calls the functions below)::

    {run_dir}/step_{step:07d}/          one checkpoint (``step_name``), as Ray Train reports it
        ds/                            DeepSpeed's ZeRO partitions (tag ``TAG``)
        rng_rank{r}.pt, buffers_rank{r}.pt, checksums_rank{r}.json, state.json
        export/                        the consolidated export (``trainer.export``):
            model.safetensors, export.json, config.yaml, tokenizer/

``list_checkpoints(run_dir, exported=...)`` says which exist; paths may be local or URIs
(``common.storage``).
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import storage

TAG = "ds"
STEP_PREFIX = "step_"
EXPORT_DIR, WEIGHTS, EXPORT_INFO = "export", "model.safetensors", "export.json"


def step_name(step: int) -> str:
    """The folder (and MLflow artifact) name of the checkpoint at ``step``."""
    return f"{STEP_PREFIX}{int(step):07d}"


def step_of(ckpt: str | Path) -> int:
    """The training step of a checkpoint folder (its name)."""
    return int(storage.name(str(ckpt)).removeprefix(STEP_PREFIX))


def export_of(ckpt: str | Path) -> str:
    """The export folder of a checkpoint (local path or URI, as given)."""
    return storage.join(str(ckpt), EXPORT_DIR)


def is_exported(ckpt: str | Path) -> bool:
    """The checkpoint's export is complete: its weights and its ``export.json``."""
    return storage.isfile(storage.join(export_of(ckpt), WEIGHTS)) and storage.isfile(
        storage.join(export_of(ckpt), EXPORT_INFO))


def list_checkpoints(run_dir: str | Path, exported: bool = False) -> list[str]:
    """The run's checkpoint folders, oldest first; ``exported``: only those whose export is complete."""
    found = sorted(p for p in storage.glob(str(run_dir), STEP_PREFIX + "*") if storage.isdir(p))
    return [p for p in found if not exported or is_exported(p)]


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
