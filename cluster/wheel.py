"""`make wheel`: the project wheel and the locked environment's constraints, for cluster nodes.

    python -m cluster.wheel [--out dist]

Writes ``OUT/t3d-<version>-py3-none-any.whl`` (``pip wheel --no-deps .``) and ``OUT/constraints.txt``
(``pip freeze --exclude-editable`` of this environment, t3d itself left out, one ``name==version`` a
line, after a ``# python X.Y.Z`` line). ``cluster/node.sh install OUT`` installs from exactly these two files.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;+]+)(\+\S+)?$")


def constraints(freeze: str) -> list[str]:
    """``name==version`` lines of a ``pip freeze``. Local labels are dropped (``torch==2.13.0+cpu``
    -> ``torch==2.13.0``): a GPU node must get the CUDA build of the same version."""
    out = []
    for line in freeze.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = PIN.match(line)
        if not m:
            raise ValueError(f"pip freeze gave a line that is not name==version: {line!r} "
                             "(a package installed from a URL or path cannot be constrained)")
        if m.group(1).lower().replace("_", "-") != "t3d":
            out.append(f"{m.group(1)}=={m.group(2)}")
    return out


def build(out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("t3d-*.whl"):
        old.unlink()
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(out), str(REPO)], check=True)
    wheels = sorted(out.glob("t3d-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one t3d wheel in {out}, found {[w.name for w in wheels]}")
    freeze = subprocess.run([*pip, "freeze", "--exclude-editable"], check=True, capture_output=True, text=True).stdout
    cons = out / "constraints.txt"
    py = ".".join(map(str, sys.version_info[:3]))           # node.sh warns when a node's python differs
    cons.write_text(f"# python {py}\n" + "\n".join(constraints(freeze)) + "\n")
    return wheels[0], cons


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.wheel", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REPO / "dist"))
    a = p.parse_args(argv)
    whl, cons = build(Path(a.out).resolve())
    pins = [x for x in cons.read_text().splitlines() if not x.startswith("#")]
    print(f"{whl}\n{cons} ({len(pins)} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
