"""Embed one CT volume and print its 18 zero-shot finding probabilities.

    python -m evaluators.embed --checkpoint PATH --volume scan.nii.gz|DICOM_DIR [--out emb.npy]

The volume goes through the same reader, checks and canonical grid as ingest
(``data_service.preprocess.load_canonical`` with the checkpoint's config): any NIfTI orientation
or DICOM series works, and what ingest rejects is rejected here with the same reason.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


@torch.no_grad()
def embed_volume(checkpoint: str, volume: str, ensemble: bool = False) -> dict:
    from common.labels import FINDINGS
    from data_service.preprocess import load_canonical, to_model_input
    from evaluators.tasks.zeroshot import prompt_embeddings, zeroshot_probs
    from trainer.export import load_export

    model, tok, cfg, info = load_export(checkpoint)
    c = load_canonical(volume, cfg.data)                      # the same reader and checks as ingest
    img, _ = model.encode_image(to_model_input(torch.from_numpy(c.hu), cfg.data)[None, None])
    probs = zeroshot_probs(img, prompt_embeddings(model, tok, cfg, ensemble=ensemble),
                           float(model.logit_scale.detach().exp().clamp(max=100)))
    return {"embedding": img[0].numpy(), "probabilities": dict(zip(FINDINGS, map(float, probs[0]))),
            "step": info.get("step"), "geometry": c.geometry}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluators.embed", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--volume", required=True, help="a NIfTI file or a folder of one DICOM series")
    p.add_argument("--out", default=None, help="embedding .npy (default: <volume name>.t3d.npy here)")
    p.add_argument("--prompt-ensemble", action="store_true", help="average several rephrasings of each prompt")
    a = p.parse_args(argv)
    from data_service.io import Reject

    try:
        r = embed_volume(a.checkpoint, a.volume, a.prompt_ensemble)
    except Reject as e:
        raise SystemExit(f"{a.volume}: cannot use this volume: {e}")
    out = Path(a.out or Path(a.volume.rstrip("/")).name.replace(".nii.gz", "").replace(".nii", "") + ".t3d.npy")
    np.save(out, r["embedding"])
    print(f"embedding ({r['embedding'].shape[0]} dims, checkpoint step {r['step']}) -> {out}")
    print(f"{'finding':36s} P(present)")
    for f, pr in r["probabilities"].items():
        print(f"{f:36s} {pr:.3f}")
    out.with_suffix(".json").write_text(json.dumps({"probabilities": r["probabilities"], "step": r["step"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
