"""Per-worker training loop run by Ray Train, in named phases:

    setup -> resume -> for each micro-batch: step -> (at an optimizer step) log -> checkpoint -> callbacks

Checkpoint every ``train.checkpoint_every`` optimizer steps: every rank saves its DeepSpeed
partitions and RNG into a local folder, rank 0 adds the loop state (step, data position, MLflow
run id) and the consolidated fp32 export, and every rank reports it to Ray Train under the name
``step_{step:07d}`` (Ray merges the ranks' folders). A restarted attempt loads the latest one.
Faults and extensions come in as ``LoopCallback`` objects (tests install them; no config key).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.config import Config

import contextlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from common import log as project_log  # (``log`` is the phase below)
from common import storage
from data_service.shards import iter_split
from data_service.stream import Plan, build_index, rank_stream
from data_service.views import AugmentParams
from trainer import checkpoint as ckpt
from trainer import engine as eng
from trainer.export import export
from trainer.health import CollapseMonitor, health_metrics
from trainer.losses import T3DLoss
from trainer.losses.dist import all_reduce_min
from trainer.model import build_model
from trainer.model.text import tokenize_reports
from trainer.step import Batch, model_inputs, scalars, train_step
from trainer.tracking import SPOOL, Tracker

logger = project_log.get(__name__)


class LoopCallback:
    """Extension points of the loop; every method is optional. ``run`` is the worker's ``Run``."""

    def on_step(self, run: "Run") -> None:
        """After each optimizer step (and its log and checkpoint)."""

    def on_resume(self, run: "Run") -> None:
        """After a checkpoint was loaded, before the first step (every rank)."""


@dataclass
class LoopArgs:
    """What the driver (``trainer.pretrain.fit``) hands every worker."""
    cfg: Config
    tokenizer_dir: str
    run_dir: str
    mlflow_uri: str | None = None
    mlflow_run_id: str | None = None
    log_samples: bool = False
    callbacks: list[LoopCallback] = field(default_factory=list)
    validator: str | None = None         # "module:function(export dir, shards) -> metrics", run by rank 0
    log_level: str | None = None         # the driver's --log-level (common.log), for the workers


@dataclass
class Run:
    """One worker's state through the phases."""
    args: LoopArgs
    rank: int
    world: int
    engine: Any
    loss_fn: T3DLoss
    tracker: Tracker
    dtype: torch.dtype
    state: dict[str, Any]
    index: dict = field(default_factory=dict)      # train key -> shard and byte offsets
    plan: Plan | None = None                       # the exact data order (data_service.stream)
    health: Batch | None = None
    monitor: CollapseMonitor | None = None
    logs: dict[str, Any] = field(default_factory=dict)   # the last step's loss terms, 0-d device tensors
    clock: tuple[float, int] = (0.0, 0)            # (time, samples) at the last log

    @property
    def cfg(self) -> Config:
        return self.args.cfg


# ------------------------------------------------------------------------------------------ phases
def setup(args: LoopArgs, rank: int, world: int, universal: bool = False) -> Run:
    """Seeds, tokenizer, model (identical init on every rank), DeepSpeed engine (``universal``: it
    will load a checkpoint saved by another number of workers), tracker, health batch."""
    from common.text import load_tokenizer

    cfg = args.cfg
    np.random.seed(cfg.train.seed + rank)
    tokenizer = load_tokenizer(args.tokenizer_dir)
    torch.manual_seed(cfg.train.seed)                      # identical init on every rank
    engine = eng.init_engine(build_model(cfg, len(tokenizer)), cfg, universal)
    torch.manual_seed(cfg.train.seed + 1000 * (rank + 1))  # then per rank: dropout differs across ranks
    tracker = (Tracker(args.mlflow_uri, args.mlflow_run_id, storage.local_state_dir(args.run_dir) / SPOOL) if rank == 0
               else Tracker(None, None))
    state = {"step": 0, "micro": 0, "position": 0, "samples": 0, "corrupt": 0, "dropped": 0, "world": world}
    run = Run(args, rank, world, engine, T3DLoss(cfg.tma, cfg.restore), tracker,
              torch.bfloat16 if eng.use_bf16(cfg) else torch.float32, state)
    run.index = build_index(cfg.data.shards, "train")
    run.plan = Plan(sorted(run.index), cfg.train.batch_size, cfg.train.seed)
    if cfg.train.health_batch > 1:
        run.health = health_batch(cfg, tokenizer, engine.device)
        run.monitor = CollapseMonitor(cfg.train.collapse_cosine, cfg.train.collapse_patience)
    return run


def health_batch(cfg: Config, tokenizer, device) -> Batch:
    """The first ``train.health_batch`` train studies (shard order), unaugmented: the same on every rank."""
    samples = []
    for s in iter_split(cfg.data.shards, "train"):
        samples.append(s)
        if len(samples) == cfg.train.health_batch:
            break
    enc = tokenize_reports(tokenizer, [s["report"] for s in samples], cfg)
    return Batch(torch.from_numpy(np.stack([s["ct"] for s in samples])[:, None]).to(device), None,
                 AugmentParams.identity((len(samples), 1)), enc["input_ids"].to(device), enc["attention_mask"].to(device))


def pick_checkpoint(given: Path | None, given_path: str | None, run_dir: str, rank: int,
                    staging: str | None = None) -> Path | None:
    """The checkpoint to resume from: the one Ray Train hands this attempt (``given``, a local
    folder), or, when its files do not match the checksums written with it (truncated,
    half-written), the newest earlier one in ``run_dir`` that does (copied into ``staging`` when
    ``run_dir`` is on an object store). Every rank makes the same choice: they read the same storage."""
    if given is None:
        return None
    bad = ckpt.verify_checkpoint(given)
    if bad is None:
        return Path(given)
    older = next((p for p in reversed(ckpt.list_checkpoints(run_dir))
                  if storage.name(p) < storage.name(given_path or str(given)) and ckpt.verify_checkpoint(p) is None), None)
    if rank == 0:
        logger.warning(f"checkpoint {given_path} is damaged ({bad}); "
              + (f"resuming from {older}" if older else "no earlier good checkpoint: starting over"))
    if older is None:
        return None
    if storage.is_remote(older):
        return storage.download_dir(older, Path(staging or storage.scratch_dir()) / storage.name(older))
    return Path(older)


def saved_world(source: Path | None) -> int | None:
    if source is None:
        return None
    return json.loads((source / "state.json").read_text()).get("world")


def resume(run: Run, source: Path | None) -> None:
    """Load ``source`` (``pick_checkpoint``). Saved by another number of workers (an elastic
    restart after a node was lost or added), it goes through DeepSpeed's universal checkpoint; the
    data position is kept in samples, so the new world continues the same sample order."""
    if source is None:
        if run.rank == 0:
            run.tracker.log({"data/unused_per_epoch": run.plan.unused_per_epoch(run.world),
                             "data/steps_per_epoch": run.plan.steps_per_epoch(run.world) / run.cfg.train.grad_accum}, 0)
        return
    before = saved_world(source) or run.world
    if before != run.world:
        if run.rank == 0:
            logger.info(f"{source.name} was saved by {before} worker(s), resuming on {run.world}: "
                  "converting it to a DeepSpeed universal checkpoint")
        with tempfile.TemporaryDirectory(prefix="t3d-universal-", dir=storage.scratch_dir()) as tmp:
            run.state.update(ckpt.load(run.engine, source, run.rank, universal=ckpt.to_universal(source, tmp)))
    else:
        run.state.update(ckpt.load(run.engine, source, run.rank))
    if "position" not in run.state:           # a checkpoint from before positions were saved
        run.state["position"] = run.plan.position_of(run.state["micro"], before)
    run.state["world"] = run.world
    if run.rank == 0:
        logger.info(f"resumed from {source} at step {run.state['step']} (micro {run.state['micro']}, "
              f"sample {run.state['position']}, {before} -> {run.world} workers)")


def batches(run: Run) -> Iterator[tuple[int, Batch | None]]:
    """(micro-step, batch) from this rank's plan, from the resumed position on. Corrupt samples
    are printed and counted; every rank trims to the smallest valid batch (the gathers need equal
    sizes), and a micro-step left empty everywhere yields None."""
    cfg, state = run.cfg, run.state
    total_micro = cfg.train.steps * cfg.train.grad_accum
    views = cfg.tma.enabled and cfg.data.views.n > 0
    for b in rank_stream(run.index, run.plan, run.rank, run.world, state["position"], state["micro"],
                         total_micro - state["micro"], cfg.data, run.args.tokenizer_dir, cfg.model.text_unit):
        micro, state["next_position"] = int(b["micro"][0]), int(b["position"][0])
        ok = b["ok"].astype(bool)
        for k, err in zip(b["key"][~ok], b["error"][~ok]):
            logger.warning(f"corrupt sample {k} skipped: {err}")
        n_ok = all_reduce_min(int(ok.sum()))
        keep = np.flatnonzero(ok)[:n_ok]
        state["corrupt"] += int((~ok).sum())
        state["dropped"] += int(ok.sum()) - n_ok
        if run.args.log_samples and n_ok:
            with open(storage.local_state_dir(run.args.run_dir) / f"samples_rank{run.rank}.jsonl", "a") as f:
                f.write(json.dumps({"micro": micro, "keys": [str(k) for k in b["key"][keep]]}) + "\n")
        yield micro, (Batch.from_numpy(b, run.engine.device, views, keep) if n_ok else None)


def log(run: Run) -> None:
    """Loss terms, lr, throughput, data counters and representation health (all ranks compute the
    health metrics: under ZeRO-3 the forward gathers parameters collectively)."""
    cfg, state, step = run.cfg, run.state, run.state["step"]
    metrics = {f"loss/{k}": v for k, v in scalars(run.logs).items()}      # the one read of the loss terms
    if run.health is not None:
        image, _ = model_inputs(run.health, cfg.data, run.dtype)
        metrics.update(health_metrics(run.engine.module, image, run.health.input_ids, run.health.attention_mask))
        for w in run.monitor.update(metrics, step):
            if run.rank == 0:
                logger.warning(w)
    t, n = run.clock
    dt, dn = time.time() - t, state["samples"] - n
    metrics.update({"lr": run.engine.get_lr()[0], "samples_per_s": dn / max(dt, 1e-9),
                    "views_per_s": dn * cfg.data.views.n / max(dt, 1e-9),
                    "data/corrupt_skipped": state["corrupt"], "data/dropped_uneven": state["dropped"]})
    if torch.cuda.is_available():
        metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    run.tracker.log(metrics, step)
    state["samples_per_s"] = round(metrics["samples_per_s"], 3)
    if run.rank == 0:
        shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith(("loss/", "health/"))}
        logger.info(f"step {step}/{cfg.train.steps} {json.dumps(shown)} {metrics['samples_per_s']:.1f} samples/s")
    run.clock = (time.time(), state["samples"])


def checkpoint(run: Run) -> None:
    """Every rank saves into one folder and reports it; rank 0 adds the state and the export."""
    import ray.train
    from ray.train import Checkpoint

    step, args, logs = run.state["step"], run.args, scalars(run.logs)
    with tempfile.TemporaryDirectory(dir=storage.scratch_dir()) as d:     # staged in the cache, then uploaded by Ray
        full = {**run.state, "mlflow_run_id": args.mlflow_run_id, "time": time.time(), "loss": logs.get("loss")}
        ckpt.save(run.engine, d, run.rank, full)
        export(run.engine, ckpt.export_of(d), run.cfg, run.rank,
                   {"step": step, "tokenizer_dir": args.tokenizer_dir, "mlflow_run_id": args.mlflow_run_id,
                    "loss": logs.get("loss")})
        ckpt.write_checksums(d, run.rank)
        metrics = {"step": step, **logs}
        if args.validator and run.rank == 0:
            metrics.update(validate(args.validator, Path(ckpt.export_of(d)), run.cfg.data.shards))
            run.tracker.log({k: v for k, v in metrics.items() if k != "step"}, step)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d), checkpoint_dir_name=ckpt.step_name(step))


def validate(validator: str, export: Path, shards: str) -> dict[str, float]:
    """Scores of the checkpoint just exported (a sweep's validation); NaN for each when scoring
    fails, so that a report always carries them (Tune requires its metric in every result)."""
    from common.config import load_object

    fn = load_object(validator, "sweep.scorer")
    try:
        return {k: float(v) for k, v in fn(export, shards).items()}
    except Exception as e:  # noqa: BLE001 - a failed validation must not kill the trial
        logger.error(f"validation of {export} failed: {type(e).__name__}: {e}")
        return {k: float("nan") for k in getattr(fn, "metric_names", ())}


# --------------------------------------------------------------------------------------- the loop
def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function; ``config = {"args": LoopArgs}``."""
    import ray.train

    args: LoopArgs = config["args"]
    project_log.configure(args.log_level)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    given = ray.train.get_checkpoint()
    with (given.as_directory() if given is not None else contextlib.nullcontext(None)) as d, \
            tempfile.TemporaryDirectory(dir=storage.scratch_dir()) as staging:
        source = pick_checkpoint(Path(d) if d else None, given.path if given else None, args.run_dir, rank, staging)
        run = setup(args, rank, world, universal=saved_world(source) not in (None, world))
        resume(run, source)
    if source is not None:
        if rank == 0:
            name = storage.name(given.path) if d and source == Path(d) else source.name   # d: Ray's download
            logger.info(f"this attempt resumes from {storage.join(args.run_dir, name)} (the newest good "
                  f"checkpoint): steps after {run.state['step']} are trained again")
        for cb in args.callbacks:
            cb.on_resume(run)
    cfg, state = run.cfg, run.state
    run.clock = (time.time(), state["samples"])
    for micro, batch in batches(run):
        if batch is not None:
            run.logs = train_step(run.engine, run.loss_fn, batch, cfg.data, run.dtype, cfg.train.augment_kernel)
            state["samples"] += len(batch) * run.world
        state["micro"], state["position"] = micro + 1, state.pop("next_position")
        if state["micro"] % cfg.train.grad_accum:
            continue
        state["step"] = step = state["micro"] // cfg.train.grad_accum
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            log(run)
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
            checkpoint(run)
        for cb in args.callbacks:
            cb.on_step(run)
        if step >= cfg.train.steps:
            break
    run.tracker.close()
