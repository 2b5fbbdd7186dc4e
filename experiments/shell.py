"""The one way the experiments run a step: the user's command, in the repo root, echoed first."""
from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sh(cmd: list[str], what: str, env: dict | None = None) -> None:
    """Run ``cmd`` (printed as ``$ ...``) from the repo root; a failed step ends the run with
    ``what: step failed (exit N): CMD``."""
    print("\n$ " + " ".join(cmd), flush=True)
    r = subprocess.run(cmd, cwd=REPO, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{what}: step failed (exit {r.returncode}): {' '.join(cmd)}")
