"""Shard schema 2: every codec round-trips exactly, corrupt or lying members are named, and the
committed schema-1 shard (session 2's npz members) still reads through every reader."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from data_service import ingest
from data_service.shards import (
    CODECS,
    CorruptSample,
    decode_array,
    decode_sample,
    encode_array,
    encode_sample,
    iter_split,
    load_manifest,
)
from tests.conftest import REPO

V1 = REPO / "tests" / "data" / "shards_v1"


@pytest.mark.parametrize("codec", CODECS)
def test_codecs_round_trip_exactly(codec):
    a = np.random.default_rng(0).integers(-1024, 3071, (17, 9, 5)).astype(np.int16)
    m = (a > 0).astype(np.uint8)
    for x in (a, m):
        b = encode_array(x, codec)
        assert np.array_equal(decode_array(b, codec, x.shape, x.dtype), x)
        into = np.zeros((2, *x.shape), x.dtype)                   # decoded in place (the on-device loader's batch)
        row = into[1]
        assert decode_array(b, codec, x.shape, x.dtype, out=row) is row
        assert np.array_equal(into[1], x) and not into[0].any()
    with pytest.raises(ValueError, match=r"out: expected a C-contiguous int16 array of shape \(17, 9, 5\)"):
        decode_array(encode_array(a, codec), codec, a.shape, a.dtype, out=np.zeros((17, 9, 4), np.int16))
    if codec != "npz":
        with pytest.raises(ValueError, match="expected"):       # a member whose header claims another size
            decode_array(encode_array(a, codec), codec, (17, 9, 6), np.int16)


def test_sample_round_trip_and_corrupt_member_named():
    hu = np.full((6, 5, 4), -1000, np.int16)
    s = encode_sample("a.b", hu, "Findings: x.", {"split": "train"}, mask=np.ones_like(hu, np.uint8), codec="blosc2-lz4")
    assert s["__key__"] == "a_b" and {"ct.bin", "mask.bin", "report.txt", "meta.json"} <= set(s)
    d = decode_sample(s)
    assert np.array_equal(d["ct"], hu) and d["mask"].dtype == np.uint8 and d["meta"]["codec"] == "blosc2-lz4"
    s["ct.bin"] = s["ct.bin"][:20]
    with pytest.raises(CorruptSample, match=r"sample 'a_b': member 'ct.bin' is corrupt"):
        decode_sample(s)


def test_schema_1_shard_still_reads():
    man = load_manifest(V1)
    assert man["schema_version"] == 1
    got = {s["key"]: s for s in iter_split(V1, "train")}
    assert sorted(got) == ["v1_0", "v1_1"]
    for k, s in got.items():
        assert np.array_equal(s["ct"], np.load(V1 / f"{k}.npy")) and s["mask"].shape == (8, 8, 4)


def test_manifest_names_the_codec(phantom, tmp_path, debug_cfg):
    data = dataclasses.replace(debug_cfg.data, codec="zstd-shuffle")
    man = ingest.run("ctrate", str(phantom / "raw"), str(tmp_path / "z"), data, workers=2, progress=False)
    assert man["schema_version"] == 2 and man["codec"] == "zstd-shuffle"
    a = {s["key"]: s["ct"] for s in iter_split(phantom / "shards", "train")}
    b = {s["key"]: s["ct"] for s in iter_split(tmp_path / "z", "train")}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)     # the codec changes bytes only
