"""T3D pretraining on a Ray cluster: Ray Train TorchTrainer x DeepSpeed ZeRO workers.

    python -m trainer.pretrain --config configs/debug.yaml [--set train.steps=100 ...]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m trainer.pretrain --config configs/debug.yaml

Connects to the cluster in RAY_ADDRESS (set by `ray job submit`) or ``ray.address``, else
starts a local Ray. Run folder: ``{train.output_dir}/{train.run_name}`` holds the resolved
config, the tokenizer, Ray Train's checkpoints (``step_XXXXXXX/`` with ``export/``) and the
MLflow run id, so re-running the same command resumes the same run and MLflow run.
``data.shards`` and ``train.output_dir`` may be object-store URIs (``s3://bucket/prefix``,
``common.storage``): both are checked before anything trains, and a URI that cannot be used
stops the run with its reason.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.config import Config

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from common import log, storage
from common.config import add_config_args, load_object, parse_config_cli, save_config
from common.storage import StorageError
from trainer.checkpoint import list_checkpoints

logger = log.get(__name__)

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


def resolve_paths(cfg: Config) -> Config:
    """Absolute local paths (every worker must see the same ones) and URIs as given."""
    cfg.data.shards = storage.normalize(cfg.data.shards)
    cfg.train.output_dir = storage.normalize(cfg.train.output_dir)
    if cfg.model.text_encoder:
        cfg.model.text_encoder = storage.normalize(cfg.model.text_encoder)
    return cfg


def preflight(cfg: Config) -> None:
    """Before anything trains: the shards can be read (their manifest is there) and the output can
    be written. A missing bucket, a refused key or an unreachable endpoint raises StorageError
    naming the URI."""
    from data_service.shards import load_manifest

    storage.check(cfg.data.shards)
    load_manifest(cfg.data.shards)
    storage.check(cfg.train.output_dir, write=True)


def prepare_tokenizer(cfg: Config, run_dir: str | Path) -> str:
    """The run's tokenizer (``{run}/tokenizer``, a folder or URI): the text encoder's own, or
    WordPiece trained on the train reports."""
    out = storage.join(run_dir, "tokenizer")
    if storage.isfile(storage.join(out, "tokenizer.json")) or storage.isfile(storage.join(out, "vocab.txt")):
        return out
    import tempfile

    with tempfile.TemporaryDirectory(dir=storage.scratch_dir()) as tmp:
        local = out if not storage.is_remote(out) else str(Path(tmp) / "tokenizer")
        if cfg.model.text_encoder:
            from common.text import load_tokenizer

            load_tokenizer(cfg.model.text_encoder).save_pretrained(local)
        else:
            from common.text import build_tokenizer
            from data_service.shards import iter_split

            reports = [s["report"] for s in iter_split(cfg.data.shards, "train", decode_ct=False)]
            build_tokenizer(reports, cfg.model.vocab_size, Path(local))
        if local != out:
            storage.upload_dir(local, out)
    return out


def mlflow_run(cfg: Config, run_dir: str, retries: int = 5,
               preset: str | None = None) -> tuple[str | None, str | None]:
    """(tracking uri, run id); the id is kept in the run folder so resumes log to the same run.
    A new run starts with its description (``trainer.dashboard``; ``preset``: the YAML it came from)
    in a model-training experiment. An MLflow server that does not answer is retried by MLflow's own
    client (``retries`` times, exponential backoff from 2 s: about a minute for 5); then the run
    trains untracked (a warning says so) rather than not at all."""
    uri = cfg.tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return None, None
    with _environ({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries), "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2"}):
        try:
            return _mlflow_run(cfg, run_dir, uri, preset)
        except Exception as e:  # noqa: BLE001 - MLflow's errors are many (HTTP, timeouts, REST)
            logger.warning(f"MLflow at {uri} did not answer ({type(e).__name__}: {str(e)[:200]}); "
                  "training WITHOUT tracking. Metrics are still printed and saved with each checkpoint.")
            return None, None


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    """``values`` in os.environ for the block (MLflow reads its retry settings at each request); the
    Tracker's processes keep their own, fewer, outside it (``trainer.tracking``)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _mlflow_run(cfg: Config, run_dir: str, uri: str, preset: str | None = None) -> tuple[str, str]:
    from mlflow.tracking import MlflowClient

    from trainer.dashboard import experiment_id, start_tags

    client = MlflowClient(uri)
    id_file = storage.join(run_dir, "mlflow_run_id")
    if storage.isfile(id_file):
        return uri, storage.read_text(id_file).strip()
    exp_id = experiment_id(client, cfg.tracking.experiment)
    tags = {"run_dir": str(run_dir), **start_tags(cfg, preset)}
    if cfg.tracking.parent_run_id:
        tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id          # nested under a sweep
    run = client.create_run(exp_id, run_name=cfg.train.run_name, tags=tags)
    from ray.tune.utils import flatten_dict

    flat = flatten_dict(cfg.to_dict(), delimiter=".")
    for i in range(0, len(flat), 100):
        from mlflow.entities import Param

        client.log_batch(run.info.run_id, params=[Param(k, str(v)[:500]) for k, v in list(flat.items())[i:i + 100]])
    storage.write_text(id_file, run.info.run_id)
    return uri, run.info.run_id


def init_ray(cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # Ray Data only budgets CPUs Train did not reserve: start with more logical CPUs than cores
    # so that workers and the decode tasks both get scheduled (docs/design.md).
    # The dashboard (loopback only) serves the State API that Ray Train's placement-group cleaner
    # polls every second: without it, the cleaner cannot work and logs a warning per poll.
    n = cfg.ray.num_cpus or max(8, 4 * (os.cpu_count() or 2))
    ray.init(num_cpus=n, include_dashboard=True, dashboard_host="127.0.0.1",
             object_store_memory=cfg.data.object_store_mb * 2**20)


def fit(cfg: Config, log_samples: bool = False, callbacks: list | None = None, run_callbacks: list | None = None,
        validator: str | None = None, preset: str | None = None):
    """Train ``cfg`` on the Ray cluster. ``callbacks``: ``trainer.loop.LoopCallback`` objects every
    worker runs (tests inject faults this way); ``run_callbacks``: Ray Train driver-side callbacks
    (the sweep's reporting to Tune); ``validator``: scores each checkpoint (``sweep.scorer``);
    ``preset``: the YAML ``cfg`` came from (the run's description names it).
    Returns (result, run folder: a Path, or the URI when on an object store, MLflow uri, run id)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from trainer.engine import BACKEND_GPU
    from trainer.loop import LoopArgs, train_loop

    cfg = resolve_paths(cfg)
    preflight(cfg)
    run_dir = storage.join(cfg.train.output_dir, cfg.train.run_name)
    storage.makedirs(run_dir)
    save_config(cfg, storage.join(run_dir, "config.yaml"))
    tok_dir = prepare_tokenizer(cfg, run_dir)
    uri, run_id = mlflow_run(cfg, run_dir, preset=preset)
    init_ray(cfg)
    args = LoopArgs(cfg, tok_dir, run_dir, uri, run_id, log_samples, list(callbacks or []), validator,
                    os.environ.get(log.LEVEL_ENV))
    storage_path, storage_fs = storage.ray_storage(cfg.train.output_dir)
    trainer = TorchTrainer(
        train_loop, train_loop_config={"args": args},
        scaling_config=ScalingConfig(num_workers=((cfg.ray.min_workers, cfg.ray.num_workers) if cfg.ray.min_workers
                                                  else cfg.ray.num_workers),
                                     use_gpu=cfg.ray.use_gpu, placement_strategy=cfg.ray.placement_strategy,
                                     resources_per_worker={"CPU": cfg.ray.cpus_per_worker, **cfg.ray.worker_resources}),
        torch_config=TorchConfig(backend=BACKEND_GPU if cfg.ray.use_gpu else "gloo"),
        run_config=RunConfig(name=cfg.train.run_name, storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
                             callbacks=list(run_callbacks or []),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)))
    evaluator = None
    if cfg.eval.enabled:       # the evaluator named by the config (default evaluators.actor:EvalThread)
        evaluator = load_object(cfg.eval.watcher, "eval.watcher")(run_dir, cfg, uri).start()
    result = trainer.fit()
    if evaluator is not None:
        evaluator.finish()
    if uri and run_id:
        from mlflow.tracking import MlflowClient

        from trainer.tracking import SPOOL, send_spool

        send_spool(uri, run_id, storage.local_state_dir(run_dir) / SPOOL)   # what rank 0 could not send
        try:
            MlflowClient(uri).set_terminated(run_id, "FINISHED" if result.error is None else "FAILED")
        except Exception as e:  # noqa: BLE001 - the run trained and saved; MLflow being away must not fail it
            logger.warning(f"could not mark MLflow run {run_id} finished ({type(e).__name__}: "
                  f"{str(e)[:200]})")
    return result, (run_dir if storage.is_remote(run_dir) else Path(run_dir)), uri, run_id


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.pretrain", description=__doc__.split("\n")[0])
    add_config_args(p)
    p.add_argument("--log-samples", action="store_true", help="write the keys each rank trained on")
    a, cfg = parse_config_cli(p, argv)
    try:
        result, run_dir, uri, run_id = fit(cfg, a.log_samples, preset=a.config)
    except StorageError as e:
        raise SystemExit(f"[t3d] cannot use storage: {e}") from e
    ckpts = [storage.name(p) for p in list_checkpoints(run_dir, exported=True)]
    summary = {"run_dir": str(run_dir), "checkpoints": ckpts, "final_metrics": result.metrics,
               "mlflow_uri": uri, "mlflow_run_id": run_id,
               "error": None if result.error is None else str(result.error)}
    storage.write_text(storage.join(run_dir, "summary.json"), json.dumps(summary, indent=1, default=str))
    logger.info(json.dumps(summary, default=str))
    return 0 if result.error is None else 1


if __name__ == "__main__":
    sys.exit(main())
