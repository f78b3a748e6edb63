"""Typed configuration: dataclasses are the schema, YAML holds values, ``a.b=value`` overrides.

Unknown keys and values of the wrong type fail at start-up naming the key. Durations, warm-up,
EMA half-life and cadences are counted in images seen, so a config means the same optimisation
on 1 or 64 GPUs; ``train.batch_size`` is the GLOBAL batch.
"""

from __future__ import annotations

import math
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from fmgen.base import FmgenError
from fmgen.core import (
    DSM_WEIGHTINGS,
    FINAL_STEPS,
    MODE_SCALE_RANGE,
    PATHS,
    PREDICTION_TYPES,
    REWEIGHTINGS,
    SAMPLERS,
    SAMPLING_GRIDS,
    SIGMA_REL_MAX,
    TIME_SAMPLINGS,
    GaussianPath,
    SamplingSpec,
    get_path,
)
from fmgen.core.losses import LOSS_NAMES, MEANFLOW


class ConfigError(FmgenError, ValueError):
    """A bad configuration key or value; the message names the key and the fix."""


class _Yaml12Loader(yaml.SafeLoader):
    """YAML with the 1.2 booleans only (true/false).

    PyYAML follows YAML 1.1, where yes/no/on/off are booleans too, so ``mixed_precision: no``
    and the override ``train.mixed_precision=no`` would arrive as False, not the string "no".
    A boolean option still accepts yes/no/on/off as words (see ``_coerce``).
    """


_BOOL_TAG = "tag:yaml.org,2002:bool"
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_BOOL_WORDS = {"yes": True, "on": True, "no": False, "off": False, "true": True, "false": False}


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


@dataclass
class DataConfig:
    source: str = "digits"  # digits | folder | hf | shards (prepared by fmgen) | webdataset (any)
    # prepared sources: the shard folder holding manifest.json. webdataset: a folder, a brace
    # pattern, URLs (pipe:CMD, file:, http://, https://), a list of them, or an index folder
    path: str | list[str] = "data/digits-16"
    source_path: str = ""  # image folder / save_to_disk folder / hub name for folder|hf
    image_column: str = "image"
    label_column: str = ""
    resolution: int = 16
    channels: int = 1
    hflip: bool = False
    num_workers: int = 0
    shuffle_buffer: int = 1000
    in_memory: bool = False  # read every sample once, then index a seeded global permutation
    # --- webdataset sources (shards fmgen did not write) ---
    manifest: str = ""  # an index (python -m fmgen.data index) or manifest: counts and classes
    image_key: str = ""  # the image member; "" = the first of jpg, jpeg, png, webp present
    label_key: str = "cls"  # integer label member; "" = no labels (unconditional)
    num_classes: int = 0  # classes of label_key when no index says (0 = from the index)
    caption_key: str = ""  # the caption member (e.g. txt): text models train on it
    # prepared digits: write a caption per image (.txt) from this template set of
    # fmgen.data.captions ("" = none; "digits": "a handwritten seven", ...)
    caption_templates: str = ""
    fit: str = "center-crop"  # images of another size: center-crop | resize | pad | none (refuse)


@dataclass
class PathConfig:
    name: str = "linear"  # linear | vp-cosine | vp-linear
    b0: float = 0.1  # vp-linear only
    b1: float = 20.0  # vp-linear only


@dataclass
class LossConfig:
    name: str = "cfm"  # cfm | dsm
    weighting: str = "beta2"  # dsm only: lambda(t)
    time_sampling: str = "uniform"  # uniform | logit-normal | mode (SD3's time samplings)
    t_min: float = 1e-4  # keeps conversions away from the singular ends
    loc: float = 0.0  # logit-normal only
    scale: float = 1.0  # logit-normal only
    mode_scale: float = 1.29  # mode only: SD3's s (> 0 favours mid t; 0 = uniform)
    # the loss's weight over t, as a weight on the data-prediction error |D - z|^2:
    # none (the loss as it is) | edm (SNR + 1 / sigma_data^2) | min-snr (min(SNR, gamma))
    reweight: str = "none"
    min_snr_gamma: float = 5.0  # min-snr only
    sigma_data: float = 0.5  # edm only: the data's standard deviation
    # EDM2's learned uncertainty: loss / exp(u(t)) + u(t), u a small network of t trained with
    # the model (a training head: in checkpoints, not in exports)
    uncertainty: bool = False
    # loss.name: meanflow (Geng et al. 2025): the model predicts the average velocity u(x, t, r);
    # (t, r) are two draws of time_sampling (loc, scale) sorted, and a share of rows has r = t
    meanflow_equal_share: float = 0.75  # the paper's best: 25% of rows with r != t
    meanflow_power: float = 1.0  # adaptive weight 1 / (err + c)^power (0: plain squared error)
    meanflow_c: float = 1.0e-3
    # classifier-free guidance folded into the target: v~ = w v + kappa u(c) + (1 - w - kappa)
    # u(null) on rows whose condition was kept (1, 0: none); sample such a model with guidance 1
    meanflow_guidance: float = 1.0
    meanflow_kappa: float = 0.0


@dataclass
class UNetConfig:
    """Options of ``model.type: unet`` (diffusers ``UNet2DModel``); checked by its builder."""

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    attention_levels: list[int] = field(default_factory=list)  # indices of blocks with attention
    attention_head_dim: int = 8
    dropout: float = 0.0
    norm_num_groups: int = 8


@dataclass
class DiTConfig:
    """Options of ``model.type: dit`` (diffusers ``DiTTransformer2DModel``); checked by its builder."""

    patch_size: int = 2  # tokens are patch_size x patch_size patches of the model's input
    depth: int = 4  # transformer blocks (diffusers: num_layers)
    width: int = 128  # token width = heads x head width (a multiple of 4 and of heads)
    heads: int = 4  # attention heads (diffusers: num_attention_heads)
    dropout: float = 0.0


@dataclass
class TextConfig:
    """Options of text conditioning (``model.text_encoder`` set)."""

    max_length: int = 64  # tokens per caption; longer captions are cut (with a warning)
    # frozen encoders: read the embeddings `prepare --text-encoder` wrote beside each image;
    # false encodes each batch's captions on the fly (same result to float16; small runs)
    precomputed: bool = True
    dtype: str = "float32"  # the frozen encoder's compute dtype: float32 | bfloat16 | float16
    # learned encoder (model.text_encoder: learned): a byte-level transformer trained with the model
    width: int = 128
    depth: int = 2
    heads: int = 4
    # exports copy a frozen encoder's folder up to this size (MB; 0 = never); a larger one is
    # named with its hash instead, and must stay where it is for sampling from prompts
    export_copy_mb: int = 4096


@dataclass
class ModelConfig:
    type: str = "unet"  # a backbone of fmgen.models.BACKBONES
    prediction_type: str = "velocity"  # velocity | eps | score | x0
    class_conditional: bool = True
    p_uncond: float = 0.1  # condition dropped to the null condition, per sample, for guidance
    # a local diffusers AutoencoderKL folder (save_pretrained layout): the model works in its
    # latent space, on shards prepared with `prepare --autoencoder`; "" = pixel space
    autoencoder: str = ""
    # "" = class labels or none; "learned" = a byte-level text encoder trained with the model; or
    # a local transformers encoder folder (CLIPTextModel, T5EncoderModel, ...) kept frozen.
    # Text models read the caption member data.caption_key.
    text_encoder: str = ""
    unet: UNetConfig = field(default_factory=UNetConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)


@dataclass
class OptimConfig:
    lr: float = 2e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_images: int = 5000
    grad_clip: float = 1.0  # 0 disables clipping
    fused: bool = False  # fused AdamW (CUDA and CPU): one kernel, no per-parameter host reads
    # after the warm-up: constant, or inverse-sqrt (EDM2: lr / sqrt(max(images / decay_images, 1)))
    schedule: str = "constant"
    decay_images: int = 0  # inverse-sqrt only: images seen before the decay starts (EDM2's t_ref)


@dataclass
class RepaConfig:
    """Representation alignment (REPA, Yu et al. 2025): a projection of an intermediate backbone
    feature is pulled towards a frozen feature network's features of the clean image."""

    # "" = off; a feature network of eval.feature_network's seam (dinov2:FOLDER,
    # module:FILE.py:FACTORY, torchscript:FILE.pt, digits-classifier, ...)
    feature_network: str = ""
    feature_network_path: str = ""  # its FOLDER / FILE, when not given inline
    weight: float = 0.5  # lambda of loss + lambda * (1 - cos): REPA's 0.5
    # the backbone module whose output is aligned (a name of backbone.named_modules());
    # "" = the U-Net's mid block, the DiT's block depth // 3
    layer: str = ""
    hidden: int = 256  # width of the 3-layer SiLU projection MLP


@dataclass
class EMAConfig:
    half_life_images: int = 20000  # EMA half-life counted in images seen
    use_warmup: bool = True  # diffusers' (1 + n) / (10 + n) ramp early in training
    # Post-hoc EMA (EDM2): power-function EMAs of these relative widths, snapshotted every
    # posthoc_every_images; `python -m fmgen.ema` then rebuilds the EMA of any sigma_rel in
    # (0, 0.2887). EDM2 tracks [0.05, 0.10]. Off by default: each profile is one more copy of the
    # weights in memory, and each snapshot one more copy per profile on disk, kept for good
    # (the disk used grows with the run's length; the start-up log says how much).
    posthoc_sigma_rels: list[float] = field(default_factory=list)
    posthoc_every_images: int = 2560  # ~train.total_images / 20 or more snapshots (EDM2: ~250)


@dataclass
class TrainConfig:
    run_dir: str = "runs/digits"
    batch_size: int = 128  # GLOBAL batch, across all processes and accumulation steps
    grad_accum: int = 1
    total_images: int = 56320
    mixed_precision: str = "no"  # no | bf16 | fp16
    seed: int = 0
    checkpoint_every_images: int = 25600
    keep_checkpoints: int = 2
    log_every_steps: int = 20
    sample_every_images: int = 0  # 0: only at the end
    compile: bool = False
    compile_check: bool = True  # compare compiled and eager gradients once before training
    max_nonfinite_steps: int = 10  # stop after this many non-finite losses in a row
    channels_last: bool = False
    cpu_threads: int = 0  # torch threads per process on a CPU; 0 = usable cores / processes - 1
    deterministic: bool = False  # torch.use_deterministic_algorithms for bit-exact tests
    dist_timeout_s: int = 300  # a collective waiting longer (a frozen or dead rank) fails the run
    stop_check_every_steps: int = 10  # how often the ranks agree on a stop signal (one all-reduce)


@dataclass
class SampleConfig:
    sampler: str = "heun"  # euler | heun | rk4 | sde | midpoint | dpm++2m | dpm++3m
    steps: int = 20
    # classifier-free guidance w of u_null + w (u_cond - u_null): 0 = the unconditional model
    # alone, 1 = the conditional model alone (no guidance), > 1 extrapolates away from the
    # unconditional prediction (stronger class adherence, less diversity)
    guidance: float = 2.0
    # guidance only at lo <= t <= hi (t: 0 noise, 1 data), the conditional prediction alone
    # elsewhere (Kynkaanniemi et al. 2024); [] = guidance at every t
    guidance_interval: list[float] = field(default_factory=list)
    per_class: int = 8  # grid rows are classes
    sde_sigma: float = 0.5  # sigma_t = sde_sigma * beta_t
    t_start: float = 0.0
    time_grid: str = "uniform"  # uniform | edm (Karras, in sigma = beta / alpha) | logsnr | list
    rho: float = 7.0  # edm grid: steps even in sigma^(1/rho)
    times: list[float] = field(default_factory=list)  # the list grid: steps + 1 times
    final_step: str = "denoise"  # denoise (the last step returns x0_hat) | solver
    churn: float = 0.0  # heun: EDM's S_churn (0 = off)
    churn_sigma_min: float = 0.0  # EDM's S_tmin, in sigma = beta / alpha
    churn_sigma_max: float | None = None  # EDM's S_tmax (null: no bound)
    churn_noise: float = 1.0  # EDM's S_noise
    # dpm++2m / dpm++3m below 15 steps: first order for the last step, at most second for the
    # others (diffusers' lower_order_final, extended: dpm++3m's third order loses there)
    lower_order_few_steps: bool = True
    # dpm++3m with guidance > 1 runs as dpm++2m (Lu et al. 2022's advice for guided sampling;
    # measured: its third order loses FD under guidance on a trained model, ties without)
    lower_order_guided: bool = True
    negative_prompt: str = ""  # text models: the prompt guidance steers away from ("" = null)
    prompts: list[str] = field(default_factory=list)  # text models: the grid's rows ([] = captions of the first batch)


@dataclass
class EvalConfig:
    fid_every_images: int = 0  # 0: no FID during training
    fid_num_samples: int = 1000
    # inception | digits-classifier | dinov2:FOLDER | module:FILE.py:FACTORY | torchscript:FILE.pt
    feature_network: str = "inception"
    feature_network_path: str = ""  # the FOLDER / FILE of dinov2, module, torchscript instead
    force_feature_network: bool = False  # score with a network trained on another data set
    precision_recall_k: int = 3  # k of the k-NN precision/recall beside FID (0 = none)
    inception_weights: str = ""  # local weights file for clusters without internet
    report: str = ""  # end-of-training report, a name of fmgen.eval.REPORTS ("" = none)
    report_samples: int = 500


@dataclass
class LoggingConfig:
    wandb: bool = True
    project: str = "fmgen"
    entity: str = ""
    name: str = ""
    mode: str = ""  # "" (W&B decides, WANDB_MODE honoured) | online | offline | disabled


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    path: PathConfig = field(default_factory=PathConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# Choices of the keys that the math and this module own, derived from their registries. Keys
# whose registries live in higher layers (model.type, data.source, eval.feature_network,
# eval.report) are checked by those layers (``fmgen.train.check_config`` runs every check).
CHOICES: dict[str, tuple[str, ...]] = {
    "path.name": tuple(PATHS),
    "loss.name": LOSS_NAMES,
    "loss.weighting": DSM_WEIGHTINGS,
    "loss.time_sampling": TIME_SAMPLINGS,
    "loss.reweight": REWEIGHTINGS,
    "optim.schedule": ("constant", "inverse-sqrt"),
    "model.prediction_type": PREDICTION_TYPES,
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "sample.sampler": tuple(SAMPLERS),
    "sample.time_grid": SAMPLING_GRIDS,
    "sample.final_step": FINAL_STEPS,
    "logging.mode": ("", "online", "offline", "disabled"),
    "text.dtype": ("float32", "bfloat16", "float16"),
}


# --- conversion of plain YAML values into the typed schema -------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _described(tp: Any) -> str:
    """``str`` -> "a string", ``list[int]`` -> "a list of integers", for error messages."""
    words = {str: "string", int: "integer", float: "number", bool: "true/false value"}
    if typing.get_origin(tp) is list:
        return f"a list of {words.get(typing.get_args(tp)[0], 'value')}s"
    return f"a {words.get(tp, _type_name(tp))}"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if len(args) == 1:
            return _coerce(value, args[0], key)
        for alternative in args:  # the first type that takes the value, e.g. str | list[str]
            try:
                return _coerce(value, alternative, key)
            except ConfigError:
                pass
        names = " or ".join(_described(a) for a in args)
        raise ConfigError(f"{key}: expected {names}, got {value!r} (quote values holding ': ')")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(item)}, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - schema bug


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in values:
        if key not in known:
            where = f"{prefix}{key}"
            raise ConfigError(
                f"unknown config key {where!r}; valid keys under "
                f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(known))}"
            )
    obj = cls()
    for f in fields(cls):
        if f.name not in values:
            continue
        v, tp, key = values[f.name], hints[f.name], f"{prefix}{f.name}"
        if is_dataclass(tp):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: expected a mapping of options, got {v!r}")
            setattr(obj, f.name, _build(tp, v, key + "."))
        else:
            setattr(obj, f.name, _coerce(v, tp, key))
    return obj


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.batch_size=64"`` -> ("train.batch_size", 64); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. train.seed=1)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has no key before '='")
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse the value ({e})") from None
    return key, value


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Load a YAML preset (or the defaults), apply dotted overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found; presets live in configs/")
        loaded = _load_yaml(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections")
        tree = loaded
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a Config saved with ``asdict`` (checkpoints, exported models)."""
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for p in dotted.split("."):
        obj = getattr(obj, p)
    return obj


def _numbers(obj: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    for f in fields(obj):
        v = getattr(obj, f.name)
        if is_dataclass(v):
            yield from _numbers(v, f"{prefix}{f.name}.")
        elif isinstance(v, float):
            yield f"{prefix}{f.name}", v
        elif isinstance(v, list):
            yield from (
                (f"{prefix}{f.name}[{i}]", x) for i, x in enumerate(v) if isinstance(x, float)
            )


def validate(cfg: Config) -> None:
    """Check values beyond their types; each error names the key and what would be valid."""
    for key, v in _numbers(cfg):
        if not math.isfinite(v):
            raise ConfigError(f"{key}: must be a finite number, got {v}")
    for key, valid in CHOICES.items():
        v = _get(cfg, key)
        if v not in valid:
            raise ConfigError(
                f"{key}: {v!r} is not valid; choose one of: {', '.join(map(repr, valid))}"
            )
    positive = [
        "data.resolution",
        "train.batch_size",
        "train.grad_accum",
        "train.total_images",
        "train.checkpoint_every_images",
        "train.log_every_steps",
        "train.keep_checkpoints",
        "sample.steps",
        "sample.per_class",
        "eval.report_samples",
        "eval.fid_num_samples",
        "optim.eps",
        "ema.half_life_images",
        "ema.posthoc_every_images",
        "train.dist_timeout_s",
        "train.stop_check_every_steps",
        "text.width",
        "text.depth",
        "text.heads",
    ]
    for key in positive:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be > 0, got {_get(cfg, key)}")
    non_negative = [
        "data.num_workers",
        "optim.warmup_images",
        "optim.grad_clip",
        "optim.weight_decay",
        "train.sample_every_images",
        "eval.fid_every_images",
        "sample.guidance",
        "sample.sde_sigma",
        "eval.precision_recall_k",
        "train.max_nonfinite_steps",
        "train.seed",
        "data.shuffle_buffer",
        "data.num_classes",
        "train.cpu_threads",
        "text.export_copy_mb",
        "optim.decay_images",
        "repa.weight",
    ]
    for key in non_negative:
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {_get(cfg, key)}")
    if cfg.data.channels not in (1, 3):
        raise ConfigError(f"data.channels: must be 1 or 3, got {cfg.data.channels}")
    if not 0 <= cfg.model.p_uncond < 1:
        raise ConfigError(f"model.p_uncond: must lie in [0, 1), got {cfg.model.p_uncond}")
    if not 0 < cfg.optim.lr < 1:
        raise ConfigError(f"optim.lr: must lie in (0, 1), got {cfg.optim.lr}")
    if not 0 <= cfg.loss.t_min < 0.5:
        raise ConfigError(f"loss.t_min: must lie in [0, 0.5), got {cfg.loss.t_min}")
    if not 0 <= cfg.sample.t_start < 1:
        raise ConfigError(f"sample.t_start: must lie in [0, 1), got {cfg.sample.t_start}")
    if cfg.text.max_length < 3:
        raise ConfigError(f"text.max_length: must be >= 3 (BOS, a token, EOS), got {cfg.text.max_length}")
    if cfg.model.text_encoder == "learned" and cfg.text.width % cfg.text.heads:
        raise ConfigError(
            f"text.width: {cfg.text.width} must be divisible by text.heads={cfg.text.heads}"
        )
    if cfg.model.text_encoder and not cfg.data.caption_key:
        raise ConfigError(
            f"model.text_encoder={cfg.model.text_encoder!r} trains on captions, but data.caption_key "
            f"is empty; set it to the caption member of the shards (e.g. data.caption_key=txt)"
        )
    precomputed = cfg.model.text_encoder not in ("", "learned") and cfg.text.precomputed
    if cfg.model.text_encoder and cfg.data.in_memory and not precomputed:
        raise ConfigError(
            "data.in_memory=true holds images and precomputed text rows, not the captions that "
            "model.text_encoder=learned or text.precomputed=false encode each step; set "
            "data.in_memory=false"
        )
    sampling_spec(cfg)  # the options that must agree (a list grid's times and steps, churn)
    if cfg.train.batch_size % cfg.train.grad_accum:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} must be divisible by train.grad_accum="
            f"{cfg.train.grad_accum}"
        )
    _check_posthoc(cfg.ema.posthoc_sigma_rels)
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas: expected two numbers in [0, 1), got {cfg.optim.betas}")
    if cfg.loss.scale <= 0:
        raise ConfigError(f"loss.scale: the logit-normal scale must be > 0, got {cfg.loss.scale}")
    lo, hi = MODE_SCALE_RANGE
    if not lo <= cfg.loss.mode_scale <= hi:
        raise ConfigError(f"loss.mode_scale: must lie in [{lo}, {hi:.4f}] (where SD3's mode "
                          f"sampling is monotone), got {cfg.loss.mode_scale}")  # fmt: skip
    if cfg.loss.min_snr_gamma <= 0 or cfg.loss.sigma_data <= 0:
        raise ConfigError(f"loss.min_snr_gamma, loss.sigma_data: must be > 0, got "
                          f"{cfg.loss.min_snr_gamma}, {cfg.loss.sigma_data}")  # fmt: skip
    if cfg.optim.schedule == "inverse-sqrt" and cfg.optim.decay_images <= 0:
        raise ConfigError("optim.schedule=inverse-sqrt needs optim.decay_images > 0 (images seen "
                          "before the decay starts; EDM2: 70000 x 2048)")  # fmt: skip
    _check_meanflow(cfg)
    if cfg.repa.feature_network and cfg.repa.hidden <= 0:
        raise ConfigError(f"repa.hidden: must be > 0, got {cfg.repa.hidden}")
    if not 0 < cfg.path.b0 < cfg.path.b1:
        raise ConfigError(
            f"path.b0, path.b1: need 0 < b0 < b1 (vp-linear's beta range), got "
            f"{cfg.path.b0}, {cfg.path.b1}"
        )


def _check_meanflow(cfg: Config) -> None:
    """MeanFlow's options, and the recipe options it does not combine with."""
    lc = cfg.loss
    if not 0 <= lc.meanflow_equal_share <= 1:
        raise ConfigError(f"loss.meanflow_equal_share: must lie in [0, 1], got {lc.meanflow_equal_share}")
    if lc.meanflow_power < 0 or lc.meanflow_c <= 0:
        raise ConfigError(f"loss.meanflow_power >= 0 and loss.meanflow_c > 0 needed, got "
                          f"{lc.meanflow_power}, {lc.meanflow_c}")  # fmt: skip
    if lc.meanflow_guidance <= 0 or not 0 <= lc.meanflow_kappa < 1:
        raise ConfigError(f"loss.meanflow_guidance must be > 0 and loss.meanflow_kappa in [0, 1), "
                          f"got {lc.meanflow_guidance}, {lc.meanflow_kappa}")  # fmt: skip
    if lc.name != MEANFLOW:
        return
    if cfg.model.prediction_type != "velocity":
        raise ConfigError(
            f"loss.name=meanflow predicts the average velocity; set model.prediction_type=velocity "
            f"(got {cfg.model.prediction_type!r})"
        )
    for key, value, off in (("loss.reweight", lc.reweight, "none"),
                            ("loss.uncertainty", lc.uncertainty, False),
                            ("repa.feature_network", cfg.repa.feature_network, "")):  # fmt: skip
        if value != off:
            raise ConfigError(
                f"{key}={value!r} does not combine with loss.name=meanflow (MeanFlow weights its "
                f"loss adaptively: loss.meanflow_power); set {key}={off!r}"
            )


def _check_posthoc(sigma_rels: list[float]) -> None:
    for i, s in enumerate(sigma_rels):
        if not 0 < s < SIGMA_REL_MAX:  # gamma > 0: the cubic's one positive root
            raise ConfigError(
                f"ema.posthoc_sigma_rels[{i}]: {s} must lie in (0, {SIGMA_REL_MAX:.4f}), where the "
                f"power profile's exponent gamma is > 0; EDM2 tracks [0.05, 0.1]"
            )
    if len(set(sigma_rels)) != len(sigma_rels):
        raise ConfigError(
            f"ema.posthoc_sigma_rels: {sigma_rels} lists a value twice; give each profile once"
        )


def make_path(cfg: Config) -> GaussianPath:
    """The Gaussian path of the config."""
    if cfg.path.name == "vp-linear":
        return get_path("vp-linear", b0=cfg.path.b0, b1=cfg.path.b1)
    return get_path(cfg.path.name)


def sampling_spec(cfg: Config) -> SamplingSpec:
    """The sampling options of the config as one ``SamplingSpec``."""
    s = cfg.sample
    if len(s.guidance_interval) not in (0, 2):
        raise ConfigError(
            f"sample.guidance_interval: {s.guidance_interval} must be [] (guidance at every t) or "
            "[lo, hi] with 0 <= lo < hi <= 1 (t: 0 noise, 1 data), e.g. [0.25, 0.8]"
        )
    try:
        return SamplingSpec(s.sampler, s.steps, s.guidance, s.sde_sigma, s.t_start, s.time_grid,
                            rho=s.rho, times=tuple(s.times), final_step=s.final_step,
                            churn=s.churn, churn_sigma_min=s.churn_sigma_min,
                            churn_sigma_max=s.churn_sigma_max, churn_noise=s.churn_noise,
                            lower_order_few_steps=s.lower_order_few_steps,
                            lower_order_guided=s.lower_order_guided,
                            guidance_interval=tuple(s.guidance_interval) or None)  # fmt: skip
    except ValueError as e:
        raise ConfigError(f"sample: {e}") from None
