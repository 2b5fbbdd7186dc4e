"""The project's log: one format with the time and the rank, levels, --log-level, records seen by pytest's capture."""
from __future__ import annotations

import argparse
import re

import pytest

from common import log


@pytest.fixture(autouse=True)
def _restore_level(monkeypatch):
    monkeypatch.delenv(log.LEVEL_ENV, raising=False)
    yield
    log.configure("INFO")


def test_records_carry_the_rank_and_the_level(capsys, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setenv("RANK", "3")                  # a process group, where one is up, says instead
    rank = str(dist.get_rank()) if dist.is_initialized() else "3"
    logger = log.get("tests.x")
    logger.warning("disk %s", "full")
    logger.debug("hidden")
    assert re.fullmatch(rf"\[t3d \d\d:\d\d:\d\d rank {rank} WARNING\] disk full\n", capsys.readouterr().out)
    log.configure("debug")
    logger.debug("shown")
    assert re.fullmatch(rf"\[t3d \d\d:\d\d:\d\d rank {rank} DEBUG\] shown\n", capsys.readouterr().out)


def test_level_from_the_flag_or_the_environment(capsys, monkeypatch):
    p = argparse.ArgumentParser()
    log.add_level_arg(p)
    assert p.parse_args(["--log-level", "warning"]).log_level == "WARNING"
    log.configure(p.parse_args(["--log-level", "warning"]).log_level)
    log.get("tests.y").info("quiet")
    assert capsys.readouterr().out == ""
    import os

    assert os.environ[log.LEVEL_ENV] == "WARNING"        # what subprocesses and Ray workers start with
    monkeypatch.setenv(log.LEVEL_ENV, "ERROR")
    assert log.configure().level == 40
    with pytest.raises(ValueError, match="'loud'"):
        log.configure("loud")
