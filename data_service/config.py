"""The ``data`` section: canonical grid, ingest bounds, views and augmentation, loader resources."""
from __future__ import annotations

from dataclasses import dataclass, field

from common.config import ConfigError, check_choice, check_len, check_range


@dataclass
class ViewsConfig:
    """Multi-view crops for TMA (data_service.views)."""
    n: int = 2                                  # views per volume (0 = no views: CLIP only)
    size: list[int] = field(default_factory=lambda: [128, 128, 64])  # every view is resized to this
    scale: list[float] = field(default_factory=lambda: [0.75, 1.0])  # crop edge / volume edge (docs/design.md)
    flip_prob: float = 0.5                      # random flip per axis
    intensity_jitter: float = 0.1               # +- scale/shift of normalised intensity
    noise_std: float = 0.02                     # gaussian noise on normalised intensity
    on_device: bool = False                     # crop/resize the views (and shift the volume) on the trainer's
                                                # device: the loader ships each volume once (data_service.views)


@dataclass
class AugmentConfig:
    """Training-time augmentation of the whole volume and of the report (views have their own).
    Off by default; why each is on in configs/phantom.yaml is in docs/design.md."""
    shift: float = 0.0                          # random translation, fraction of each edge (air fills in)
    intensity_jitter: float = 0.0               # +- scale/shift of normalised intensity
    noise_std: float = 0.0                      # gaussian noise on normalised intensity
    sentence_keep: float = 1.0                  # each report sentence kept with this probability (>= 1 kept)
    sentence_shuffle: bool = False              # shuffle the sentences within each report section
    negated_sentences: bool = False             # each sentence's polarity flipped: a hard negative (tma.w_sentence)


@dataclass
class DataConfig:
    shards: str = "data/shards"                 # ingested webdataset shards (with manifest.json): a folder or a URI (s3://...)
    cache_dir: str = ""                         # remote shards: keep whole shards here ("" = read byte ranges, no copy)
    cache_mb: int = 4096                        # the cache's bound; least recently used shards are evicted
    spacing: list[float] = field(default_factory=lambda: [1.0, 1.0, 4.0])  # mm, RAS axes
    size: list[int] = field(default_factory=lambda: [256, 256, 128])       # voxels after pad/crop
    orientation: str = "RAS"
    hu_clip: list[float] = field(default_factory=lambda: [-1024.0, 3071.0])  # stored range (int16)
    hu_window: list[float] = field(default_factory=lambda: [-1000.0, 1000.0])  # model input window
    min_slices: int = 16                        # fewer slices than this -> rejected
    max_spacing_jitter_mm: float = 0.05         # DICOM: slice gaps differing more -> rejected
    max_gantry_tilt_deg: float = 30.0           # DICOM: larger tilt -> rejected, smaller -> corrected
    shard_size: int = 32                        # studies per shard
    codec: str = "blosc2-lz4"                   # CT/mask codec in the shards (benchmarks/codec.py chose it)
    test_fraction_of_valid: float = 0.5         # patients moved from valid to a test split (0 = none)
    workers: int = 0                            # ingest processes (0 = all cores)
    max_voxels: int = 2**30                     # header claims more -> rejected unread (too_large)
    worker_memory_mb: int = 8192                # each ingest worker's data limit (RLIMIT_DATA); 0 = none
    text_fallback_encoding: str = "cp1252"      # report bytes that are not UTF-8 are decoded with this
    views: ViewsConfig = field(default_factory=ViewsConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    max_text_tokens: int = 256                  # per report (model.text_unit=report)
    max_sentences: int = 32                     # per report (model.text_unit=sentence); the rest is cut
    max_sentence_tokens: int = 48               # per sentence
    loader_actors: int = 1                      # decode/crop tasks in flight per training worker (Ray Data task pool)
    loader_cpus_per_actor: float = 0.5          # CPUs per decode/crop task
    loader_chunk: int = 32                      # micro-steps per Ray Data execution (data_service/stream.py: why)
    object_store_mb: int = 1024                 # cap for the local Ray object store

    def validate(self, root=None) -> "DataConfig":
        for key, seq, n in (("data.spacing", self.spacing, 3), ("data.size", self.size, 3),
                            ("data.views.size", self.views.size, 3), ("data.views.scale", self.views.scale, 2),
                            ("data.hu_window", self.hu_window, 2), ("data.hu_clip", self.hu_clip, 2)):
            check_len(key, seq, n)
        if any(s <= 0 for s in self.spacing):
            raise ConfigError(f"data.spacing: must be positive, got {self.spacing!r}")
        if self.hu_window[1] <= self.hu_window[0]:
            raise ConfigError(f"data.hu_window: must be increasing, got {self.hu_window!r}")
        lo, hi = self.views.scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"data.views.scale: need 0 < lo <= hi <= 1, got {self.views.scale!r}")
        check_range("data.views.n", self.views.n, 0)
        check_range("data.augment.shift", self.augment.shift, 0.0, 0.5)
        check_range("data.augment.sentence_keep", self.augment.sentence_keep, 0.0, 1.0)
        check_range("data.min_slices", self.min_slices, 1)
        check_range("data.shard_size", self.shard_size, 1)
        check_range("data.loader_chunk", self.loader_chunk, 1)
        check_range("data.loader_actors", self.loader_actors, 1)
        check_range("data.max_voxels", self.max_voxels, 1)
        check_choice("data.codec", self.codec, ("npz", "zstd", "zstd-shuffle", "blosc2-lz4", "blosc2-zstd"))
        check_range("data.worker_memory_mb", self.worker_memory_mb, 0)
        check_range("data.cache_mb", self.cache_mb, 1)
        try:
            "".encode(self.text_fallback_encoding)
        except LookupError as e:
            raise ConfigError(f"data.text_fallback_encoding: {self.text_fallback_encoding!r} is not a codec: {e}") from e
        return self
