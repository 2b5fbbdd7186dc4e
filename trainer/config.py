"""The trainer's sections: ``model``, ``tma``, ``restore``, ``train``, ``deepspeed``, ``ray``, ``tracking``.

``model.flavour`` is a named preset of sizes (torchtitan's flavours): ``debug`` (a 1 M-parameter
model for tests and CPU runs) or ``t3d`` (the paper's ResNet-50 + BERT-base). A size key given
explicitly wins over the flavour's value; the resolved sizes are what a run saves with its
checkpoints, so an export rebuilds exactly its model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from common.config import ConfigError, check_choice, check_range

FLAVOURS: dict[str, dict] = {
    "debug": dict(image_block="basic", image_layers=[1, 1, 1, 1], image_widths=[16, 32, 64, 128], conv1_size=3,
                  conv1_stride=2, no_max_pool=True, text_hidden=64, text_layers=2, text_heads=2,
                  text_intermediate=128, vocab_size=1000, embed_dim=64, local_dim=64),
    "t3d": dict(image_block="bottleneck", image_layers=[3, 4, 6, 3], image_widths=[64, 128, 256, 512], conv1_size=7,
                conv1_stride=2, no_max_pool=False, text_hidden=768, text_layers=12, text_heads=12,
                text_intermediate=3072, vocab_size=30522, embed_dim=512, local_dim=256),
}


@dataclass
class ModelConfig:
    flavour: str = "t3d"                        # a key of FLAVOURS: the sizes below default to its values
    image_block: Optional[str] = None           # "bottleneck" (ResNet-50) or "basic"
    image_layers: Optional[list[int]] = None
    image_widths: Optional[list[int]] = None
    conv1_size: Optional[int] = None
    conv1_stride: Optional[int] = None
    no_max_pool: Optional[bool] = None
    image_norm: str = "batch"                   # "batch" | "group" | "instance" (docs/design.md)
    image_pool: str = "mean"                    # global image feature over the last grid: "mean" | "max" | "gem" (p=3)
    input_windows: list[list[float]] = field(default_factory=list)  # extra HU windows as input channels (docs/design.md)
    input_range: Optional[list[float]] = None   # the HU range of the [0, 1] input: set from data.hu_window
    text_encoder: Optional[str] = None          # local dir of a HF BERT (e.g. MedCPT); None = random init
    text_hidden: Optional[int] = None
    text_layers: Optional[int] = None
    text_heads: Optional[int] = None
    text_intermediate: Optional[int] = None
    text_pool: str = "cls"                      # report embedding: "cls" token or masked "mean" of tokens
    text_unit: str = "report"                   # encode the "report" whole, or each "sentence" (docs/design.md)
    text_dropout: float = 0.1                   # BERT hidden/attention dropout
    vocab_size: Optional[int] = None            # for a tokenizer built from reports
    embed_dim: Optional[int] = None             # shared space
    local_dim: Optional[int] = None             # token/region space for TMA
    proj: str = "linear"                        # heads into the shared space: "linear" | "mlp"
    init_temperature: float = 0.07

    def validate(self, root=None) -> "ModelConfig":
        check_choice("model.flavour", self.flavour, tuple(FLAVOURS))
        for k, v in FLAVOURS[self.flavour].items():
            if getattr(self, k) is None:
                setattr(self, k, list(v) if isinstance(v, list) else v)
        check_choice("model.image_block", self.image_block, ("bottleneck", "basic"))
        check_choice("model.image_norm", self.image_norm, ("batch", "group", "instance"))
        check_choice("model.image_pool", self.image_pool, ("mean", "max", "gem"))
        check_choice("model.text_pool", self.text_pool, ("cls", "mean"))
        check_choice("model.text_unit", self.text_unit, ("report", "sentence"))
        check_choice("model.proj", self.proj, ("linear", "mlp"))
        if len(self.image_layers) != 4 or len(self.image_widths) != 4:
            raise ConfigError("model.image_layers / model.image_widths: need 4 entries each")
        if self.image_norm == "group" and any(w % 8 for w in self.image_widths):
            raise ConfigError(f"model.image_norm=group needs model.image_widths divisible by 8, got {self.image_widths}")
        check_range("model.text_dropout", self.text_dropout, 0.0, 0.9)
        data = getattr(root, "data", None)
        if data is not None or self.input_range is None:
            from data_service.config import DataConfig

            self.input_range = [float(v) for v in (data or DataConfig()).hu_window]
        lo, hi = self.input_range
        for w in self.input_windows:
            if len(w) != 2 or not lo <= float(w[0]) < float(w[1]) <= hi:
                raise ConfigError(f"model.input_windows: {w!r} must be [low, high] HU with "
                                  f"{lo:g} <= low < high <= {hi:g} (data.hu_window)")
        return self


@dataclass
class TMAConfig:
    """Text-informed Multi-view Alignment; see docs/design.md."""
    enabled: bool = True
    w_clip: float = 1.0                         # global CLIP InfoNCE
    w_sentence: float = 0.0                     # each report sentence <-> the volume (model.text_unit=sentence)
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
    local_space: str = "separate"               # regions/tokens: own heads ("separate") or the CLIP heads ("shared")
    text_grad: bool = True                      # local/consistency terms also train the text tower (docs/design.md)
    kernel: str = "auto"                        # "auto" | "torch" | "triton" (token-region attention)

    def validate(self, root=None) -> "TMAConfig":
        check_choice("tma.token_pool", self.token_pool, ("mean", "lse"))
        check_choice("tma.consistency_on", self.consistency_on, ("text_informed", "global"))
        check_choice("tma.local_space", self.local_space, ("separate", "shared"))
        check_choice("tma.kernel", self.kernel, ("auto", "torch", "triton"))
        for k in ("w_clip", "w_sentence", "w_local", "w_consistency"):
            check_range(f"tma.{k}", getattr(self, k), 0.0)
        for k in ("attn_temperature", "local_temperature", "student_temperature", "sinkhorn_epsilon"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"tma.{k}: must be > 0, got {getattr(self, k)!r}")
        check_range("tma.prototypes", self.prototypes, 1)
        unit = getattr(getattr(root, "model", None), "text_unit", None)
        if self.w_sentence > 0 and unit is not None and unit != "sentence":
            raise ConfigError(f"tma.w_sentence={self.w_sentence} needs model.text_unit=sentence, got {unit!r}")
        aug = getattr(getattr(root, "data", None), "augment", None)
        if getattr(aug, "negated_sentences", False) and (self.w_sentence <= 0 or unit != "sentence"):
            raise ConfigError("data.augment.negated_sentences feeds the sentence term: it needs tma.w_sentence > 0 "
                              f"and model.text_unit=sentence, got tma.w_sentence={self.w_sentence}, text_unit={unit!r}")
        return self


RESTORE_LOSSES = ("mse", "l1")


@dataclass
class RestoreConfig:
    """Text-informed image restoration (T3D v2's second pretext task); see docs/design.md. The input
    of the image encoder (the [0, 1] voxels of ``data.hu_window``) is corrupted, encoded again, and a
    light U-Net decoder on the encoder's stages restores it, its coarse levels attending to the
    report's tokens. Off by default: a disabled section adds no parameter to the model."""
    enabled: bool = False
    weight: float = 1.0                         # total = CLIP + TMA terms + weight x restore
    loss: str = "mse"                           # "mse" | "l1", counted on the corrupted voxels only
    mask_ratio: float = 0.6                     # fraction of the 3D blocks set to 0 (0 = no masking)
    block_size: Union[int, list[int]] = field(default_factory=lambda: [16, 16, 4])  # voxels of the model input (an int: a cube)
    noise_std: float = 0.0                      # gaussian noise on every voxel (0 = off)
    downsample: int = 1                         # average-pool by this factor and upsample back (1 = off)
    depth: int = 1                              # conv blocks per decoder level
    width: int = 64                             # channels of the coarsest decoder level (halved each level up, >= 8)
    text_informed: bool = True                  # coarse decoder levels cross-attend to the report's tokens
    heads: int = 4                              # cross-attention heads
    attn_levels: int = 1                        # how many of the coarsest decoder levels cross-attend (1-5)

    def level_width(self, k: int) -> int:
        """Channels of decoder level ``k`` (0: the encoder's last stage ... 4: its stem)."""
        return max(self.width >> k, 8)

    def validate(self, root=None) -> "RestoreConfig":
        check_choice("restore.loss", self.loss, RESTORE_LOSSES)
        check_range("restore.weight", self.weight, 0.0)
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"restore.mask_ratio: must be in [0, 1), got {self.mask_ratio!r}")
        b = [self.block_size] * 3 if isinstance(self.block_size, int) else list(self.block_size)
        if len(b) != 3 or any(v < 1 for v in b):
            raise ConfigError(f"restore.block_size: expected one or three voxel counts >= 1, got {self.block_size!r}")
        self.block_size = b
        check_range("restore.noise_std", self.noise_std, 0.0)
        check_range("restore.downsample", self.downsample, 1)
        check_range("restore.depth", self.depth, 1)
        check_range("restore.width", self.width, 8)
        check_range("restore.heads", self.heads, 1)
        check_range("restore.attn_levels", self.attn_levels, 1, 5)
        if self.text_informed:
            bad = [self.level_width(k) for k in range(self.attn_levels) if self.level_width(k) % self.heads]
            if bad:
                raise ConfigError(f"restore.heads={self.heads} must divide the width of every cross-attending "
                                  f"level (restore.width={self.width}, restore.attn_levels={self.attn_levels}: "
                                  f"widths {[self.level_width(k) for k in range(self.attn_levels)]})")
        if self.enabled and self.mask_ratio == 0 and self.noise_std == 0 and self.downsample == 1:
            raise ConfigError("restore.enabled=true corrupts nothing: set restore.mask_ratio > 0, "
                              "restore.noise_std > 0 or restore.downsample > 1")
        return self


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 1000
    batch_size: int = 8                         # per worker, per micro-step
    grad_accum: int = 1
    lr: float = 1e-4
    text_lr_mult: float = 1.0                   # the text tower's lr = lr x this
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_ratio: float = 0.01
    schedule: str = "cosine"                    # after warmup: "cosine" to min_lr_ratio | "wsd" (docs/design.md)
    decay_fraction: float = 0.2                 # wsd: the last fraction of the steps decays, the rest holds the peak
    grad_clip: float = 1.0
    precision: str = "auto"                     # "auto" (bf16 on GPU, fp32 on CPU) | "fp32" | "bf16"
    augment_kernel: str = "auto"                # device-side augmentation: "auto" | "torch" | "triton"
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 10
    health_batch: int = 16                      # fixed train studies for the representation-health metrics (0 = off)
    collapse_cosine: float = 0.995              # mean pairwise cosine above this (a random init sits near 0.98) ...
    collapse_patience: int = 5                  # ... for this many logs in a row: warn that the tower collapsed
    output_dir: str = "runs"
    run_name: str = "t3d"

    def validate(self, root=None) -> "TrainConfig":
        check_choice("train.precision", self.precision, ("auto", "fp32", "bf16"))
        check_choice("train.schedule", self.schedule, ("cosine", "wsd"))
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"train.decay_fraction must be in (0, 1], got {self.decay_fraction!r}")
        check_choice("train.augment_kernel", self.augment_kernel, ("auto", "torch", "triton"))
        for k in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every", "keep_checkpoints"):
            check_range(f"train.{k}", getattr(self, k), 1)
        check_range("train.warmup_steps", self.warmup_steps, 0)
        check_range("train.health_batch", self.health_batch, 0)
        if self.lr <= 0 or self.text_lr_mult <= 0:
            raise ConfigError(f"train.lr and train.text_lr_mult must be > 0, got {self.lr}, {self.text_lr_mult}")
        return self


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    offload_optimizer: bool = False

    def validate(self, root=None) -> "DeepSpeedConfig":
        check_choice("deepspeed.zero_stage", self.zero_stage, (0, 1, 2, 3))
        return self


@dataclass
class RayConfig:
    address: Optional[str] = None               # None: connect to RAY_ADDRESS or start local
    num_workers: int = 2                        # (the most, when elastic)
    min_workers: int = 0                        # > 0: elastic, between min_workers and num_workers
    placement_strategy: str = "PACK"            # "PACK" | "SPREAD" the workers over the nodes
    # custom Ray resources each worker also needs, e.g. {"train_slot": 1} on nodes started with
    # `cluster.local up --worker-slots 1`: on a CPU machine they stand in for GPUs, bounding the
    # workers a node can hold (so an elastic run shrinks when a node is lost)
    worker_resources: dict[str, float] = field(default_factory=dict)
    use_gpu: bool = False
    cpus_per_worker: float = 0.5
    max_failures: int = 1
    num_cpus: int = 0                           # logical CPUs for a locally started Ray (0 = auto)

    def validate(self, root=None) -> "RayConfig":
        check_range("ray.num_workers", self.num_workers, 1)
        check_range("ray.min_workers", self.min_workers, 0, self.num_workers)
        check_choice("ray.placement_strategy", self.placement_strategy, ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
        return self


@dataclass
class TrackingConfig:
    mlflow_uri: Optional[str] = None            # None: MLFLOW_TRACKING_URI or no tracking
    experiment: str = "t3d"
    parent_run_id: Optional[str] = None         # nests the run under this MLflow run (a sweep's trials)


SPACE_KINDS = ("choice", "grid", "uniform", "loguniform", "randint")


@dataclass
class SweepConfig:
    """A Ray Tune sweep over config keys (``python -m trainer.sweep``). ``space`` maps a dotted key
    to one distribution: ``{choice: [..]}``, ``{grid: [..]}``, ``{uniform: [lo, hi]}``,
    ``{loguniform: [lo, hi]}`` or ``{randint: [lo, hi]}`` (hi exclusive)."""
    name: str = "sweep"
    space: dict[str, dict[str, Any]] = field(default_factory=dict)
    search: str = "random"                      # "random" (grid keys expand) | "optuna" (TPE; no grid)
    scheduler: str = "asha"                     # "asha" | "none"
    metric: str = "valid/zeroshot/mean_auc"     # reported at every checkpoint; ASHA and the best trial use it
    mode: str = "max"
    num_samples: int = 4
    max_concurrent_trials: int = 2
    grace_checkpoints: int = 1                  # ASHA stops no trial before this many checkpoints
    reduction_factor: int = 2
    max_failures: int = 1                       # a failed trial is retried this many times
    driver_cpus: float = 0.1                    # the trial's own Tune actor (its workers ask ray.*)
    scorer: str = "evaluators.validate:sweep_scores"   # module:function(export dir, shards) -> metrics
    seed: int = 0                               # the search's random state

    def validate(self, root=None) -> "SweepConfig":
        check_choice("sweep.search", self.search, ("random", "optuna"))
        check_choice("sweep.scheduler", self.scheduler, ("asha", "none"))
        check_choice("sweep.mode", self.mode, ("max", "min"))
        for k in ("num_samples", "max_concurrent_trials", "grace_checkpoints", "reduction_factor"):
            check_range(f"sweep.{k}", getattr(self, k), 1)
        check_range("sweep.max_failures", self.max_failures, 0)
        if self.driver_cpus <= 0:
            raise ConfigError(f"sweep.driver_cpus: must be > 0 (Ray rejects a zero request), got {self.driver_cpus}")
        for key, spec in self.space.items():
            check_space(key, spec, root, grid_ok=self.search == "random")
        return self


def check_space(key: str, spec: dict[str, Any], root, grid_ok: bool = True) -> None:
    """One search-space entry: a known config key, one known distribution, a non-empty range."""
    where = f"sweep.space['{key}']"
    if key.startswith("sweep."):
        raise ConfigError(f"{where}: the sweep section itself cannot be swept")
    if root is not None:
        node = root
        for part in key.split("."):
            if not hasattr(node, part) or isinstance(getattr(node, part), dict):
                raise ConfigError(f"{where}: unknown config key '{key}'")
            node = getattr(node, part)
        if hasattr(node, "__dataclass_fields__"):
            raise ConfigError(f"{where}: '{key}' is a section; sweep one of its keys")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: expected one of {list(SPACE_KINDS)} with its values, got {spec!r}")
    (kind, values), = spec.items()
    check_choice(f"{where} kind", kind, SPACE_KINDS)
    if kind == "grid" and not grid_ok:
        raise ConfigError(f"{where}: grid is not supported with sweep.search=optuna; use choice")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {kind} needs a non-empty list, got {values!r}")
    if kind in ("uniform", "loguniform", "randint"):
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"{where}: {kind} needs [low, high] numbers, got {values!r}")
        lo, hi = values
        if not lo < hi:
            raise ConfigError(f"{where}: empty range [{lo}, {hi}]")
        if kind == "loguniform" and lo <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0, got {lo}")
        if kind == "randint" and not (isinstance(lo, int) and isinstance(hi, int)):
            raise ConfigError(f"{where}: randint needs integer bounds, got {values!r}")
