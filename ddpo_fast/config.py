"""Trainer configuration: one dataclass tree, named presets, `key=value` overrides, validation.

Keys follow ddpo-pytorch's names where one exists (`sample.num_steps`, `train.learning_rate`, ...).
Everything is checked by `validate()` before any model is built, and every error names the key.

Batch-size semantics (per rank, as in ddpo-pytorch):
  samples per epoch       = sample.batch_size * sample.num_batches_per_epoch * world_size
  train batches per epoch = sample.batch_size * sample.num_batches_per_epoch / train.batch_size (per rank)
  train.gradient_accumulation_steps counts train batches per optimizer step; every train batch makes
  one backward call per trained timestep, so the engine's gradient accumulation steps (DeepSpeed's
  `gradient_accumulation_steps`) = train.gradient_accumulation_steps * timesteps trained per sample.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field

from ddpo_fast.precision import MIXED_PRECISIONS

ALGORITHMS = ("ddpo_is", "ddpo_sf", "rwr")
STORAGE_DTYPES = ("auto", "fp32", "fp16", "bf16")
ENGINES = ("auto", "torch", "deepspeed")
ATTENTIONS = ("sdpa", "xformers")


class ConfigError(ValueError):
    """An unknown key or an invalid value; the message names the key."""


@dataclass
class SampleConfig:
    num_steps: int = 50  # DDIM steps
    eta: float = 1.0  # DDIM stochasticity; > 0 for a policy with a density
    guidance_scale: float = 5.0  # classifier-free guidance; <= 1 turns CFG off
    batch_size: int = 8  # per rank
    num_batches_per_epoch: int = 4  # per rank
    storage_dtype: str = "auto"  # dtype of the trajectory buffer; auto: the mixed-precision dtype


@dataclass
class TrainConfig:
    algorithm: str = "ddpo_is"
    batch_size: int = 4  # per rank
    learning_rate: float = 3e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    gradient_accumulation_steps: int = 1  # train batches per optimizer step
    num_inner_epochs: int = 1
    timestep_fraction: float = 1.0  # fraction of the DDIM steps trained per sample
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    cfg: bool = True  # classifier-free guidance during training
    max_grad_norm: float = 1.0  # <= 0: no clipping
    rwr_beta: float = 1.0  # RWR weight exp(beta * advantage), normalised over the batch


@dataclass
class StatTrackingConfig:
    enabled: bool = True  # per-prompt normalisation; False: global normalisation
    buffer_size: int = 16
    min_count: int = 16


@dataclass
class LoraConfig:
    rank: int = 4
    alpha: float = 4.0
    target_modules: str = "to_q,to_k,to_v,to_out.0"  # comma-separated


@dataclass
class Config:
    model: str = "tiny"  # "tiny", "sd15-random", a diffusers pipeline directory, or a hub id
    reward: str = "jpeg_compressibility"  # registered name, module:function or NAME:WEIGHT,... (ddpo_fast.rewards)
    reward_options: str = ""  # key=value,key=value passed to the reward, e.g. clip_model=DIR,mlp_weights=FILE
    reward_device: str = ""  # device of the reward models (their `device` option), e.g. cuda:1; "": the reward's default
    reward_server: str = ""  # "": in the trainer; auto: a reward server process started by rank 0; or http://HOST:PORT
    reward_timeout: float = 600.0  # seconds a reward server request may take before it is retried (then an error)
    prompts: str = "simple_animals"  # registered set, file:PATH, or module:function
    seed: int = 0
    num_epochs: int = 100
    save_freq: int = 1  # epochs between sample grids
    checkpoint_freq: int = 10  # epochs between checkpoints (and the last epoch, and on SIGTERM/SIGINT)
    num_checkpoint_limit: int = 3  # checkpoints kept
    use_lora: bool = False
    mixed_precision: str = "auto"  # auto: bf16 on a GPU, no (fp32) on a CPU
    attention: str = "sdpa"  # sdpa (PyTorch scaled_dot_product_attention) or xformers
    compile: bool = False  # torch.compile the UNet for sampling and training
    zero_stage: int = 1  # ZeRO-1: gradients cross the network once per optimizer step
    deepspeed_config: str = ""  # a JSON file merged over the DeepSpeed config the trainer makes (e.g. offload)
    engine: str = "auto"  # auto: DeepSpeed when launched with several ranks, else plain PyTorch
    reward_workers: int = 2  # background threads computing rewards
    log_wandb: bool = False
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    per_prompt_stat_tracking: StatTrackingConfig = field(default_factory=StatTrackingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    # ---- derived quantities -------------------------------------------------------------
    @property
    def num_train_timesteps(self) -> int:
        """Timesteps trained per sample (at least one)."""
        return max(1, int(self.sample.num_steps * self.train.timestep_fraction))

    @property
    def samples_per_rank(self) -> int:
        return self.sample.batch_size * self.sample.num_batches_per_epoch

    @property
    def train_batches_per_epoch(self) -> int:
        return self.samples_per_rank // self.train.batch_size

    @property
    def engine_accumulation_steps(self) -> int:
        """Backward calls per optimizer step (DeepSpeed's gradient_accumulation_steps)."""
        return self.train.gradient_accumulation_steps * self.num_train_timesteps

    @property
    def optimizer_steps_per_epoch(self) -> int:
        return (self.train_batches_per_epoch // self.train.gradient_accumulation_steps) * self.train.num_inner_epochs

    @property
    def use_cfg(self) -> bool:
        return self.sample.guidance_scale > 1.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# ---- presets -------------------------------------------------------------------------------
# Paper presets use ddpo-pytorch's values for 8 GPUs; the batch sizes are per rank.
PRESETS: dict[str, dict[str, typing.Any]] = {
    # Runs on a 2-core CPU in about 1 minute and visibly learns: 8x8 latents, 8 steps, a high learning
    # rate and a wide clip range (tuned by a sweep; the paper's 3e-4 / 1e-4 barely moves in 40 epochs).
    "tiny-compressibility": {
        "model": "tiny",
        "reward": "jpeg_compressibility",
        "prompts": "simple_animals",
        "num_epochs": 40,
        "save_freq": 10,
        "sample.num_steps": 8,
        "sample.guidance_scale": 3.0,
        "sample.batch_size": 8,
        "sample.num_batches_per_epoch": 2,
        "train.batch_size": 8,
        "train.gradient_accumulation_steps": 1,
        "train.learning_rate": 1e-3,
        "train.timestep_fraction": 1.0,
        "train.clip_range": 1e-2,
        "train.num_inner_epochs": 1,
        "per_prompt_stat_tracking.buffer_size": 16,
        "per_prompt_stat_tracking.min_count": 4,
    },
    "compressibility": {
        "model": "runwayml/stable-diffusion-v1-5",
        "reward": "jpeg_compressibility",
        "prompts": "common_animals",
        "num_epochs": 100,
        "use_lora": True,
        "sample.batch_size": 8,
        "sample.num_batches_per_epoch": 4,
        "train.batch_size": 4,
        "train.gradient_accumulation_steps": 2,
    },
    "aesthetic": {
        "model": "runwayml/stable-diffusion-v1-5",
        "reward": "aesthetic",
        "prompts": "simple_animals",
        "num_epochs": 200,
        "use_lora": True,
        "sample.batch_size": 8,
        "sample.num_batches_per_epoch": 4,
        "train.batch_size": 4,
        "train.gradient_accumulation_steps": 4,
    },
    "alignment": {
        "model": "runwayml/stable-diffusion-v1-5",
        "reward": "llava_bertscore",
        "prompts": "animal_activities",
        "num_epochs": 200,
        "use_lora": True,
        "sample.batch_size": 4,
        "sample.num_batches_per_epoch": 4,
        "train.batch_size": 4,
        "train.gradient_accumulation_steps": 4,
        "per_prompt_stat_tracking.buffer_size": 32,
    },
}
# Incompressibility is the compressibility task with the opposite reward.
PRESETS["incompressibility"] = {**PRESETS["compressibility"], "reward": "jpeg_incompressibility"}

DEFAULT_PRESET = "tiny-compressibility"


# ---- overrides -----------------------------------------------------------------------------
def _fields(obj) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _resolve(config: Config, key: str):
    """(parent object, leaf name, field type) for a dotted key, or ConfigError."""
    parts = key.split(".")
    obj = config
    for depth, part in enumerate(parts):
        fields = _fields(obj)
        if part not in fields:
            known = sorted(all_keys())
            raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(known)}")
        value = getattr(obj, part)
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(value):
                raise ConfigError(f"config key {key!r} is a section; set one of its keys, e.g. {key}.{next(iter(_fields(value)))}")
            hints = typing.get_type_hints(type(obj))
            return obj, part, hints[part]
        if not dataclasses.is_dataclass(value):
            raise ConfigError(f"unknown config key {key!r}: {'.'.join(parts[:depth + 1])} is not a section")
        obj = value
    raise AssertionError("unreachable")


def all_keys(obj=None, prefix: str = "") -> list[str]:
    obj = Config() if obj is None else obj
    keys = []
    for name in _fields(obj):
        value = getattr(obj, name)
        if dataclasses.is_dataclass(value):
            keys.extend(all_keys(value, prefix + name + "."))
        else:
            keys.append(prefix + name)
    return keys


def _parse(key: str, raw, typ):
    """Converts a string (from the command line) or a JSON value to the field's type."""
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key} must be true or false, got {raw!r}")
    if typ is int:
        if isinstance(raw, bool):
            raise ConfigError(f"{key} must be an integer, got {raw!r}")
        try:
            value = float(raw) if isinstance(raw, str) and any(c in raw for c in ".eE") else raw
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be an integer, got {raw!r}") from None
    if typ is float:
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number, got {raw!r}") from None
    return str(raw)


def set_key(config: Config, key: str, raw) -> None:
    obj, name, typ = _resolve(config, key)
    setattr(obj, name, _parse(key, raw, typ))


def apply_overrides(config: Config, overrides: list[str] | dict) -> Config:
    """Applies `key=value` strings (command line) or a {key: value} mapping."""
    items = overrides.items() if isinstance(overrides, dict) else None
    if items is None:
        items = []
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
            key, value = item.split("=", 1)
            items.append((key.strip(), value))
    for key, value in items:
        set_key(config, key, value)
    return config


def from_preset(name: str = DEFAULT_PRESET, overrides: list[str] | dict = ()) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"--preset must be one of {', '.join(PRESETS)}, got {name!r}")
    config = apply_overrides(Config(), PRESETS[name])
    return apply_overrides(config, overrides)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def from_dict(d: dict) -> Config:
    """The inverse of Config.to_dict (used to reload a run's config.json)."""
    return apply_overrides(Config(), _flatten(d))


# ---- validation ----------------------------------------------------------------------------
def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _is_server_url(value: str) -> bool:
    from ddpo_fast.rewards.client import _address

    try:
        _address(value)
    except ValueError:
        return False
    return True


def validate(config: Config, world_size: int = 1) -> Config:
    """Checks every value and the batch-size arithmetic; raises ConfigError naming the key."""
    s, t, st = config.sample, config.train, config.per_prompt_stat_tracking
    _check(config.model.strip() != "", "model must be 'tiny', a pipeline directory or a hub id")
    _check(config.reward.strip() != "", "reward must name a registered reward or module:function")
    _check(config.prompts.strip() != "", "prompts must name a prompt set, file:PATH or module:function")
    _check(config.num_epochs >= 1, f"num_epochs must be >= 1, got {config.num_epochs}")
    _check(config.save_freq >= 1, f"save_freq must be >= 1, got {config.save_freq}")
    _check(config.checkpoint_freq >= 1, f"checkpoint_freq must be >= 1, got {config.checkpoint_freq}")
    _check(config.num_checkpoint_limit >= 1, f"num_checkpoint_limit must be >= 1, got {config.num_checkpoint_limit}")
    _check(0 <= config.seed < 2**32, f"seed must be in [0, 2**32), got {config.seed}")
    _check(config.mixed_precision in MIXED_PRECISIONS,
           f"mixed_precision must be one of {MIXED_PRECISIONS}, got {config.mixed_precision!r}")
    _check(config.zero_stage in (0, 1, 2, 3), f"zero_stage must be 0, 1, 2 or 3, got {config.zero_stage}")
    _check(config.engine in ENGINES, f"engine must be one of {ENGINES}, got {config.engine!r}")
    _check(config.attention in ATTENTIONS, f"attention must be one of {ATTENTIONS}, got {config.attention!r}")
    _check(not (config.compile and config.zero_stage == 3 and resolved_engine(config, world_size) == "deepspeed"),
           "compile=true does not work with zero_stage=3 (ZeRO-3 gathers parameters in module hooks); "
           "use zero_stage=1 or 2")
    if config.deepspeed_config:
        deepspeed_overrides(config.deepspeed_config)  # raises ConfigError
    _check(config.reward_workers >= 1, f"reward_workers must be >= 1, got {config.reward_workers}")
    _check(config.reward_server in ("", "auto") or _is_server_url(config.reward_server),
           f"reward_server must be '' (in the trainer), auto or an http://HOST:PORT URL, got {config.reward_server!r}")
    _check(not (_is_server_url(config.reward_server) and (config.reward_options or config.reward_device)),
           f"reward_server={config.reward_server} is a running server, started with its own options: "
           "reward_options and reward_device are not used with it; leave them empty")
    _check(config.reward_timeout > 0 and math.isfinite(config.reward_timeout),
           f"reward_timeout must be > 0 seconds, got {config.reward_timeout}")
    _check(s.num_steps >= 1, f"sample.num_steps must be >= 1, got {s.num_steps}")
    _check(s.eta > 0 and math.isfinite(s.eta),
           f"sample.eta must be > 0 (eta = 0 is a deterministic sampler with no log-probability), got {s.eta}")
    _check(math.isfinite(s.guidance_scale) and s.guidance_scale >= 0,
           f"sample.guidance_scale must be >= 0, got {s.guidance_scale}")
    _check(s.batch_size >= 1, f"sample.batch_size must be >= 1, got {s.batch_size}")
    _check(s.num_batches_per_epoch >= 1, f"sample.num_batches_per_epoch must be >= 1, got {s.num_batches_per_epoch}")
    _check(s.storage_dtype in STORAGE_DTYPES, f"sample.storage_dtype must be one of {STORAGE_DTYPES}, got {s.storage_dtype!r}")
    _check(t.algorithm in ALGORITHMS, f"train.algorithm must be one of {ALGORITHMS}, got {t.algorithm!r}")
    _check(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    _check(t.learning_rate > 0 and math.isfinite(t.learning_rate), f"train.learning_rate must be > 0, got {t.learning_rate}")
    _check(0 <= t.adam_beta1 < 1, f"train.adam_beta1 must be in [0, 1), got {t.adam_beta1}")
    _check(0 <= t.adam_beta2 < 1, f"train.adam_beta2 must be in [0, 1), got {t.adam_beta2}")
    _check(t.adam_weight_decay >= 0, f"train.adam_weight_decay must be >= 0, got {t.adam_weight_decay}")
    _check(t.adam_epsilon > 0, f"train.adam_epsilon must be > 0, got {t.adam_epsilon}")
    _check(t.gradient_accumulation_steps >= 1,
           f"train.gradient_accumulation_steps must be >= 1, got {t.gradient_accumulation_steps}")
    _check(t.num_inner_epochs >= 1, f"train.num_inner_epochs must be >= 1, got {t.num_inner_epochs}")
    _check(0 < t.timestep_fraction <= 1, f"train.timestep_fraction must be in (0, 1], got {t.timestep_fraction}")
    _check(t.clip_range > 0, f"train.clip_range must be > 0, got {t.clip_range}")
    _check(t.adv_clip_max > 0, f"train.adv_clip_max must be > 0, got {t.adv_clip_max}")
    _check(math.isfinite(t.max_grad_norm), f"train.max_grad_norm must be finite, got {t.max_grad_norm}")
    _check(t.rwr_beta > 0, f"train.rwr_beta must be > 0, got {t.rwr_beta}")
    _check(st.buffer_size >= 1, f"per_prompt_stat_tracking.buffer_size must be >= 1, got {st.buffer_size}")
    _check(st.min_count >= 1, f"per_prompt_stat_tracking.min_count must be >= 1, got {st.min_count}")
    _check(config.lora.rank >= 1, f"lora.rank must be >= 1, got {config.lora.rank}")
    _check(config.lora.alpha > 0, f"lora.alpha must be > 0, got {config.lora.alpha}")
    _check(all(m.strip() for m in config.lora.target_modules.split(",")),
           f"lora.target_modules must be a comma-separated list of module names, got {config.lora.target_modules!r}")
    _check(config.samples_per_rank % t.batch_size == 0,
           f"train.batch_size ({t.batch_size}) must divide the samples per rank per epoch "
           f"(sample.batch_size * sample.num_batches_per_epoch = {config.samples_per_rank})")
    _check(config.train_batches_per_epoch % t.gradient_accumulation_steps == 0,
           f"train.gradient_accumulation_steps ({t.gradient_accumulation_steps}) must divide the train batches "
           f"per epoch ({config.train_batches_per_epoch} = {config.samples_per_rank} samples / train.batch_size {t.batch_size})")
    _check(t.algorithm != "ddpo_sf" or t.num_inner_epochs == 1,
           f"train.num_inner_epochs must be 1 with train.algorithm=ddpo_sf (REINFORCE is on-policy), got {t.num_inner_epochs}")
    if resolved_engine(config, world_size) == "torch":
        _check(world_size == 1, f"engine=torch runs in one process; got {world_size} ranks (use engine=deepspeed)")
        _check(config.mixed_precision != "fp16",
               "mixed_precision=fp16 needs engine=deepspeed (its loss scaler); use bf16 or no with one process")
    return config


# Set from the trainer's own keys (the accumulation boundary must match DDPO's backward calls).
DEEPSPEED_OWN_KEYS = {"train_batch_size": "train.batch_size", "train_micro_batch_size_per_gpu": "train.batch_size",
                      "gradient_accumulation_steps": "train.gradient_accumulation_steps",
                      "bf16": "mixed_precision", "fp16": "mixed_precision", "gradient_clipping": "train.max_grad_norm",
                      "optimizer": "train.learning_rate and train.adam_*"}


def deepspeed_overrides(path: str) -> dict:
    """The JSON object of `deepspeed_config=PATH`, checked not to set what the trainer's keys set."""
    try:
        with open(path) as f:
            overrides = json.load(f)
    except OSError as e:
        raise ConfigError(f"deepspeed_config={path!r}: cannot read it ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed_config={path!r}: not valid JSON ({e})") from None
    if not isinstance(overrides, dict):
        raise ConfigError(f"deepspeed_config={path!r}: must hold a JSON object")
    for key, ours in DEEPSPEED_OWN_KEYS.items():
        if key in overrides:
            raise ConfigError(f"deepspeed_config={path!r} sets {key!r}; set the trainer's {ours} instead")
    if "stage" in overrides.get("zero_optimization", {}):
        raise ConfigError(f"deepspeed_config={path!r} sets zero_optimization.stage; set zero_stage instead")
    return overrides


def resolved_engine(config: Config, world_size: int) -> str:
    if config.engine != "auto":
        return config.engine
    return "deepspeed" if world_size > 1 else "torch"
