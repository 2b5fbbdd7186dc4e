"""End-to-end pretraining on CPU: Ray Train x DeepSpeed ZeRO 1/2/3, resume after a killed worker,
and the consolidated export loading into the plain model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.config import load_config
from data_service.shards import load_manifest
from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=8, include_dashboard=False, object_store_memory=300 * 2**20, log_to_driver=False)
    yield
    ray.shutdown()


def _cfg(phantom, out, name, **sets):
    base = {"data.shards": str(phantom / "shards"), "train.output_dir": str(out), "train.run_name": name,
            "train.batch_size": 2, "train.steps": 4, "train.checkpoint_every": 2, "train.log_every": 1,
            "train.warmup_steps": 1, "ray.num_workers": 2, "data.views.n": 2,
            "data.loader_chunk": 1}      # every micro-step its own Ray Data execution: the runs cross chunks
    base.update(sets)
    return load_config(REPO / "configs/debug.yaml", [f"{k}={v}" for k, v in base.items()])


def _fit(cfg, log_samples=False, callbacks=None):
    import ray.cloudpickle

    import tests.faults
    from trainer.pretrain import fit

    ray.cloudpickle.register_pickle_by_value(tests.faults)     # the workers need not import tests/
    result, run_dir, _, _ = fit(cfg, log_samples, callbacks)
    assert result.error is None, result.error
    return run_dir


def _samples(run_dir: Path) -> dict[int, list[str]]:
    """micro-step -> keys (both ranks); a re-done micro-step keeps its last record."""
    out: dict[tuple, list[str]] = {}
    for f in sorted(run_dir.glob("samples_rank*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            out[(f.name, r["micro"])] = r["keys"]
    merged: dict[int, list[str]] = {}
    for (_, m), keys in sorted(out.items()):
        merged.setdefault(m, []).extend(keys)
    return merged


def test_zero_stage_1_trains_exports_and_survives_a_crashing_evaluator(ray_local, phantom, tmp_path):
    """ZeRO-1 here; ZeRO-2 and ZeRO-3 are trained, exported and scored by the elastic-resume tests
    (``check_export``, on their last run). One run for two things (each run costs about a minute of
    Ray start-up here): the evaluator actor dies mid-scoring (once), Ray restarts it, it finishes
    every checkpoint, and the training job ends normally with all its steps and checkpoints."""
    run_dir = _fit(_cfg(phantom, tmp_path, "z1", **{"deepspeed.zero_stage": 1, "eval.enabled": "true",
                                                    "eval.tasks": "[retrieval]", "eval.poll_seconds": 1,
                                                    "eval.watcher": "tests.faults:CrashingEvalThread"}))
    assert (run_dir / "eval_crashed_once").is_file(), "the evaluator did not crash"
    ledger = [json.loads(x) for x in (run_dir / "eval_ledger.jsonl").read_text().splitlines()]
    assert sorted((r["checkpoint"], r["error"]) for r in ledger) == [("step_0000002", None), ("step_0000004", None)]
    check_export(run_dir / "step_0000004", phantom, stage=1, step=4, samples=4 * 2 * 2)


def check_export(ck: Path, phantom, stage: int, step: int, samples: int) -> None:
    """A checkpoint's export loads strictly into the plain model, holds trained weights, and scores."""
    from trainer.export import load_export

    state = json.loads((ck / "state.json").read_text())
    assert state["step"] == step and state["samples"] == samples
    model, tok, cfg, info = load_export(ck)              # strict load into the plain T3D
    assert info["step"] == step and cfg.deepspeed.zero_stage == stage
    with torch.no_grad():
        enc = tok(["Cardiomegaly is present."], return_tensors="pt")
        txt, _, _ = model.encode_text(enc["input_ids"], enc["attention_mask"])
    assert torch.isfinite(txt).all()
    # the export holds trained weights, not the initial ones
    from trainer.model import build_model

    torch.manual_seed(cfg.train.seed)
    init = build_model(cfg, len(tok)).state_dict()
    moved = [k for k, v in model.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, init[k])]
    assert len(moved) > 10
    # and the evaluators score it
    from evaluators.scoring import score_checkpoint

    r = score_checkpoint(ck, str(phantom / "shards"), ["retrieval"])
    n_test = load_manifest(phantom / "shards")["counts"]["written_by_split"]["test"]
    assert r["step"] == step and r["checkpoint"] == str(ck)
    assert {k for k in r["metrics"]} == {f"retrieval/{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10, 50, 100)
                                         if k <= n_test}


def test_resume_after_killed_worker_matches_uninterrupted(ray_local, phantom, tmp_path):
    """Both runs with the views cut and the volume shifted on the trainer (data.views.on_device;
    the loader-cut path resumes exactly in the elastic tests)."""
    from safetensors.torch import load_file

    device = {"data.views.on_device": "true", "data.augment.shift": 0.1}
    ref = _fit(_cfg(phantom, tmp_path, "ref", **device), log_samples=True)
    from tests.faults import KillWorkerAt

    cut = _fit(_cfg(phantom, tmp_path, "cut", **device, **{"ray.max_failures": 1}), log_samples=True,
               callbacks=[KillWorkerAt(2)])
    assert (cut / "failed_at_2").is_file(), "the fault was not injected"
    a, b = _samples(ref), _samples(cut)
    assert sorted(a) == sorted(b) == [0, 1, 2, 3]            # same micro-steps, none skipped
    for m in a:
        assert sorted(a[m]) == sorted(b[m]), f"micro-step {m} trained on other samples after resume"
        assert len(set(a[m])) == len(a[m]) == 4               # 2 ranks x batch 2, no repeats
    wa = load_file(str(ref / "step_0000004/export/model.safetensors"))
    wb = load_file(str(cut / "step_0000004/export/model.safetensors"))
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa if wa[k].dtype.is_floating_point)
    assert worst < 1e-4, f"resumed weights differ from uninterrupted run by {worst}"
    st = json.loads((cut / "step_0000004/state.json").read_text())
    assert st["step"] == 4 and st["micro"] == 4
    # a damaged newest checkpoint (its files no longer match the checksums written with it; here a
    # truncated optimizer partition) is passed over: the rerun resumes from step 2 and finishes
    from trainer.checkpoint import verify_checkpoint

    assert verify_checkpoint(ref / "step_0000004") is None
    victim = sorted((ref / "step_0000004").rglob("*optim_states.pt"))[0]
    victim.write_bytes(victim.read_bytes()[:1000])
    assert "bytes" in verify_checkpoint(ref / "step_0000004")
    for f in ref.glob("samples_rank*.jsonl"):
        f.unlink()
    again = _fit(_cfg(phantom, tmp_path, "ref", **device, **{"train.steps": 6}), log_samples=True)
    assert sorted(_samples(again)) == [2, 3, 4, 5]            # resumed at step 2 (micro-step 2), not 4
    st = json.loads((again / "step_0000006/state.json").read_text())
    assert st["step"] == 6 and st["micro"] == 6


@pytest.mark.parametrize("stage,worlds", [(2, (2, 1, 2)), (3, (1, 2, 1))])
def test_elastic_resume_across_world_sizes(ray_local, phantom, tmp_path, stage, worlds):
    """A run checkpointed by W workers continues on another number (DeepSpeed universal
    checkpoint): the weights the resumed engine holds are the saved ones, every param group keeps
    its own lr and weight decay, the optimizer step continues, and the data continue at the same
    sample: micro-step by micro-step the keys are the ``Plan``'s order at each world size."""
    from safetensors.torch import load_file

    from data_service.stream import Plan, build_index
    from tests.faults import RecordResume

    sets = {"deepspeed.zero_stage": stage, "train.checkpoint_every": 2, "train.text_lr_mult": 0.5}
    ends = (2, 4, 6)
    for i, (w, end) in enumerate(zip(worlds, ends)):
        run = _fit(_cfg(phantom, tmp_path, "el", **sets, **{"ray.num_workers": w, "train.steps": end}),
                   log_samples=True, callbacks=[RecordResume()])
        if i == 0:
            continue
        got = json.loads((run / "resumed.json").read_text())
        assert got["world"] == w and got["step"] == got["global_steps"] == ends[i - 1]
        saved = load_file(str(run / f"step_{ends[i - 1]:07d}/export/model.safetensors"))
        now = load_file(str(run / "resumed_weights.safetensors"))
        assert saved.keys() == now.keys()
        worst = max(float((saved[k].float() - now[k].float()).abs().max()) for k in saved)
        assert worst == 0.0, f"{worlds[i - 1]} -> {w} workers: resumed weights differ by {worst}"
        cfg = _cfg(phantom, tmp_path, "x")
        assert sorted(set(got["weight_decay"])) == [0.0, cfg.train.weight_decay], got   # groups kept apart
        assert all(lr > 0 for lr in got["lr"]) and len(set(got["lr"])) == 2, got       # text_lr_mult kept
        st = json.loads((run / f"step_{end:07d}/state.json").read_text())
        assert st["step"] == end and st["world"] == w
    # the data: what each micro-step trained on is the plan's order continued at the new world size
    plan = Plan(sorted(build_index(phantom / "shards", "train")), 2, cfg.train.seed)
    expected, pos = [], 0
    for w, end, start in zip(worlds, ends, (0,) + ends[:-1]):
        for pos, keys in plan.steps(w, pos, end - start):
            expected.append(sorted(keys))
    got = _samples(run)
    assert sorted(got) == list(range(ends[-1]))
    assert [sorted(got[m]) for m in range(ends[-1])] == expected
    # the last run's export (ZeRO-2 or ZeRO-3, the world changed twice) loads, moved, and scores
    check_export(run / f"step_{ends[-1]:07d}", phantom, stage, ends[-1], sum(len(k) for k in expected))
    if worlds[:2] == (2, 1):   # 6 train keys: epoch 1 is micro-step 1 (4 keys, 2 workers) + micro-step 2 (2, 1 worker)
        assert sorted(got[1] + got[2]) == plan.keys
