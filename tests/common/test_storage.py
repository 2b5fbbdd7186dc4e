"""common.storage against a real S3-compatible store on loopback (SeaweedFS): access control,
atomic writes, listing, the bounded cache, the preflight's errors, and shards in and out of it."""
from __future__ import annotations

import json

import numpy as np
import pytest

from common import storage
from tests.conftest import REPO


def test_store_refuses_anonymous_and_wrong_keys(s3):
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config
    from botocore.exceptions import ClientError

    anon = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1", config=Config(signature_version=UNSIGNED))
    wrong = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1",
                         aws_access_key_id=s3.access_key, aws_secret_access_key="not-the-secret")
    for client in (anon, wrong):
        for call in (lambda c: c.put_object(Bucket=s3.bucket, Key="x", Body=b"1"),
                     lambda c: c.list_objects_v2(Bucket=s3.bucket)):
            with pytest.raises(ClientError) as e:
                call(client)
            assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert s3.endpoint.startswith("http://127.0.0.1:")


def test_roundtrip_listing_and_atomic_output(s3):
    base = s3.uri("unit", "rt")
    storage.write_text(storage.join(base, "a.txt"), "hello")
    storage.write_bytes(storage.join(base, "sub", "b.bin"), b"\x00\x01\x02\x03")
    assert storage.read_text(storage.join(base, "a.txt")) == "hello"
    assert storage.read_range(storage.join(base, "sub", "b.bin"), 1, 2) == b"\x01\x02"
    assert storage.listdir(base) == ["a.txt", "sub"] and storage.isdir(storage.join(base, "sub"))
    assert storage.walk_files(base) == ["a.txt", "sub/b.bin"]
    assert storage.glob(base, "*.txt") == [storage.join(base, "a.txt")]
    storage.append_text(storage.join(base, "log.jsonl"), "1\n")
    storage.append_text(storage.join(base, "log.jsonl"), "2\n")
    assert storage.read_text(storage.join(base, "log.jsonl")) == "1\n2\n"
    with pytest.raises(RuntimeError):                     # a failed write leaves nothing behind
        with storage.output(storage.join(base, "half.bin")) as f:
            f.write(b"x" * 1000)
            raise RuntimeError("writer died")
    assert not storage.exists(storage.join(base, "half.bin"))
    assert storage.sha256(storage.join(base, "a.txt")) == storage.sha256(_local(s3, "hello"))


def _local(s3, text):
    p = storage.cache_root() / "t.txt"
    p.write_text(text)
    return p


def test_file_cache_is_bounded(s3, tmp_path):
    for i in range(4):
        storage.write_bytes(s3.uri("unit", "cache", f"f{i}"), bytes([i]) * 400_000)
    cache = storage.FileCache(tmp_path / "c", limit_mb=1)
    for i in range(4):
        assert cache.get(s3.uri("unit", "cache", f"f{i}")).read_bytes() == bytes([i]) * 400_000
    kept = list((tmp_path / "c").iterdir())
    assert sum(p.stat().st_size for p in kept) <= 2**20 and len(kept) == 2


def test_local_dir_fetched_by_two_processes_at_once(s3, monkeypatch):
    """Two ranks materialise the same remote tokenizer at once: the one that finishes second keeps
    the first one's copy (which that rank is already reading) and drops its own (the e2e run once
    lost a training attempt to a rank whose tokenizer folder the other rank had just replaced)."""
    src = s3.uri("unit", "tok")
    storage.write_text(storage.join(src, "vocab.txt"), "a\nb\n")
    real, seen = storage.download_dir, {}

    def racing(uri, tmp):                 # while this process downloads, another one finishes first
        real(uri, tmp)
        if not seen:
            seen["racing"] = True                # the other process's own download is a plain one
            seen["other"] = storage.local_dir(uri)
            seen["inode"] = (seen["other"] / "vocab.txt").stat().st_ino

    monkeypatch.setattr(storage, "download_dir", racing)
    got = storage.local_dir(src)
    assert got == seen["other"] and (got / "vocab.txt").read_text() == "a\nb\n"
    assert (got / "vocab.txt").stat().st_ino == seen["inode"]           # the other's copy, not replaced
    assert sorted(p.name for p in got.parent.iterdir()) == [got.name]   # and ours is gone
    # an interrupted older copy (no .complete) is replaced
    (got / ".complete").unlink()
    monkeypatch.setattr(storage, "download_dir", real)
    assert (storage.local_dir(src) / ".complete").is_file()


@pytest.mark.parametrize("fault", ["missing bucket", "wrong key", "unreachable endpoint"])
def test_bad_storage_fails_before_training_naming_the_uri(s3, phantom, monkeypatch, fault):
    """`trainer.pretrain` stops before Ray starts, with the URI and the reason in the message."""
    from trainer import pretrain

    shards, out = s3.uri("nope"), s3.uri("runs")
    if fault == "missing bucket":
        out = "s3://no-such-bucket/runs"
        shards = str(phantom / "shards")
        want = "bucket 'no-such-bucket' does not exist"
    elif fault == "wrong key":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        want = "credentials were refused"
    else:
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        want = "endpoint did not answer"
    monkeypatch.setattr(pretrain, "init_ray", lambda cfg: pytest.fail("Ray started despite bad storage"))
    with pytest.raises(SystemExit) as e:
        pretrain.main(["--config", str(REPO / "configs/debug.yaml"), "--set", f"data.shards={shards}",
                       "--set", f"train.output_dir={out}"])
    msg = str(e.value)
    assert want in msg and ("s3://no-such-bucket/runs" in msg if fault == "missing bucket" else shards in msg), msg


def test_ingest_and_stream_from_the_store(s3, phantom, debug_cfg, tmp_path):
    """Ingest to s3:// gives the same shards as to disk, a re-run skips them, and the loader reads
    samples by byte range (no copy) or through the bounded cache, identical to the local read."""
    import dataclasses

    from data_service import ingest
    from data_service.shards import iter_split, load_manifest
    from data_service.stream import DecodeCrop, Plan, build_index, loader_batch
    from trainer.pretrain import prepare_tokenizer

    uri = s3.uri("unit", "shards")
    man = ingest.run("ctrate", str(phantom / "raw"), uri, debug_cfg.data, workers=2, progress=False)
    ref = load_manifest(phantom / "shards")
    assert [(s["path"], s["sha256"]) for s in man["shards"]] == [(s["path"], s["sha256"]) for s in ref["shards"]]
    assert storage.isfile(storage.join(uri, "rejects.jsonl")) and load_manifest(uri)["counts"] == ref["counts"]
    again = ingest.run("ctrate", str(phantom / "raw"), uri, debug_cfg.data, workers=2, progress=False)
    assert again["counts"] == man["counts"]
    assert [s["key"] for s in iter_split(uri, "train", decode_ct=False)] == \
        [s["key"] for s in iter_split(phantom / "shards", "train", decode_ct=False)]

    cfg = dataclasses.replace(debug_cfg, data=dataclasses.replace(debug_cfg.data, shards=uri))
    tok = prepare_tokenizer(cfg, s3.uri("unit", "run"))        # trained on the reports read from the store
    assert storage.isfile(storage.join(tok, "tokenizer.json")) or storage.isfile(storage.join(tok, "vocab.txt"))
    remote, local = build_index(uri, "train"), build_index(phantom / "shards", "train")
    assert {k: v["members"] for k, v in remote.items()} == {k: v["members"] for k, v in local.items()}
    plan = Plan(sorted(local), 2, 0)
    triples = plan.rank_keys(0, 1, 0, 0, 2)
    want = DecodeCrop(debug_cfg.data, tok, 0)(loader_batch(local, triples))
    cached = dataclasses.replace(debug_cfg.data, cache_dir=str(tmp_path / "shard-cache"), cache_mb=64)
    for data in (debug_cfg.data, cached):
        got = DecodeCrop(data, tok, 0)(loader_batch(remote, triples))
        assert got["ok"].all(), got["error"]
        for k in ("image", "views", "params", "input_ids"):
            np.testing.assert_array_equal(got[k], want[k])
    assert len(list((tmp_path / "shard-cache").iterdir())) == 1          # one train shard, copied once
    assert json.loads(storage.read_text(storage.join(uri, "manifest.json")))["shards"]


def test_sweep_outputs_on_the_store(s3, debug_cfg):
    """A sweep's folder on s3://: its best configuration is written there and loads as a config."""
    from common.config import load_config
    from trainer import sweep

    cfg = load_config(REPO / "configs/sweep_phantom.yaml", [f"train.output_dir={s3.uri('unit', 'sw')}",
                                                           "sweep.name=tiny"])
    root = sweep.sweep_dir(cfg)
    assert root == s3.uri("unit", "sw", "sweeps", "tiny")
    values = {k: next(iter(spec.values()))[0] for k, spec in cfg.sweep.space.items()}
    rows = [{"trial": "a", **values, f"best {cfg.sweep.metric}": 0.7, "best step": 2,
             "run_dir": storage.join(root, "trials", "trial-a")}]
    best = sweep.best_outputs(rows, cfg, root)
    assert best["checkpoint"] == storage.join(root, "trials", "trial-a", "step_0000002")
    loaded = load_config(storage.join(root, "best_config.yaml"))
    assert loaded.sweep.space == {} and loaded.train.run_name == "tiny-best"
    assert loaded.tma.w_local == values["tma.w_local"]
