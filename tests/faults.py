"""Faults the tests install: a training worker killed after a checkpoint, an evaluator that crashes.
They go in through the product's extension points (``trainer.loop.LoopCallback``,
``eval.watcher``), never through config keys of the product itself."""
from __future__ import annotations

import os
import time
from pathlib import Path

from evaluators.actor import EvalThread
from trainer.loop import LoopCallback


class KillWorkerAt(LoopCallback):
    """The last rank dies (``os._exit``) right after optimizer step ``step``, once per run folder,
    a few seconds after the step's checkpoint was reported (Ray registers it asynchronously)."""

    def __init__(self, step: int):
        self.step = step

    def on_step(self, run) -> None:
        if run.state["step"] != self.step or run.rank != run.world - 1:
            return
        from common import storage

        marker = storage.join(run.args.run_dir, f"failed_at_{self.step}")    # the run folder may be a URI
        if storage.exists(marker):
            return
        storage.write_text(marker, "injected failure")
        time.sleep(5)
        print(f"[test] rank {run.rank}: injected failure at step {self.step}", flush=True)
        os._exit(1)


class RecordResume(LoopCallback):
    """On resume, rank 0 writes what the engine holds then: the gathered fp32 weights
    (``resumed_weights.safetensors``) and the optimizer's step and per-group lr (``resumed.json``)."""

    def on_resume(self, run) -> None:
        import json

        from trainer.export import full_fp32_state_dict

        state = full_fp32_state_dict(run.engine)            # collective: every rank
        if run.rank != 0:
            return
        from safetensors.torch import save_file

        from common import storage

        d = storage.local_state_dir(run.args.run_dir)
        save_file({k: v.contiguous() for k, v in state.items()}, str(d / "resumed_weights.safetensors"))
        (d / "resumed.json").write_text(json.dumps({
            "global_steps": run.engine.global_steps, "world": run.world, "step": run.state["step"],
            "lr": [float(g["lr"]) for g in run.engine.optimizer.param_groups],
            "weight_decay": [float(g["weight_decay"]) for g in run.engine.optimizer.param_groups]}))


def crash_once(ck: Path, task: str) -> None:
    """The evaluator actor's process dies before its first task of the run (once)."""
    from common import storage

    marker = storage.join(storage.parent(str(ck)), "eval_crashed_once")
    if not storage.exists(marker):
        storage.write_text(marker, "crashed once")
        os._exit(1)


class CrashingEvalThread(EvalThread):
    """``eval.watcher=tests.faults:CrashingEvalThread``: the default watcher with ``crash_once``."""
    before_task = staticmethod(crash_once)


def encode_or_die(sd: dict, data):
    """``data_service.ingest.encode_one``, except that a study whose id contains 'crash' kills its
    worker process (as the kernel's OOM killer or a crashing reader would)."""
    from data_service.ingest import encode_one

    if "crash" in sd["id"]:
        os._exit(9)
    return encode_one(sd, data)
