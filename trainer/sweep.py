"""Ray Tune sweep over any config keys; every trial is a full distributed pretraining run.

    python -m trainer.sweep --config configs/sweep_phantom.yaml [--set sweep.num_samples=8] [--resume]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m trainer.sweep --config ...

A trial is a Tune *function* trainable that builds and fits the same Ray Train ``TorchTrainer`` as
``trainer.pretrain`` (Ray Train V2's way): its DeepSpeed workers score each checkpoint with
``sweep.scorer`` (the evaluators' ``Scoring``, on the validation split) and report the training loss
and those scores to Tune, where ASHA may stop the trial. Folders: ``{train.output_dir}/sweeps/
{sweep.name}/`` holds Tune's state, ``trials/trial-{id}/`` the trials' runs (checkpoints, exports),
``results.csv``, ``score_vs_knobs.png`` and ``best_config.yaml`` (a config ``trainer.pretrain``
takes as it is). MLflow: one parent run for the sweep (the results table and the plot), one nested
run per trial (its params and curves); the best trial's best checkpoint is registered as model
``{sweep.name}`` with the alias ``best``. ``--resume`` continues an interrupted sweep
(``Tuner.restore``): finished trials are not rerun, unfinished ones resume from their checkpoints.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import log, storage
from common.config import ConfigError, add_config_args, config_from_dict, merge, nested, parse_config_cli, save_config
from trainer.checkpoint import EXPORT_INFO, export_of, step_name
from trainer.pretrain import init_ray, mlflow_run, resolve_paths

logger = log.get(__name__)

if TYPE_CHECKING:
    from common.config import Config


def sweep_dir(cfg: Config) -> str:
    """``{train.output_dir}/sweeps/{sweep.name}``: a folder or a URI (``common.storage``)."""
    return storage.join(storage.normalize(cfg.train.output_dir), "sweeps", cfg.sweep.name)


def trial_config(base: dict[str, Any], params: dict[str, Any], trial_id: str, root: str,
                 parent_run_id: str | None) -> Config:
    """The base config with one trial's values (dotted keys), in its own run folder, nested in MLflow."""
    data = dict(base)
    for key, value in params.items():
        data = merge(data, nested(key, value))
    data = merge(data, {"train": {"run_name": f"trial-{trial_id}", "output_dir": storage.join(root, "trials")},
                        "tracking": {"parent_run_id": parent_run_id}, "eval": {"enabled": False}})
    return config_from_dict(data)


def check_space_types(cfg: Config) -> None:
    """Every value a distribution can produce must fit its key's type (checked before anything runs):
    each choice/grid value, and both bounds of a range (as the float or int it would be drawn as)."""
    base = cfg.to_dict()
    for key, spec in cfg.sweep.space.items():
        (kind, values), = spec.items()
        samples = values if kind in ("choice", "grid") else [type_of(kind)(v) for v in values]
        for v in samples:
            try:
                config_from_dict(merge(base, nested(key, v)))
            except ConfigError as e:
                raise ConfigError(f"sweep.space['{key}']: {kind} value {v!r} does not fit: {e}") from e


def type_of(kind: str):
    return int if kind == "randint" else float


def param_space(cfg: Config) -> dict[str, Any]:
    from ray import tune

    make = {"choice": tune.choice, "grid": tune.grid_search, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(*v)}
    return {key: make[kind](values) for key, spec in cfg.sweep.space.items() for kind, values in spec.items()}


def make_trainable(cfg: Config, root: str, parent_run_id: str | None, preset: str | None = None):
    """The trial function (closed over the base config) and its resources (the trial's own actor;
    its Train workers ask for theirs through ``ray.*``)."""
    from ray import tune

    base = cfg.to_dict()
    scorer = cfg.sweep.scorer

    def trial(params: dict[str, Any]) -> None:
        from ray.tune.integration.ray_train import TuneReportCallback

        from trainer.pretrain import fit

        tcfg = trial_config(base, params, tune.get_context().get_trial_id(), root, parent_run_id)
        result, run_dir, _, _ = fit(tcfg, run_callbacks=[TuneReportCallback()], validator=scorer, preset=preset)
        if result.error is not None:
            raise RuntimeError(f"trial run {run_dir} failed: {result.error}")

    return tune.with_resources(trial, {"cpu": cfg.sweep.driver_cpus})


def make_tuner(cfg: Config, root: str, trainable, resume: bool):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    sw = cfg.sweep
    path, fs = storage.ray_storage(root)
    if resume:
        if not tune.Tuner.can_restore(path, storage_filesystem=fs):
            raise SystemExit(f"--resume: no sweep to resume in {root}")
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
    if storage.isfile(storage.join(root, "tuner.pkl")):
        raise SystemExit(f"{root} holds a sweep already: continue it with --resume, or set another sweep.name")
    search = None
    if sw.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search = OptunaSearch(seed=sw.seed)
    scheduler = None
    if sw.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="step", max_t=cfg.train.steps, reduction_factor=sw.reduction_factor,
                                  grace_period=sw.grace_checkpoints * cfg.train.checkpoint_every)
    return tune.Tuner(
        trainable, param_space=param_space(cfg),
        tune_config=tune.TuneConfig(metric=sw.metric, mode=sw.mode, num_samples=sw.num_samples, search_alg=search,
                                    scheduler=scheduler, max_concurrent_trials=sw.max_concurrent_trials),
        run_config=tune.RunConfig(name=sw.name, storage_path=storage.parent(path), storage_filesystem=fs, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=sw.max_failures)))


def results_table(grid, cfg: Config, root: str) -> list[dict[str, Any]]:
    """One row per trial: its values, status, error, the best and last score over its checkpoints."""
    sw = cfg.sweep
    better = max if sw.mode == "max" else min
    rows = []
    for r in grid:
        cfg_vals = {k: r.config.get(k) for k in sw.space}
        df = r.metrics_dataframe
        scores = [] if df is None or sw.metric not in df else [
            (float(v), int(s)) for v, s in zip(df[sw.metric], df["step"]) if v == v]
        best = better(scores) if scores else (math.nan, -1)
        trial_id = (r.metrics or {}).get("trial_id") or storage.name(r.path)
        rows.append({"trial": trial_id, **cfg_vals,
                     "status": "ERROR" if r.error else "TERMINATED",
                     "error": (str(r.error).splitlines() or [""])[-1][:300] if r.error else "",
                     f"best {sw.metric}": best[0], "best step": best[1],
                     "last step": int((r.metrics or {}).get("step", -1)),
                     "loss": (r.metrics or {}).get("loss", math.nan),
                     "run_dir": storage.join(root, "trials", f"trial-{trial_id}")})
    return sorted(rows, key=lambda r: str(r["trial"]))            # ties go to the first trial


def plot(rows: list[dict[str, Any]], cfg: Config, path: Path) -> Path:
    """Score against each swept knob (one panel per knob)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    knobs, key = list(cfg.sweep.space), f"best {cfg.sweep.metric}"
    fig, axes = plt.subplots(1, max(1, len(knobs)), figsize=(4 * max(1, len(knobs)), 3.5), squeeze=False)
    for ax, k in zip(axes[0], knobs):
        pts = [(r[k], r[key]) for r in rows if r[key] == r[key]]
        xs = [p[0] for p in pts]
        if xs and all(isinstance(x, str) or isinstance(x, bool) for x in xs):
            cats = sorted({str(x) for x in xs})
            ax.scatter([cats.index(str(x)) for x in xs], [p[1] for p in pts])
            ax.set_xticks(range(len(cats)), cats, rotation=30)
        else:
            ax.scatter(xs, [p[1] for p in pts])
            if cfg.sweep.space[k].get("loguniform"):
                ax.set_xscale("log")
        ax.set(xlabel=k, ylabel=cfg.sweep.metric)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def best_outputs(rows: list[dict[str, Any]], cfg: Config, root: str) -> dict[str, Any] | None:
    """The best trial's config as a pretraining config (own run name, the base output folder, no
    sweep), written to ``best_config.yaml``; returns the best row (with its checkpoint folder)."""
    key = f"best {cfg.sweep.metric}"
    ok = [r for r in rows if r[key] == r[key]]
    if not ok:
        return None
    best = (max if cfg.sweep.mode == "max" else min)(ok, key=lambda r: r[key])
    trial_cfg = json.loads(json.dumps(cfg.to_dict()))
    for k in cfg.sweep.space:
        trial_cfg = merge(trial_cfg, nested(k, best[k]))
    trial_cfg = merge(trial_cfg, {"train": {"run_name": f"{cfg.sweep.name}-best"}})
    trial_cfg["sweep"] = {}
    best_cfg = config_from_dict(trial_cfg)
    save_config(best_cfg, storage.join(root, "best_config.yaml"))
    best["checkpoint"] = storage.join(best["run_dir"], step_name(best["best step"])) if best["run_dir"] else ""
    return best


def publish(uri: str | None, parent_run_id: str | None, rows, best, cfg: Config, root: str) -> None:
    if not (uri and parent_run_id):
        return
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from trainer.tracking import register_checkpoint

    client = MlflowClient(uri)
    client.log_table(parent_run_id, pd.DataFrame(rows), "results_table.json")
    for name in ("results.csv", "score_vs_knobs.png", "best_config.yaml"):
        if storage.isfile(storage.join(root, name)):
            local = storage.local_state_dir(root) / name
            if storage.is_remote(root):
                local.write_bytes(storage.read_bytes(storage.join(root, name)))
            client.log_artifact(parent_run_id, str(local))
    export = export_of(best["checkpoint"]) if best and best["checkpoint"] else None
    v = None
    if export and storage.isdir(export):
        info = json.loads(storage.read_text(storage.join(export, EXPORT_INFO)))
        run_id = info.get("mlflow_run_id") or parent_run_id
        v = register_checkpoint(uri, run_id, storage.local_dir(export), cfg.sweep.name,
                                {"step": str(best["best step"]), "metric": cfg.sweep.metric,
                                 "value": f"{best[f'best {cfg.sweep.metric}']:.6g}", "trial": str(best["trial"])},
                                f"checkpoints/{storage.name(best['checkpoint'])}")
        if v:
            logger.info(f"registered {cfg.sweep.name} v{v} (alias 'best'): {best['checkpoint']}")
    describe(client, parent_run_id, cfg, rows, best, v)
    client.set_terminated(parent_run_id, "FINISHED")


def describe(client, parent_run_id: str, cfg: Config, rows, best=None, version: str | None = None) -> None:
    """The parent run's description: the trial table (each trial linked to its run) and the best configuration."""
    from trainer.dashboard import NOTE_TAG, render_sweep_note, run_path

    exp_id, links = client.get_run(parent_run_id).info.experiment_id, {}
    for r in rows:
        id_file = storage.join(r["run_dir"], "mlflow_run_id")
        if storage.isfile(id_file):
            links[str(r["trial"])] = run_path(exp_id, storage.read_text(id_file).strip())
    note = render_sweep_note(cfg.sweep.name, cfg.sweep.metric, list(cfg.sweep.space), rows, best, links, version)
    client.set_tag(parent_run_id, NOTE_TAG, note)


def run(cfg: Config, resume: bool = False, preset: str | None = None) -> dict[str, Any]:
    cfg = resolve_paths(cfg)
    if not cfg.sweep.space:
        raise ConfigError("sweep.space: empty; name at least one config key to sweep")
    check_space_types(cfg)
    storage.check(cfg.data.shards)
    root = sweep_dir(cfg)
    storage.check(root, write=True)                 # a bad bucket, key or endpoint fails here, naming the URI
    save_config(cfg, storage.join(root, "sweep_config.yaml"))
    parent_cfg = config_from_dict(merge(cfg.to_dict(), {"train": {"run_name": cfg.sweep.name}}))
    uri, parent_run_id = mlflow_run(parent_cfg, root, preset=preset)   # the id is kept in the folder: --resume reuses it
    if uri and parent_run_id:
        from mlflow.tracking import MlflowClient

        describe(MlflowClient(uri), parent_run_id, cfg, [])
    init_ray(cfg)
    tuner = make_tuner(cfg, root, make_trainable(cfg, root, parent_run_id, preset), resume)
    grid = tuner.fit()
    rows = results_table(grid, cfg, root)
    import csv
    import io

    f = io.StringIO(newline="")
    w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    w.writeheader()
    w.writerows(rows)
    storage.write_text(storage.join(root, "results.csv"), f.getvalue())
    png = plot(rows, cfg, storage.local_state_dir(root) / "score_vs_knobs.png")
    if storage.is_remote(root):
        storage.write_bytes(storage.join(root, png.name), png.read_bytes())
    best = best_outputs(rows, cfg, root)
    publish(uri, parent_run_id, rows, best, cfg, root)
    return {"dir": root, "rows": rows, "best": best, "mlflow_run_id": parent_run_id}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.sweep", description=__doc__.split("\n")[0])
    add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep (Tuner.restore)")
    a, cfg = parse_config_cli(p, argv)
    out = run(cfg, a.resume, a.config)
    cols = [k for k in out["rows"][0] if k not in ("run_dir", "error")] if out["rows"] else []
    print("\n" + "  ".join(f"{c:>14s}"[-14:] for c in cols))
    for r in out["rows"]:
        print("  ".join(f"{(f'{r[c]:.4g}' if isinstance(r[c], float) else str(r[c])):>14s}"[-14:] for c in cols)
              + (f"  {r['error']}" if r["error"] else ""))
    if out["best"]:
        print(f"\nbest: trial {out['best']['trial']}, checkpoint {out['best']['checkpoint']}\n"
              f"config: {out['dir']}/best_config.yaml  (python -m trainer.pretrain --config {out['dir']}/best_config.yaml)")
    print(f"results: {out['dir']}/results.csv, {out['dir']}/score_vs_knobs.png; MLflow parent run {out['mlflow_run_id']}")
    return 0 if out["best"] else 1


if __name__ == "__main__":
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    sys.exit(main())
