"""`make sweep-demo`: phantoms, ingest, then a 4-trial Ray Tune sweep (configs/sweep_phantom.yaml).

    python -m experiments.sweep_demo [--n 120] [--resume]

Logs to MLflow when MLFLOW_TRACKING_URI is set (e.g. after `make up`).
"""
from __future__ import annotations

import argparse
import sys
import time

from experiments import shell
from experiments.shell import REPO

CONFIG = REPO / "configs" / "sweep_phantom.yaml"



def sh(cmd: list[str]) -> None:
    shell.sh(cmd, "sweep-demo")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.sweep_demo", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=120, help="phantoms (a third held out)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    a = p.parse_args(argv)
    t0 = time.time()
    py = sys.executable
    raw, shards = REPO / "data/sweep-demo/raw", REPO / "data/sweep-demo/shards"
    if not (raw / "metadata").is_dir():
        sh([py, "-m", "data_service.synth", "--out", str(raw), "--n", str(a.n), "--seed", "0",
            "--valid-fraction", "0.3333", "--workers", "2"])
    sh([py, "-m", "data_service.ingest", "--source", "ctrate", "--input", str(raw), "--out", str(shards),
        "--config", str(CONFIG), "--no-progress"])
    sh([py, "-m", "trainer.sweep", "--config", str(CONFIG), "--set", f"data.shards={shards}"]
       + (["--resume"] if a.resume else []))
    print(f"\nsweep-demo took {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
