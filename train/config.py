"""Structured (dataclass) config schema for training, loaded with OmegaConf; unknown keys are errors."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ModelConfig:
    """Backbone: a named preset plus explicit overrides (None keeps the preset value)."""

    arch: str = "vit_small"
    patch_size: int = 14
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: Optional[float] = None
    ffn: Optional[str] = None
    reg_tokens: int = 0
    init_values: float = 1.0e-5
    drop_path_rate: float = 0.3
    # Backbone initialisation: "trunc_normal" (official: truncated normal std 0.02 for every Linear and
    # the position embedding, timm's ViT init) or "xavier" (a deliberate alternative for small budgets:
    # xavier-uniform Linear layers and patch projection, as MAE / LightlySSL; heads keep theirs).
    init: str = "trunc_normal"


@dataclass
class HeadConfig:
    """DINO and iBOT projection heads."""

    prototypes: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    ibot_separate_head: bool = False
    ibot_prototypes: int = 65536
    ibot_bottleneck_dim: int = 256
    freeze_last_layer_iters: int = 1250


@dataclass
class CropsConfig:
    """Multi-crop augmentation and the optional high-resolution phase."""

    global_size: int = 224
    local_size: int = 98
    n_local: int = 8
    global_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])
    # The official code's effective values (its GaussianBlur applies with 1 - p); the paper's
    # intended [1.0, 0.1, 0.5] is the documented alternative.
    blur_probs: list[float] = field(default_factory=lambda: [0.0, 0.9, 0.5])
    solarize_prob: float = 0.2
    high_res_global_size: int = 0
    high_res_local_size: int = 0
    high_res_iters: int = 0


@dataclass
class MaskConfig:
    """iBOT block masking of the global crops."""

    sample_probability: float = 0.5
    ratio_min: float = 0.1
    ratio_max: float = 0.5
    min_block_patches: int = 4
    min_aspect: float = 0.3


@dataclass
class LossConfig:
    """Loss weights, temperatures and teacher-centering mode."""

    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    centering: str = "centering"
    center_momentum: float = 0.9
    sinkhorn_iterations: int = 3
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_iters: int = 37500


@dataclass
class OptimConfig:
    """Iterations, batch, AdamW and the schedules."""

    iterations: int = 125000
    batch_size: int = 64
    base_lr: float = 0.004
    min_lr: float = 1.0e-6
    warmup_iters: int = 12500
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.992
    momentum_teacher_end: float = 1.0
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    clip_grad: float = 3.0
    beta1: float = 0.9
    beta2: float = 0.999


@dataclass
class DataConfig:
    """Training data source."""

    source: str = "shards"
    path: str = ""
    num_workers: int = 4
    max_decode_retries: int = 16


@dataclass
class DistConfig:
    """Multi-process training: strategy, precision of sharded params, non-finite policy."""

    strategy: str = "ddp"  # ddp (replicated student) or fsdp (FSDP2 fully_shard, for large backbones)
    activation_checkpointing: bool = False  # recompute block activations in backward (less memory)
    backend: str = "auto"  # auto = nccl on CUDA, gloo on CPU
    nonfinite: str = "stop"  # a NaN/Inf loss or gradient on any rank: stop (every rank) or skip the step
    max_skips: int = 5  # with nonfinite=skip, stop after this many consecutive skipped steps
    global_batch_size: int = 0  # 0 = optim.batch_size x world size (or the resumed checkpoint's global batch)


@dataclass
class DistillConfig:
    """Distillation from a frozen teacher (empty teacher = ordinary self-distillation with an EMA teacher)."""

    teacher: str = ""  # our training checkpoint (backbone + heads), teacher_backbone.pt, or a timm/dinov2 state dict


@dataclass
class TrainConfig:
    """Top-level training config."""

    output_dir: str = "runs/train"
    seed: int = 0
    device: str = "auto"
    eval_size: int = 224  # resolution stored in teacher_backbone.pt for k-NN/linear eval and embedding (0 = global crop size)
    checkpoint_every: int = 1000
    log_every: int = 10
    resume: bool = True
    progress: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    init_weights: str = ""  # start the backbone from a timm / dinov2 / teacher_backbone.pt / checkpoint file


def load_config(path: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Merge the schema defaults, a YAML file and `key.sub=value` overrides; validate and return.

    Unknown keys (in the file or the overrides) and wrongly typed values raise an error.
    """
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(TrainConfig)
    if path:
        cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    obj: TrainConfig = OmegaConf.to_object(cfg)
    validate(obj)
    return obj


def validate(cfg: TrainConfig) -> None:
    """Check value ranges that the type system cannot express."""
    if cfg.loss.centering not in ("centering", "sinkhorn_knopp"):
        raise ValueError("loss.centering must be 'centering' or 'sinkhorn_knopp'")
    if cfg.model.init not in ("trunc_normal", "xavier"):
        raise ValueError("model.init must be 'trunc_normal' (official) or 'xavier'")
    if cfg.data.source not in ("shards", "folder"):
        raise ValueError("data.source must be 'shards' or 'folder'")
    if len(cfg.crops.blur_probs) != 3:
        raise ValueError("crops.blur_probs needs 3 values: global1, global2, local")
    p = cfg.model.patch_size
    sizes = {"crops.global_size": cfg.crops.global_size, "crops.local_size": cfg.crops.local_size,
             "eval_size": cfg.eval_size}
    if cfg.crops.high_res_iters:
        sizes["crops.high_res_global_size"] = cfg.crops.high_res_global_size
        sizes["crops.high_res_local_size"] = cfg.crops.high_res_local_size
    for key, size in sizes.items():
        if size < 0 or size % p or (size == 0 and key not in ("eval_size", "crops.high_res_local_size")):
            raise ValueError(f"{key}={size} must be a positive multiple of the patch size {p} "
                             f"(the backbone would silently drop {size % p} px); e.g. {max(size // p, 1) * p} "
                             f"or {(size // p + 1) * p}")
    if cfg.dist.strategy not in ("ddp", "fsdp") or cfg.dist.nonfinite not in ("stop", "skip"):
        raise ValueError("dist.strategy must be ddp|fsdp and dist.nonfinite stop|skip")
    if cfg.dist.global_batch_size < 0:
        raise ValueError("dist.global_batch_size must be >= 0")
    if cfg.optim.iterations <= 0 or cfg.optim.batch_size <= 0:
        raise ValueError("optim.iterations and optim.batch_size must be positive")


def to_yaml(cfg: TrainConfig) -> str:
    """Serialise a config back to YAML (stored in the output dir and in checkpoints)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
