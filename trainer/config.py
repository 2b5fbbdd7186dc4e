"""Typed configuration shared by every entry point (data_service, trainer, evaluators, cluster).

One tree of dataclasses, loaded from YAML and overridden with ``--set section.key=value``.
Unknown keys and wrong types raise ``ConfigError`` naming the key and the closest valid one.
Nothing here imports torch, Ray or DeepSpeed.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key."""


FINDINGS: tuple[str, ...] = (
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema",
    "Atelectasis", "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
    "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
    "Interlobular septal thickening",
)
"""The 18 CT-RATE abnormality labels, in the benchmark's order."""


@dataclass
class ViewsConfig:
    """Multi-view crops for TMA (data_service.views)."""
    n: int = 2                                  # views per volume (0 = no views: CLIP only)
    size: list[int] = field(default_factory=lambda: [128, 128, 64])  # every view is resized to this
    scale: list[float] = field(default_factory=lambda: [0.4, 0.7])   # crop edge / volume edge
    flip_prob: float = 0.5                      # random flip per axis
    intensity_jitter: float = 0.1               # +- scale/shift of normalised intensity
    noise_std: float = 0.02                     # gaussian noise on normalised intensity


@dataclass
class DataConfig:
    shards: str = "data/shards"                 # ingested webdataset shards (with manifest.json)
    spacing: list[float] = field(default_factory=lambda: [1.0, 1.0, 4.0])  # mm, RAS axes
    size: list[int] = field(default_factory=lambda: [256, 256, 128])       # voxels after pad/crop
    orientation: str = "RAS"
    hu_clip: list[float] = field(default_factory=lambda: [-1024.0, 3071.0])  # stored range (int16)
    hu_window: list[float] = field(default_factory=lambda: [-1000.0, 1000.0])  # model input window
    min_slices: int = 16                        # fewer slices than this -> rejected
    max_spacing_jitter_mm: float = 0.05         # DICOM: slice gaps differing more -> rejected
    max_gantry_tilt_deg: float = 30.0           # DICOM: larger tilt -> rejected, smaller -> corrected
    shard_size: int = 32                        # studies per shard
    test_fraction_of_valid: float = 0.5         # patients moved from valid to a test split (0 = none)
    workers: int = 0                            # ingest processes (0 = all cores)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    max_text_tokens: int = 256
    loader_actors: int = 1                      # Ray Data actor pool size for decode/crop
    loader_cpus_per_actor: float = 0.5
    object_store_mb: int = 1024                 # cap for the local Ray object store


@dataclass
class ModelConfig:
    flavour: str = "t3d"                        # "t3d" (paper) or "debug" (tiny, tests)
    image_layers: list[int] = field(default_factory=lambda: [3, 4, 6, 3])
    image_widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    image_block: str = "bottleneck"             # "bottleneck" (ResNet-50) or "basic"
    conv1_size: int = 7
    conv1_stride: int = 2
    no_max_pool: bool = False
    image_norm: str = "batch"                   # "batch" | "group" | "instance" (see docs/design.md)
    text_encoder: Optional[str] = None          # local dir of a HF BERT (e.g. MedCPT); None = random init
    text_hidden: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate: int = 3072
    text_pool: str = "cls"                      # report embedding: "cls" token or masked "mean" of tokens
    text_dropout: float = 0.1                   # BERT hidden/attention dropout (random-init encoder)
    proj: str = "linear"                        # heads into the shared space: "linear" | "mlp"
    vocab_size: int = 30522                     # for a tokenizer built from reports
    embed_dim: int = 512                        # shared space
    local_dim: int = 256                        # token/region space for TMA
    init_temperature: float = 0.07


@dataclass
class TMAConfig:
    """Text-informed Multi-view Alignment; see docs/design.md."""
    enabled: bool = True
    w_clip: float = 1.0                         # global CLIP InfoNCE
    w_local: float = 1.0                        # view <-> report token-region alignment
    w_consistency: float = 0.5                  # cross-view prototype consistency
    attn_temperature: float = 0.1               # token -> region attention softmax
    local_temperature: float = 0.1              # InfoNCE on token-region similarities
    token_pool: str = "mean"                    # "mean" or "lse" aggregation over tokens
    lse_gamma: float = 5.0
    prototypes: int = 64
    student_temperature: float = 0.1
    sinkhorn_iters: int = 3
    sinkhorn_epsilon: float = 0.05
    consistency_on: str = "text_informed"       # "text_informed" or "global"
    kernel: str = "auto"                        # "auto" | "torch" | "triton" (token-region attention)


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 1000
    batch_size: int = 8                         # per worker, per micro-step
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0
    precision: str = "auto"                     # "auto" (bf16 on GPU, fp32 on CPU) | "fp32" | "bf16"
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 10
    output_dir: str = "runs"
    run_name: str = "t3d"
    fail_at_step: int = -1                      # fault injection for tests (-1 = never)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    offload_optimizer: bool = False


@dataclass
class RayConfig:
    address: Optional[str] = None               # None: connect to RAY_ADDRESS or start local
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5
    max_failures: int = 1
    num_cpus: int = 0                           # logical CPUs for a locally started Ray (0 = auto)


EVAL_TASKS = ("zeroshot", "retrieval", "probe", "reportgen", "segmentation")


@dataclass
class EvalConfig:
    enabled: bool = False                       # evaluator actor alongside the training job
    tasks: list[str] = field(default_factory=lambda: list(EVAL_TASKS))
    every_n_checkpoints: int = 1
    poll_seconds: float = 15.0
    split_threshold: str = "valid"
    split_test: str = "test"
    bootstrap: int = 200
    cpus: float = 0.5
    gpus: float = 0.0                           # the evaluator actor's GPU share (tasks use it when > 0)
    seg_steps: int = 30                         # fine-tuning steps, pretrained and random init alike
    seg_classes: list[str] = field(default_factory=lambda: ["lung", "heart", "aorta", "bone"])  # mask value i+1
    seg_roi: list[int] = field(default_factory=list)   # train on random crops, infer by sliding window; [] = whole
    seg_lr: float = 1e-3
    reportgen_steps: int = 60
    reportgen_lr: float = 1e-3
    best_metric: str = "zeroshot/mean_auc"       # higher is better; its best checkpoint is registered
    registry_name: str = ""                      # MLflow registered model ("" = train.run_name)
    crash_once: bool = False                    # fault injection for tests: the evaluator actor dies once


@dataclass
class TrackingConfig:
    mlflow_uri: Optional[str] = None            # None: MLFLOW_TRACKING_URI or no tracking
    experiment: str = "t3d"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tma: TMAConfig = field(default_factory=TMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "Config":
        _check_choice("model.flavour", self.model.flavour, ("t3d", "debug"))
        _check_choice("model.image_block", self.model.image_block, ("bottleneck", "basic"))
        _check_choice("tma.token_pool", self.tma.token_pool, ("mean", "lse"))
        _check_choice("tma.consistency_on", self.tma.consistency_on, ("text_informed", "global"))
        _check_choice("tma.kernel", self.tma.kernel, ("auto", "torch", "triton"))
        _check_choice("train.precision", self.train.precision, ("auto", "fp32", "bf16"))
        _check_choice("deepspeed.zero_stage", self.deepspeed.zero_stage, (0, 1, 2, 3))
        for key, seq, n in (("data.spacing", self.data.spacing, 3), ("data.size", self.data.size, 3),
                            ("data.views.size", self.data.views.size, 3),
                            ("data.views.scale", self.data.views.scale, 2),
                            ("data.hu_window", self.data.hu_window, 2)):
            if len(seq) != n:
                raise ConfigError(f"{key}: expected {n} values, got {seq!r}")
        if any(s <= 0 for s in self.data.spacing):
            raise ConfigError(f"data.spacing: must be positive, got {self.data.spacing!r}")
        lo, hi = self.data.views.scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"data.views.scale: need 0 < lo <= hi <= 1, got {self.data.views.scale!r}")
        if self.train.batch_size < 1:
            raise ConfigError(f"train.batch_size: must be >= 1, got {self.train.batch_size}")
        if len(self.model.image_layers) != 4 or len(self.model.image_widths) != 4:
            raise ConfigError("model.image_layers / model.image_widths: need 4 entries each")
        for t in self.eval.tasks:
            _check_choice("eval.tasks", t, EVAL_TASKS)
        if self.eval.seg_roi and len(self.eval.seg_roi) != 3:
            raise ConfigError(f"eval.seg_roi: expected [] or 3 values, got {self.eval.seg_roi!r}")
        if not self.eval.seg_classes:
            raise ConfigError("eval.seg_classes: need at least one class name")
        if self.eval.every_n_checkpoints < 1:
            raise ConfigError(f"eval.every_n_checkpoints: must be >= 1, got {self.eval.every_n_checkpoints}")
        return self


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check ``value`` against annotation ``tp``; returns (ok, coerced value)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return True, None
        for arg in typing.get_args(tp):
            if arg is not type(None):
                ok, v = _type_ok(value, arg)
                if ok:
                    return True, v
        return False, value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return False, value
        (arg,) = typing.get_args(tp)
        out = []
        for item in value:
            ok, v = _type_ok(item, arg)
            if not ok:
                return False, value
            out.append(v)
        return True, out
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {names}"
            raise ConfigError(f"unknown config key '{full}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _from_dict(tp, value, full + ".")
            continue
        ok, coerced = _type_ok(value, tp)
        if not ok:
            tname = getattr(tp, "__name__", str(tp)).replace("typing.", "")
            raise ConfigError(f"config key '{full}': expected {tname}, got {value!r} "
                              f"({type(value).__name__})")
        kwargs[key] = coerced
    return cls(**kwargs)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(item: str) -> dict[str, Any]:
    """``a.b.c=value`` -> {"a": {"b": {"c": value}}}; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    node: dict[str, Any] = {}
    cur = node
    parts = key.strip().split(".")
    for p in parts[:-1]:
        cur[p] = {}
        cur = cur[p]
    cur[parts[-1]] = value
    return node


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                extra: dict[str, Any] | None = None) -> Config:
    """Load YAML ``path`` (or defaults), apply a dict then ``--set`` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
        data = loaded
    if extra:
        data = _merge(data, extra)
    for item in overrides or []:
        data = _merge(data, parse_override(item))
    return _from_dict(Config, data, "").validate()


def config_from_dict(data: dict[str, Any]) -> Config:
    return _from_dict(Config, data, "").validate()


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def add_config_args(parser) -> None:
    """Add ``--config`` and ``--set`` to an argparse parser."""
    parser.add_argument("--config", default=None, help="YAML preset (configs/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config key, e.g. train.steps=10")
