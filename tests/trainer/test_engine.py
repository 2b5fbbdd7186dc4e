"""trainer.engine's environment for DeepSpeed's JIT-built CPU op: one ninja for every process."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from trainer.engine import use_env_ninja


def test_the_interpreters_ninja_comes_first(monkeypatch, tmp_path):
    here = Path(sys.executable).parent
    if not (here / "ninja").is_file():
        pytest.skip(f"no ninja beside {sys.executable} (pip's ninja comes with DeepSpeed)")
    other = tmp_path / "bin"
    other.mkdir()
    (other / "ninja").write_text("#!/bin/sh\nexit 0\n")
    (other / "ninja").chmod(0o755)
    monkeypatch.setenv("PATH", f"{other}{os.pathsep}/usr/bin{os.pathsep}/bin")   # a system ninja first
    assert shutil.which("ninja") == str(other / "ninja")
    use_env_ninja()
    assert shutil.which("ninja") == str(here / "ninja")
    before = os.environ["PATH"]
    use_env_ninja()                                      # already first: PATH stays as it is
    assert os.environ["PATH"] == before
