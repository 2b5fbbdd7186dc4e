"""`make test` runs under pytest-xdist with the slow end-to-end tests on one worker, one after another
(tests/conftest.py marks them ``xdist_group("slow")``; ``--dist loadgroup``). A pytest or xdist upgrade
that loses the grouping (pytest 9.2 with xdist 3.8 did) would silently run two Ray clusters at once."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import REPO


def test_slow_tests_share_one_worker(tmp_path):
    (tmp_path / "conftest.py").write_text("from tests.conftest import pytest_collection_modifyitems  # noqa: F401\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: end to end\n")
    for f in "abcd":
        body = "import pytest\n" + ("pytestmark = pytest.mark.slow\n" if f in "bd" else "")
        (tmp_path / f"test_{f}.py").write_text(body + "".join(f"def test_{f}{i}(): pass\n" for i in range(3)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v", "-p", "no:cacheprovider",
                        "--basetemp", str(tmp_path / "bt"), str(tmp_path)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ran = re.findall(r"\[(gw\d)\] .*PASSED .*test_(\w)\d", r.stdout)
    assert len(ran) == 12, r.stdout[-3000:]
    assert len({w for w, f in ran if f in "bd"}) == 1, f"the slow tests ran on several workers: {ran}"
