"""`make demo`: local cluster up, phantom dataset, ingest, `ray job submit` pretraining, scoring.

    python -m experiments.demo [--dir demo] [--n 32] [--steps 40] [--zero 2] [--storage s3]

``--storage s3`` (``make demo STORAGE=s3``): the cluster comes up with its object store
(SeaweedFS on loopback), shards, checkpoints, the evaluator's ledger and MLflow's artifacts all
go to ``s3://t3d/demo/...``.

Every step is the command a user would run; each is printed before it runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from cluster import local
from experiments import shell
from experiments.shell import REPO
from trainer.checkpoint import list_checkpoints
from trainer.dashboard import COMMIT_ENV, git_describe, run_url


def sh(cmd: list[str], env: dict | None = None) -> None:
    shell.sh(cmd, "demo", env)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.demo", description=__doc__.split("\n")[0])
    p.add_argument("--dir", default="demo")
    p.add_argument("--n", type=int, default=60, help="phantom volumes (a third held out: valid + test)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--zero", type=int, default=2, help="DeepSpeed ZeRO stage")
    p.add_argument("--storage", default="local", choices=["local", "s3"], help="where shards and runs live")
    a = p.parse_args(argv)
    t0 = time.time()
    py = sys.executable
    d = (REPO / a.dir).resolve()
    s3 = a.storage == "s3"
    try:
        st = local.up(local.state_dir(), 8, 5000, 8265, 6380, 1024, storage=s3)
    except local.PortInUse as e:
        raise SystemExit(f"demo: {e}") from e
    if s3 and not st.get("s3_endpoint"):
        raise SystemExit("demo: the cluster is up without its object store: `make down`, then `make demo STORAGE=s3`")
    raw = d / "raw"
    shards, runs = (f"s3://{st['s3_bucket']}/{a.dir}/shards", f"s3://{st['s3_bucket']}/{a.dir}/runs") if s3 else \
        (str(d / "shards"), str(d / "runs"))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "MLFLOW_TRACKING_URI": st["mlflow_uri"],
           "RAY_DATA_DISABLE_PROGRESS_BARS": "1", **local.storage_env(st)}
    os.environ.update(local.storage_env(st))             # this process reads the run's results too
    if not (raw / "metadata").is_dir():
        sh([py, "-m", "data_service.synth", "--out", str(raw), "--n", str(a.n), "--seed", "0"], env)
    sh([py, "-m", "data_service.ingest", "--source", "ctrate", "--input", str(raw), "--out", str(shards),
        "--config", "configs/debug.yaml", "--no-progress"], env)
    run_name = f"demo-zero{a.zero}-{time.strftime('%Y%m%d-%H%M%S')}"
    commit = {"env_vars": {COMMIT_ENV: git_describe()}}   # the job's copy of the code has no .git
    sh([str(Path(py).parent / "ray"), "job", "submit", "--address", st["dashboard"], "--working-dir", ".",
        "--runtime-env-json", json.dumps(commit), "--",
        "python", "-m", "trainer.pretrain", "--config", "configs/debug.yaml",
        "--set", f"data.shards={shards}", "--set", f"train.output_dir={runs}",
        "--set", f"train.run_name={run_name}", "--set", f"train.steps={a.steps}",
        "--set", f"deepspeed.zero_stage={a.zero}", "--set", "ray.num_workers=2",
        "--set", f"tracking.mlflow_uri={st['mlflow_uri']}", "--set", "eval.enabled=true",
        "--set", "eval.tasks=[zeroshot,retrieval,probe,reportgen,segmentation]",
        "--set", "eval.poll_seconds=10"], env)
    from common import storage
    from evaluators.actor import Ledger

    run_dir = storage.join(runs, run_name)
    summary = json.loads(storage.read_text(storage.join(run_dir, "summary.json")))
    ckpts = [storage.name(c) for c in list_checkpoints(run_dir)]
    ledger = Ledger(storage.join(run_dir, "eval_ledger.jsonl")).results()
    from mlflow.tracking import MlflowClient

    hist = MlflowClient(st["mlflow_uri"]).get_metric_history(summary["mlflow_run_id"], "loss/loss")
    hist = sorted(hist, key=lambda m: m.step)
    print("\n==================== demo summary ====================")
    print(f"run dir        {run_dir}")
    print(f"steps          {summary['final_metrics'].get('step')} (ZeRO-{a.zero}, 2 workers)")
    if hist:
        print(f"loss           {hist[0].value:.3f} (step {hist[0].step}) -> {hist[-1].value:.3f} (step {hist[-1].step})")
    print(f"checkpoints    {', '.join(ckpts)}")
    for r in ledger:   # scored by the evaluator actor while the job ran
        m = r["metrics"]
        head = {k.split("/", 1)[1]: round(v, 3) for k, v in m.items()
                if k.endswith(("mean_auc", "i2t_R@1", "t2i_R@1", "mean_f1", "bleu4", "meteor", "rouge_l", "mean_dice"))}
        print(f"  eval {r['checkpoint']} {r['task']:12s} " + (f"FAILED: {r['error']}" if r.get("error") else str(head)))
    client = MlflowClient(st["mlflow_uri"])
    try:
        mv = client.get_model_version_by_alias(run_name, "best")
        print(f"registered     model '{run_name}' v{mv.version} (alias 'best') = {mv.tags.get('checkpoint')}, "
              f"{mv.tags.get('metric')}={mv.tags.get('value')}")
    except Exception as e:  # noqa: BLE001 - the summary reports it, the run is done
        print(f"registered     none ({type(e).__name__}: {str(e)[:120]})")
    print(f"eval artifacts {run_dir}/step_*/eval/ (tables, ROC curves, generated reports), "
          f"{run_dir}/metrics_over_checkpoints.png; in MLflow under eval/")
    run = client.get_run(summary["mlflow_run_id"])
    print(f"MLflow         {run_url(st['mlflow_uri'], run.info.experiment_id, run.info.run_id)}  (experiment 't3d', "
          "model-training view: the run's description, then charts from eval/)")
    if s3:
        print(f"object store   {st['s3_endpoint']}: shards {shards}, runs {runs}, MLflow artifacts "
              f"s3://{st['s3_bucket']}/mlartifacts (credentials: source {st['s3_env']})")
    print(f"Ray dashboard  {st['dashboard']}")
    print(f"took           {time.time() - t0:.0f} s;  stop the cluster with `make down`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
