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
ADVANTAGES = ("tracker", "group")
TIMESTEP_SELECTIONS = ("random", "first", "window")


class ConfigError(ValueError):
    """An unknown key or an invalid value; the message names the key."""


def opt(default, help: str):
    """A config field with its meaning: `--help`, the README's key table and the errors share it."""
    return field(default=default, metadata={"help": help})


def section(cls):
    return field(default_factory=cls)


@dataclass
class SampleConfig:
    num_steps: int = opt(50, "sampling steps (DDIM, or the SD3 family's flow SDE steps)")
    eta: float = opt(1.0, "DDIM eta, in (0, 1]: the policy's noise scale (0 would be a deterministic sampler with "
                          "no log-probability); SD and SDXL")
    noise_level: float = opt(0.7, "the SDE step's noise level (Flow-GRPO's eta), > 0; SD3 family")
    sde_type: str = opt("sde", "the SDE step: `sde` (Flow-GRPO) or `cps` (its coefficients-preserving variant, "
                               "noise_level <= 1); SD3 family")
    guidance_scale: float = opt(5.0, "classifier-free guidance (<= 1: off)")
    resolution: int = opt(0, "image height and width in pixels; 0: the model's own (SD 1.5: 512, SDXL and SD3.5: "
                             "1024; the tiny models: 64)")
    batch_size: int = opt(8, "per rank")
    num_batches_per_epoch: int = opt(4, "per rank")
    storage_dtype: str = opt("auto", "trajectory buffer dtype: `fp32`, `fp16`, `bf16`; `auto` = the mixed-precision "
                                     "dtype")
    group_size: int = opt(1, "samples per prompt in an epoch (GRPO groups, Flow-GRPO / DanceGRPO); > 1 draws the "
                             "epoch's prompts once for all ranks and samples each this many times")


@dataclass
class TrainConfig:
    algorithm: str = opt("ddpo_is", "`ddpo_is` (PPO clip), `ddpo_sf` (REINFORCE, one inner epoch), `rwr`")
    batch_size: int = opt(4, "samples per train batch, per rank")
    learning_rate: float = opt(3e-4, "AdamW's learning rate")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.999, "AdamW beta2")
    adam_weight_decay: float = opt(1e-4, "AdamW weight decay")
    adam_epsilon: float = opt(1e-8, "AdamW epsilon")
    gradient_accumulation_steps: int = opt(1, "train batches per optimizer step")
    num_inner_epochs: int = opt(1, "passes over each epoch's samples")
    timestep_fraction: float = opt(1.0, "fraction of the DDIM steps trained per sample (chosen per sample before "
                                        "sampling)")
    clip_range: float = opt(1e-4, "PPO ratio clip")
    adv_clip_max: float = opt(5.0, "advantage clip")
    cfg: bool = opt(True, "classifier-free guidance during training")
    max_grad_norm: float = opt(1.0, "gradient clipping (<= 0: off)")
    rwr_beta: float = opt(1.0, "RWR weight exp(beta x advantage), normalised over the batch")
    advantage: str = opt("tracker", "`tracker`: per-prompt statistics (or the batch's, see per_prompt_stat_tracking); "
                                    "`group`: normalised within each group of sample.group_size samples of a prompt "
                                    "(GRPO)")
    group_global_std: bool = opt(False, "with advantage=group: divide by the std of all the epoch's rewards instead "
                                        "of the group's (Flow-GRPO's global_std)")
    skip_zero_advantage: bool = opt(False, "train only the batches needed for the samples whose advantage is not 0 "
                                           "(e.g. groups whose rewards are all equal), the same number on every "
                                           "rank; counted as `skipped_samples`")
    timestep_selection: str = opt("random", "which steps train: `random` (DDPO: chosen per sample), `first` (the "
                                            "first ones, Flow-GRPO), `window` (consecutive steps at a place drawn "
                                            "per epoch, the only stochastic ones: the others sample with eta 0, "
                                            "MixGRPO); how many: train.timestep_fraction")
    kl_beta: float = opt(0.0, "weight of the KL divergence to the starting model's step distribution in the loss "
                              "(Flow-GRPO; 0: off); logged as `kl`")


@dataclass
class StatTrackingConfig:
    enabled: bool = opt(True, "per-prompt normalisation; false: over the whole batch")
    buffer_size: int = opt(16, "rewards kept per prompt")
    min_count: int = opt(16, "below this many, a prompt uses the batch statistics")


@dataclass
class LoraConfig:
    rank: int = opt(4, "LoRA rank")
    alpha: float = opt(4.0, "LoRA alpha")
    target_modules: str = opt("auto", "comma-separated module names LoRA adapts; `auto`: the model family's (SD and "
                                      "SDXL: `to_q,to_k,to_v,to_out.0`; SD3: Flow-GRPO's, both attention streams)")


@dataclass
class EmaConfig:
    decay: float = opt(0.0, "EMA of the trained weights (LoRA or full): w_ema = decay w_ema + (1 - decay) w; 0: off")
    update_every: int = opt(1, "optimizer steps between EMA updates")
    use_for_final: bool = opt(False, "save the EMA weights as the final model (evaluation during training uses "
                                     "them whenever the EMA is on)")


@dataclass
class WandbConfig:
    project: str = opt("ddpo_fast", "wandb project (with `log_wandb=true`)")
    name: str = opt("", "wandb run name; empty: the run directory's name")
    entity: str = opt("", "wandb entity (team or user); empty: wandb's default")


@dataclass
class Config:
    model: str = opt("tiny", "`tiny` (built-in, random weights), `shapes` (built-in, pretrained on 64x64 scenes "
                             "of coloured shapes: pair it with `prompts=shapes`), `sd15-random` (Stable Diffusion "
                             "1.5's shapes, random weights: for throughput and memory measurements), a diffusers "
                             "pipeline directory, or a hub id")
    reward: str = opt("jpeg_compressibility", "`jpeg_compressibility`, `jpeg_incompressibility` (JPEG quality 95, "
                                              "size in kB), `aesthetic`, `llava_bertscore`, `shapes_alignment` (a "
                                              "programmatic judge of the `shapes` prompts), `pickscore`, `clipscore`, "
                                              "`hpsv2`, `imagereward`, `module:function`, or a weighted sum "
                                              "`pickscore:1.0,aesthetic:0.5` (see Rewards)")
    reward_options: str = opt("", "options of the reward, `key=value,key=value` (e.g. `clip_model=DIR,mlp_weights=FILE`)")
    reward_device: str = opt("", "device of the reward models (the reward's `device` option), e.g. `cuda:1`; empty: "
                                 "the rank's GPU (`cuda:LOCAL_RANK`) if there is one, else the CPU")
    reward_server: str = opt("", "empty: rewards computed in the trainer's process; `auto`: rank 0 starts a reward "
                                 "server process that every rank sends its images to; `http://HOST:PORT`: a running "
                                 "reward server (see Serving a reward)")
    reward_timeout: float = opt(600.0, "seconds a reward server request may take before the run stops with an error "
                                       "(not retried; a refused connection is retried twice first)")
    prompts: str = opt("simple_animals", "`simple_animals`, `common_animals` (45), `animal_activities`, `shapes` "
                                         "(captions of the shapes model), `shapes_heldout` (colour-shape pairs "
                                         "`shapes` never asks for), `file:PATH` (one per line), or `module:function`")
    seed: int = opt(0, "every random choice derives from (seed, epoch, batch, rank)")
    num_epochs: int = opt(100, "epochs of the run (raise it on `--resume` to train on)")
    save_freq: int = opt(1, "epochs between sample grids")
    checkpoint_freq: int = opt(10, "epochs between checkpoints; the last epoch, and the last finished one on "
                                   "SIGTERM/SIGINT, are always saved (see Stopping and resuming)")
    num_checkpoint_limit: int = opt(3, "checkpoints kept")
    max_nonfinite_epochs: int = opt(3, "stop with an error after this many consecutive epochs in which no reward "
                                       "was finite")
    use_lora: bool = opt(False, "LoRA through peft instead of the whole denoiser (UNet or transformer)")
    mixed_precision: str = opt("auto", "`auto` (bf16 on a GPU, fp32 on a CPU), `no`, `bf16`, `fp16` (fp16 needs "
                                       "DeepSpeed's loss scaler: `engine=deepspeed`). The frozen VAE and text encoder "
                                       "run in this dtype too")
    attention: str = opt("sdpa", "`sdpa` (PyTorch's `scaled_dot_product_attention`: flash / memory-efficient kernels "
                                 "on a GPU) or `xformers` (needs the package)")
    compile: bool = opt(False, "`torch.compile` the denoiser for sampling (with CUDA graphs on a GPU) and for training; "
                               "see Performance on GPUs")
    zero_stage: int = opt(1, "DeepSpeed ZeRO stage (0-3); 1 reduces the gradient once per optimizer step (see "
                             "Several GPUs)")
    deepspeed_config: str = opt("", "a JSON file merged over the DeepSpeed config the trainer makes (e.g. CPU "
                                    "offload, bucket sizes); the keys the trainer sets itself (batch sizes, "
                                    "accumulation, precision, clipping, optimizer, ZeRO stage) are refused with the "
                                    "key to use instead")
    engine: str = opt("auto", "`torch` (one process), `deepspeed`; `auto` = DeepSpeed when launched with several "
                              "ranks")
    reward_workers: int = opt(2, "threads of the reward pool")
    eval_freq: int = opt(0, "epochs between evaluations on fixed prompts and seeds (eval/reward_mean, "
                            "samples/eval_NNNN.png); 0: off")
    eval_prompts: str = opt("", "comma-separated prompts of the evaluation; empty: those of `python -m "
                                "ddpo_fast.evaluate`")
    eval_seeds: str = opt("0,1", "comma-separated seeds of the evaluation, one image per prompt and seed")
    log_wandb: bool = opt(False, "also log to wandb (scalars and sample grids; see `wandb.*`)")
    sample: SampleConfig = section(SampleConfig)
    train: TrainConfig = section(TrainConfig)
    per_prompt_stat_tracking: StatTrackingConfig = section(StatTrackingConfig)
    lora: LoraConfig = section(LoraConfig)
    ema: EmaConfig = section(EmaConfig)
    wandb: WandbConfig = section(WandbConfig)

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
# The fixed prompts of `make demo`'s evaluations (shapes-compressibility): one- and two-group captions.
DEMO_SHAPES_PROMPTS = ("a red circle", "three blue triangles", "four green circles", "two yellow squares",
                       "a blue square and three yellow triangles", "two red triangles and two green squares")
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
    # The pretrained shapes model on its judge, about 6 minutes on one CPU core. One optimizer step per
    # epoch of 64 samples (so every PPO ratio is 1 and the clip never binds) at lr 1e-4: in probes lr
    # 3e-4 pulled the samples towards blue smears within 10 epochs (reward 0.64 -> 0.41) and 3e-5 did
    # not move (see BENCHMARKS.md: neither this one shows a clear rise yet).
    "shapes-alignment": {
        "model": "shapes",
        "reward": "shapes_alignment",
        "prompts": "shapes",
        "num_epochs": 15,
        "save_freq": 5,
        "sample.num_steps": 20,
        "sample.guidance_scale": 3.0,
        "sample.batch_size": 16,
        "sample.num_batches_per_epoch": 4,
        "train.batch_size": 16,
        "train.gradient_accumulation_steps": 4,
        "train.learning_rate": 1e-4,
        "train.timestep_fraction": 0.5,
        "train.clip_range": 1e-3,
        "train.num_inner_epochs": 1,
        "per_prompt_stat_tracking.buffer_size": 16,
        "per_prompt_stat_tracking.min_count": 4,
    },
    # `make demo`: the pretrained shapes model on JPEG compressibility. On this model the judge's
    # alignment reward did not rise in any setting tried (BENCHMARKS.md); compressibility rises
    # steadily (-2.14 -> -1.74 kB in 25 epochs on 64 fixed images), so the demo uses it (issue 9
    # allows either). 10 DDIM steps instead of 20: half the sampling cost, and the base model scores
    # as well on its judge at 10 as at 20. 64 samples per epoch in 2 optimizer steps of 32 (DDPO-IS
    # reuses each epoch's samples once; clip 1e-3 binds on 10-40% of the second step's ratios);
    # lr 3e-4, the paper's rate: at 3e-5 the JPEG size did not move in 10 epochs, and 4 steps per
    # epoch were not faster. Evaluated on the demo's fixed prompts every 5 epochs.
    "shapes-compressibility": {
        "model": "shapes",
        "reward": "jpeg_compressibility",
        "prompts": "shapes",
        "num_epochs": 25,
        "save_freq": 5,
        "eval_freq": 5,
        "eval_prompts": ",".join(DEMO_SHAPES_PROMPTS),
        "eval_seeds": "0,1",
        "sample.num_steps": 10,
        "sample.guidance_scale": 3.0,
        "sample.batch_size": 16,
        "sample.num_batches_per_epoch": 4,
        "train.batch_size": 16,
        "train.gradient_accumulation_steps": 2,
        "train.learning_rate": 3e-4,
        "train.timestep_fraction": 0.5,
        "train.clip_range": 1e-3,
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
    # DDPO's aesthetic task on SDXL base at its own 1024 px, LoRA (SDXL's UNet has 2.6B parameters);
    # the aesthetic preset's samples per optimizer step. model=DIR for a local copy.
    "sdxl-aesthetic": {
        "model": "stabilityai/stable-diffusion-xl-base-1.0",
        "reward": "aesthetic",
        "prompts": "simple_animals",
        "num_epochs": 200,
        "use_lora": True,
        "sample.batch_size": 4,
        "sample.num_batches_per_epoch": 8,
        "train.batch_size": 2,
        "train.gradient_accumulation_steps": 8,
    },
    # Flow-GRPO on SD3.5 medium (yifan123/flow_grpo, config/grpo.py pickscore_sd3): 10 SDE steps at
    # noise level 0.7, CFG 4.5, 512 px, groups of 24 samples of a prompt normalised with the std of the
    # whole batch, the first 9 steps trained, KL to the starting model 0.01, LoRA r32 / alpha 64,
    # EMA 0.9 every 8 optimizer steps, two optimizer steps per epoch. Samples per epoch here: 48 per
    # rank (2 prompts on one GPU; Flow-GRPO used 48 prompts on 32 GPUs). model=DIR for a local copy.
    "sd3-pickscore": {
        "model": "stabilityai/stable-diffusion-3.5-medium",
        "reward": "pickscore",
        "prompts": "animal_activities",
        "num_epochs": 1000,
        "use_lora": True,
        "lora.rank": 32,
        "lora.alpha": 64.0,
        "sample.num_steps": 10,
        "sample.noise_level": 0.7,
        "sample.guidance_scale": 4.5,
        "sample.resolution": 512,
        "sample.batch_size": 8,
        "sample.num_batches_per_epoch": 6,
        "sample.group_size": 24,
        "train.advantage": "group",
        "train.group_global_std": True,
        "train.timestep_selection": "first",
        "train.timestep_fraction": 0.9,
        "train.batch_size": 8,
        "train.gradient_accumulation_steps": 3,
        "train.learning_rate": 3e-4,
        "train.clip_range": 1e-4,
        "train.adv_clip_max": 5.0,
        "train.kl_beta": 0.01,
        "ema.decay": 0.9,
        "ema.update_every": 8,
        "save_freq": 60,
        "eval_freq": 60,
    },
}
# Incompressibility is the compressibility task with the opposite reward.
PRESETS["incompressibility"] = {**PRESETS["compressibility"], "reward": "jpeg_incompressibility"}
# Flow-GRPO's compressibility task on SD3.5 medium: the pickscore settings with the JPEG reward.
PRESETS["sd3-compressibility"] = {**PRESETS["sd3-pickscore"], "reward": "jpeg_compressibility",
                                  "prompts": "common_animals"}

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


def parse_overrides(items: list[str]) -> dict[str, str]:
    """`key=value` strings (the command line) -> {key: value}."""
    parsed = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        parsed[key.strip()] = value
    return parsed


def apply_overrides(config: Config, overrides: list[str] | dict) -> Config:
    """Applies `key=value` strings (command line) or a {key: value} mapping."""
    items = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    for key, value in items.items():
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


# ---- the key table: --help, the README and --config files ------------------------------------------
def describe_keys(obj=None, prefix: str = "") -> list[tuple[str, typing.Any, str]]:
    """(key, default, meaning) of every key, in declaration order."""
    obj = Config() if obj is None else obj
    rows = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            rows.extend(describe_keys(value, prefix + f.name + "."))
        else:
            rows.append((prefix + f.name, value, f.metadata.get("help", "")))
    return rows


def format_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        mantissa, e, exponent = format(value, "g").partition("e")
        return mantissa + (e + str(int(exponent)) if e else "")
    return str(value)


def markdown_key_table() -> str:
    """The README's table of keys (a test checks that the README holds exactly this)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, meaning in describe_keys():
        shown = f"`{format_value(default)}`" if default != "" else "empty"
        lines.append(f"| `{key}` | {shown} | {meaning} |")
    return "\n".join(lines)


def help_key_list() -> str:
    """The keys, their defaults and meanings as `--help` lists them."""
    import textwrap

    out = []
    for key, default, meaning in describe_keys():
        out.append(f"  {key}={format_value(default)}")
        out.extend(textwrap.wrap(meaning.replace("`", ""), 92, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(out)


def read_config_file(path: str) -> dict:
    """`--config FILE`: a YAML or JSON mapping of keys as on the command line (`train.learning_rate: 1e-4`)
    or nested by section (`train: {learning_rate: 1e-4}`); returns {dotted key: value}."""
    try:
        text = open(path).read()
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror})") from None
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # json and yaml raise their own types
        raise ConfigError(f"--config {path}: not valid {'JSON' if path.endswith('.json') else 'YAML'} ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: must hold a mapping of keys to values, got {type(data).__name__}")
    flat = _flatten(data)
    for key in flat:  # unknown keys fail here, naming the file
        try:
            _resolve(Config(), key)
        except ConfigError as e:
            raise ConfigError(f"--config {path}: {e}") from None
    return flat


# ---- what --resume may change -------------------------------------------------------------------
# Keys a resumed run applies from the epoch it continues at. Every other key is fixed by the run:
# the model and what is trained (LoRA or full, its shape), the engine and ZeRO stage (the checkpoint's
# format), the seed and the sampling and batch arithmetic (the epochs to come would not be the ones
# the run would have made).
RESUMABLE_KEYS = frozenset({
    "num_epochs", "save_freq", "checkpoint_freq", "eval_freq", "eval_prompts", "eval_seeds", "num_checkpoint_limit", "max_nonfinite_epochs",
    "reward_timeout", "reward_workers", "reward_server", "reward_device", "log_wandb", "compile", "attention",
    "wandb.project", "wandb.name", "wandb.entity",
    "train.learning_rate", "train.adam_beta1", "train.adam_beta2", "train.adam_weight_decay", "train.adam_epsilon",
    "train.max_grad_norm", "train.clip_range", "train.adv_clip_max",
})


def changed_keys(old: Config, new: Config) -> dict[str, tuple]:
    """{key: (old value, new value)} for every key that differs."""
    a, b = _flatten(old.to_dict()), _flatten(new.to_dict())
    return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


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
    _check(config.model.strip() != "", "model must be 'tiny', 'shapes', a pipeline directory or a hub id")
    _check(config.reward.strip() != "", "reward must name a registered reward or module:function")
    _check(config.prompts.strip() != "", "prompts must name a prompt set, file:PATH or module:function")
    _check(config.num_epochs >= 1, f"num_epochs must be >= 1, got {config.num_epochs}")
    _check(config.save_freq >= 1, f"save_freq must be >= 1, got {config.save_freq}")
    _check(config.checkpoint_freq >= 1, f"checkpoint_freq must be >= 1, got {config.checkpoint_freq}")
    _check(config.max_nonfinite_epochs >= 1, f"max_nonfinite_epochs must be >= 1, got {config.max_nonfinite_epochs}")
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
    _check(s.resolution >= 0 and s.resolution % 8 == 0,
           f"sample.resolution must be 0 (the model's own) or a positive multiple of 8 pixels, got {s.resolution}")
    _check(s.noise_level > 0 and math.isfinite(s.noise_level), f"sample.noise_level must be > 0, got {s.noise_level}")
    _check(s.sde_type in ("sde", "cps"), f"sample.sde_type must be sde or cps, got {s.sde_type!r}")
    _check(s.sde_type != "cps" or s.noise_level <= 1,
           f"sample.noise_level must be <= 1 with sample.sde_type=cps (std = sigma' sin(noise_level pi / 2)), got "
           f"{s.noise_level}")
    _check(0 < s.eta <= 1,
           f"sample.eta must be in (0, 1] (eta = 0 is a deterministic sampler with no log-probability; the DDIM "
           f"step is defined for eta <= 1), got {s.eta}")
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
    _check(s.group_size >= 1, f"sample.group_size must be >= 1, got {s.group_size}")
    _check((config.samples_per_rank * world_size) % s.group_size == 0,
           f"sample.group_size ({s.group_size}) must divide the samples per epoch ({config.samples_per_rank * world_size}"
           " = sample.batch_size * sample.num_batches_per_epoch * ranks)")
    _check(t.advantage in ADVANTAGES, f"train.advantage must be one of {ADVANTAGES}, got {t.advantage!r}")
    _check(t.advantage != "group" or s.group_size > 1,
           "train.advantage=group needs sample.group_size > 1 (samples of the same prompt to compare)")
    _check(not (t.skip_zero_advantage and t.algorithm == "rwr"),
           "train.skip_zero_advantage does not apply to train.algorithm=rwr (a zero advantage still has weight 1)")
    _check(t.timestep_selection in TIMESTEP_SELECTIONS,
           f"train.timestep_selection must be one of {TIMESTEP_SELECTIONS}, got {t.timestep_selection!r}")
    _check(t.kl_beta >= 0 and math.isfinite(t.kl_beta), f"train.kl_beta must be >= 0, got {t.kl_beta}")
    _check(not (t.kl_beta > 0 and config.zero_stage == 3 and not config.use_lora
                and resolved_engine(config, world_size) == "deepspeed"),
           "train.kl_beta > 0 with a full finetune under zero_stage=3 is not supported (the reference copy would "
           "not be sharded); use zero_stage=1 or 2, or use_lora=true")
    e = config.ema
    _check(e.decay == 0 or 0 < e.decay < 1, f"ema.decay must be 0 (off) or in (0, 1), got {e.decay}")
    _check(e.update_every >= 1, f"ema.update_every must be >= 1, got {e.update_every}")
    _check(not (e.use_for_final and e.decay == 0), "ema.use_for_final=true needs an EMA (ema.decay in (0, 1))")
    _check(not (e.decay and config.zero_stage == 3 and resolved_engine(config, world_size) == "deepspeed"),
           "ema.decay with zero_stage=3 is not supported (the parameters are partitioned); use zero_stage=1 or 2")
    _check(config.eval_freq >= 0, f"eval_freq must be >= 0, got {config.eval_freq}")
    try:
        seeds = [int(x) for x in config.eval_seeds.split(",")]
    except ValueError:
        seeds = []
    _check(bool(seeds) and all(0 <= x < 2**32 for x in seeds),
           f"eval_seeds must be comma-separated integers in [0, 2**32), got {config.eval_seeds!r}")
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
