"""Per-worker training loop run by Ray Train: batches -> T3D -> losses -> DeepSpeed step.

Checkpoint every ``train.checkpoint_every`` optimizer steps: every rank saves its DeepSpeed
partitions and RNG into a local folder, rank 0 adds the loop state (step, data position, MLflow
run id) and the consolidated fp32 export, and every rank reports it to Ray Train under the name
``step_{step:07d}`` (Ray merges the ranks' folders). A restarted attempt loads the latest one.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_service.stream import Plan, build_index, rank_stream
from trainer import engine as eng
from trainer.config import config_from_dict
from trainer.losses import T3DLoss
from trainer.model import build_model
from trainer.model.text import load_tokenizer


class Tracker:
    """Rank-0 MLflow logging over HTTP; a no-op without a tracking URI."""

    def __init__(self, uri: str | None, run_id: str | None):
        self.client = None
        if uri and run_id:
            from mlflow.tracking import MlflowClient

            self.client, self.run_id = MlflowClient(uri), run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()
                                                    if np.isfinite(v)])


def _all_min(x: int) -> int:
    t = torch.tensor([x])
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def train_loop(loop_cfg: dict[str, Any]) -> None:
    import ray.train

    cfg = config_from_dict(loop_cfg["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    np.random.seed(cfg.train.seed + rank)
    tok_dir = loop_cfg["tokenizer_dir"]
    tokenizer = load_tokenizer(tok_dir)
    torch.manual_seed(cfg.train.seed)                      # identical init on every rank
    model = build_model(cfg, len(tokenizer))
    engine = eng.init_engine(model, cfg)
    torch.manual_seed(cfg.train.seed + 1000 * (rank + 1))  # then per rank: dropout differs across ranks
    device = engine.device
    state = {"step": 0, "micro": 0, "samples": 0, "corrupt": 0, "dropped": 0}
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state.update(eng.load(engine, d, rank))
        if rank == 0:
            print(f"[t3d] resumed from {ckpt.path} at step {state['step']} (micro {state['micro']})", flush=True)
    index = build_index(cfg.data.shards, "train")
    plan = Plan(sorted(index), world, cfg.train.batch_size, cfg.train.seed)
    total_micro = cfg.train.steps * cfg.train.grad_accum
    tracker = Tracker(loop_cfg.get("mlflow_uri"), loop_cfg.get("mlflow_run_id")) if rank == 0 else Tracker(None, None)
    if rank == 0 and state["step"] == 0:
        tracker.log({"data/unused_per_epoch": plan.unused_per_epoch,
                     "data/steps_per_epoch": plan.steps_per_epoch / cfg.train.grad_accum}, 0)
    loss_fn = T3DLoss(cfg.tma)
    sample_log = Path(loop_cfg["run_dir"]) / f"samples_rank{rank}.jsonl" if loop_cfg.get("log_samples") else None
    dtype = torch.bfloat16 if eng.use_bf16(cfg) else torch.float32
    t_last, n_last, logs = time.time(), 0, {}
    stream = rank_stream(index, plan, rank, state["micro"], total_micro - state["micro"], cfg.data, tok_dir)
    for batch in stream:
        micro = int(batch["micro"][0])
        ok = batch["ok"].astype(bool)
        for k, err in zip(batch["key"][~ok], batch["error"][~ok]):
            print(f"[t3d] rank {rank}: corrupt sample {k} skipped: {err}", flush=True)
        n_ok = _all_min(int(ok.sum()))                     # equal batch sizes for the gathers
        keep = np.flatnonzero(ok)[:n_ok]
        state["corrupt"] += int((~ok).sum())
        state["dropped"] += int(ok.sum()) - n_ok
        if n_ok == 0:
            state["micro"] = micro + 1
            continue
        to = lambda a, dt=None: torch.from_numpy(np.ascontiguousarray(a[keep])).to(device, dt)  # noqa: E731
        out = engine(to(batch["image"], dtype), to(batch["input_ids"]), to(batch["attention_mask"]),
                     to(batch["views"], dtype) if cfg.tma.enabled and cfg.data.views.n > 0 else None)
        loss, logs = loss_fn(out)
        engine.backward(loss)
        engine.step()
        state["micro"] = micro + 1
        state["samples"] += n_ok * world
        if sample_log is not None:
            with open(sample_log, "a") as f:
                f.write(json.dumps({"micro": micro, "keys": [str(k) for k in batch["key"][keep]]}) + "\n")
        if state["micro"] % cfg.train.grad_accum:
            continue
        state["step"] = step = state["micro"] // cfg.train.grad_accum
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            dt = time.time() - t_last
            n = state["samples"] - n_last
            metrics = {f"loss/{k}": v for k, v in logs.items()}
            metrics.update({"lr": engine.get_lr()[0], "samples_per_s": n / max(dt, 1e-9),
                            "views_per_s": n * cfg.data.views.n / max(dt, 1e-9),
                            "data/corrupt_skipped": state["corrupt"], "data/dropped_uneven": state["dropped"]})
            if torch.cuda.is_available():
                metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            tracker.log(metrics, step)
            state["samples_per_s"] = round(metrics["samples_per_s"], 3)
            if rank == 0:
                print(f"[t3d] step {step}/{cfg.train.steps} loss {logs['loss']:.4f} "
                      f"{json.dumps({k: round(v, 4) for k, v in logs.items()})} {metrics['samples_per_s']:.1f} samples/s",
                      flush=True)
            t_last, n_last = time.time(), state["samples"]
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
            _checkpoint(engine, cfg, rank, state, logs, loop_cfg)
        if step == cfg.train.fail_at_step and rank == world - 1:
            marker = Path(loop_cfg["run_dir"]) / f"failed_at_{step}"
            if not marker.exists():
                marker.write_text("injected failure")
                time.sleep(5)          # let Ray register the checkpoint first (docs/design.md)
                print(f"[t3d] rank {rank}: injected failure at step {step}", flush=True)
                os._exit(1)
        if step >= cfg.train.steps:
            break


def _checkpoint(engine, cfg, rank, state, logs, loop_cfg) -> None:
    import ray.train
    from ray.train import Checkpoint

    step = state["step"]
    with tempfile.TemporaryDirectory() as d:
        full = {**state, "mlflow_run_id": loop_cfg.get("mlflow_run_id"), "time": time.time(),
                "loss": logs.get("loss")}
        eng.save(engine, d, rank, full)
        eng.export(engine, Path(d) / "export", cfg, rank,
                   {"step": step, "tokenizer_dir": loop_cfg["tokenizer_dir"],
                    "mlflow_run_id": loop_cfg.get("mlflow_run_id"), "loss": logs.get("loss")})
        metrics = {"step": step, **logs}
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d), checkpoint_dir_name=f"step_{step:07d}")
