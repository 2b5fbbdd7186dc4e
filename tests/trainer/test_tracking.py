"""Metrics a run could not send before it stopped reach MLflow without a resume (``send_spool``)."""
from __future__ import annotations

from trainer.tracking import Tracker, send_spool


class FakeClient:
    """``log_batch`` as MlflowClient's; raises while ``down``."""

    def __init__(self, down: bool = False):
        self.down, self.sent = down, []

    def log_batch(self, run_id, metrics=()):
        if self.down:
            raise TimeoutError("read timed out")
        self.sent += [(run_id, m.key, m.value, m.step) for m in metrics]


def test_spooled_metrics_are_sent_by_the_driver_after_the_run(tmp_path):
    spool = tmp_path / "spool.jsonl"
    down = FakeClient(down=True)
    t = Tracker(None, "run1", spool, client=down)
    t.log({"loss/loss": 2.0}, 1)
    t.log({"loss/loss": 1.5, "lr": float("nan")}, 2)       # non-finite values are not queued
    assert t.close(timeout=0.5) == 2 and spool.is_file()    # server away at the end: spooled, not lost

    assert send_spool(None, "run1", spool, timeout=0.5, client=FakeClient(down=True)) == 2
    assert len(spool.read_text().splitlines()) == 2        # still away: kept for the next try

    up = FakeClient()
    assert send_spool(None, "run1", spool, timeout=5, client=up) == 0
    assert sorted(up.sent) == [("run1", "loss/loss", 1.5, 2), ("run1", "loss/loss", 2.0, 1)]
    assert not spool.exists()
    assert send_spool(None, "run1", spool, client=up) == 0 and len(up.sent) == 2   # nothing twice


def test_send_spool_without_tracking_is_a_no_op(tmp_path):
    spool = tmp_path / "spool.jsonl"
    spool.write_text('["loss/loss", 1.0, 0, 1]\n')
    assert send_spool(None, None, spool) == 0 and spool.is_file()
