"""The checkpoint-evaluation dashboard as a user sees it: MLflow 3.17's run page, rendered by headless
Chromium against a test server holding a small run made by the project's own code. Screenshots are
kept under the test's tmp_path and copied to tests/artifacts/ (ignored by git)."""
from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.conftest import REPO

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
SHOTS = REPO / "tests" / "artifacts"
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH: `apt-get install chromium` "
                                                         "(Debian; `make test` installs it)")


class Page(HTMLParser):
    """What the test reads from a rendered DOM: links, chart sections and titles, the run description."""

    def __init__(self, html: str):
        super().__init__()
        self.links: list[str] = []
        self.sections: list[str] = []
        self.charts: list[str] = []             # the full metric name of each chart drawn
        self.note, self._in_note, self._want_section = "", 0, False
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])
        if tag == "h4" and a.get("title"):
            self.charts.append(a["title"])
        if a.get("data-testid") == "experiment-view-compare-runs-section-header":
            self._want_section = True
        if self._in_note or a.get("data-testid") == "note-editor-preview-content":
            self._in_note += 1

    def handle_endtag(self, tag):
        self._in_note = max(0, self._in_note - 1)

    def handle_data(self, data):
        if self._want_section and data.strip():
            self.sections.append(data.strip())
            self._want_section = False
        if self._in_note:
            self.note += data


def render(url: str, profile: Path, shot: Path | None = None) -> Page:
    """The DOM after MLflow's single-page app has loaded (a virtual-time budget lets it settle)."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--user-data-dir={profile}", "--virtual-time-budget=40000", "--window-size=1400,1800",
           "--run-all-compositor-stages-before-draw"]         # without it, charts wait for a frame that never comes
    cmd += [f"--screenshot={shot}"] if shot else []
    out = subprocess.run(cmd + ["--dump-dom", url], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    if shot:
        SHOTS.mkdir(exist_ok=True)
        shutil.copy(shot, SHOTS / shot.name)
    return Page(out.stdout)


@pytest.fixture(scope="module")
def run(mlflow_uri, tmp_path_factory):
    """A training run as the project makes one: experiment, run and description from
    ``trainer.pretrain``, training metrics through the ``Tracker``, checkpoint scores through the
    evaluator's ``log_result``, and the description the evaluator writes after them."""
    from mlflow.tracking import MlflowClient

    from common.config import load_config
    from evaluators.artifacts import log_result, plot_over_checkpoints
    from evaluators.run_note import refresh_run_note
    from trainer.pretrain import mlflow_run
    from trainer.tracking import Tracker

    tmp = tmp_path_factory.mktemp("dashboard")
    cfg = load_config(REPO / "configs" / "debug.yaml",
                      [f"data.shards={REPO / 'tests' / 'data' / 'shards_v1'}", "train.run_name=dashboard",
                       f"tracking.mlflow_uri={mlflow_uri}", "tracking.experiment=dashboard", "eval.enabled=true"])
    uri, run_id = mlflow_run(cfg, str(tmp), retries=0, preset="configs/debug.yaml")
    assert uri == mlflow_uri and run_id
    tracker = Tracker(uri, run_id)
    for step in range(1, 9):
        tracker.log({"loss/loss": 3 - step / 10, "loss/clip": 2 - step / 10, "lr": 1e-4, "data/corrupt_skipped": 0,
                     "health/image_cosine": 0.5, "health/image_eff_rank": 3.0}, step)
    assert tracker.close() == 0
    records = []
    for step, auc in ((4, 0.62), (8, 0.71)):
        m = {"zeroshot/mean_auc": auc, "zeroshot/auc/Emphysema": auc + 0.05, "zeroshot/auc_ci_lo/Emphysema": auc - 0.1,
             "zeroshot/auc_ci_hi/Emphysema": auc + 0.1, "probe/mean_auc": 0.6, "retrieval/i2t_R@5": 0.3,
             "retrieval/i2t_R@1": 0.1, "segmentation/mean_dice": 0.4, "segmentation/random_init/mean_dice": 0.3}
        log_result(uri, {"mlflow_run_id": run_id, "step": step, "metrics": m}, None)
        records.append({"checkpoint": f"step_{step:07d}", "task": "all", "step": step, "metrics": m})
    client = MlflowClient(uri)
    client.log_artifact(run_id, str(plot_over_checkpoints(records, tmp / "metrics_over_checkpoints.png")), "eval")
    refresh_run_note(client, run_id, records, "zeroshot/mean_auc", None)
    return uri, client.get_run(run_id).info.experiment_id, run_id


def test_run_page_shows_the_description_in_the_model_training_view(run, tmp_path):
    from mlflow.tracking import MlflowClient

    from trainer.dashboard import KIND, KIND_TAG, run_url

    uri, exp, run_id = run
    assert MlflowClient(uri).get_experiment(exp).tags[KIND_TAG] == KIND         # marked the way MLflow does
    page = render(run_url(uri, exp, run_id), tmp_path / "profile", tmp_path / "dashboard_overview.png")
    assert page.note.startswith("Best checkpoint step_0000008 (step 8): zeroshot/mean_auc = 0.710"), page.note
    assert "Run dashboard: configs/debug.yaml on " in page.note and "zero-shot AUC" in page.note
    assert "Emphysema" in page.note and "0.610–0.810" in page.note                 # the evaluator's CI
    assert "metrics over checkpoints" in page.note
    assert f"#/experiments/{exp}/runs" in page.links                              # model training: Runs
    assert not any(link.endswith("/evaluation-runs") for link in page.links)      # not GenAI's


def test_headline_charts_come_first(run, tmp_path):
    from trainer.dashboard import run_url

    uri, exp, run_id = run
    page = render(run_url(uri, exp, run_id, "model-metrics"), tmp_path / "profile",
                  tmp_path / "dashboard_model_metrics.png")
    assert page.sections[:2] == ["eval", "loss"], page.sections
    assert "eval/zeroshot_mean_auc" in page.charts[:5], page.charts        # drawn in the first section
    assert page.sections.index("task/zeroshot/auc") < page.sections.index("train/data"), page.sections


def test_without_the_workflow_the_ui_opens_genai(run, tmp_path):
    """What the issue saw: MLflow 3.17's UI opens an experiment in the browser's workflow type, GenAI
    by default, whatever the experiment's kind tag says; the links the project makes choose it."""
    uri, exp, run_id = run
    page = render(f"{uri}/#/experiments/{exp}/runs/{run_id}", tmp_path / "profile")
    assert any(link.endswith("/evaluation-runs") for link in page.links), page.links
