"""DDPO trainer: `python -m ddpo_fast.train --preset NAME --run-dir DIR [key=value ...]`
or `deepspeed --num_gpus N ddpo_fast/train.py ...` (same arguments), `--resume RUN_DIR` to continue.

One epoch, top to bottom (see `train_epoch`):
  1. sample: prompts -> text embeddings -> DDIM with log-probs (fused op, CFG fused) -> trajectory
     buffer on the device -> VAE decode -> reward submitted to a background pool; the next batch
     samples while the reward is computed;
  2. rewards -> advantages (per-prompt stat tracking over the rewards of all ranks);
  3. inner epochs of the policy update over (sample, timestep) minibatches: one backward call per
     (train batch, timestep); the optimizer steps every train.gradient_accumulation_steps batches;
  4. metrics (metrics.jsonl, TensorBoard), sample grid, reward curve, checkpoint.

Every random choice is derived from (seed, epoch, batch, rank), so a run resumed from the
checkpoint of epoch e redoes epoch e + 1 exactly as an uninterrupted run would.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (`deepspeed ddpo_fast/train.py`)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.distributed as dist

from ddpo_fast import config as cfg
from ddpo_fast.advantages import PerPromptStatTracker, compute_advantages
from ddpo_fast.ops import ddim_ppo_loss, ddim_step_logprob, scheduler_alphas
from ddpo_fast.prompts import get_prompt_fn
from ddpo_fast.rewards import RewardPool, parse_options
from ddpo_fast.rewards import build as build_reward
from ddpo_fast.rewards import check as check_reward
from ddpo_fast.rewards.client import RewardServerError
from ddpo_fast.sampling import DTYPES, Trajectories, autocast, decode_images, derive_seed, sample_batch, unet_forward

CHECKPOINT_PREFIX = "epoch-"


# ---- distributed -----------------------------------------------------------------------------
def world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the launcher's environment."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    if not is_distributed():
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t.tolist())}


def log(message: str) -> None:
    if world()[0] == 0:
        print(message, flush=True)


# ---- engines ---------------------------------------------------------------------------------
class TorchEngine:
    """One-process engine: AdamW, gradient accumulation over `accumulation_steps` backward calls,
    gradient clipping, and a non-finite guard (a step whose gradient is not finite is skipped)."""

    def __init__(self, module, params, config: cfg.Config):
        t = config.train
        self.module = module
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                           weight_decay=t.adam_weight_decay, eps=t.adam_epsilon)
        self.accumulation_steps = config.engine_accumulation_steps
        self.max_grad_norm = t.max_grad_norm
        self.micro_steps = 0
        self.skipped_steps = 0
        self.last_grad_norm = float("nan")

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation_steps).backward()

    def step(self) -> bool:
        """Call after every backward; returns True at an optimizer step boundary."""
        self.micro_steps += 1
        if self.micro_steps % self.accumulation_steps:
            return False
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        self.last_grad_norm = float(norm)
        if math.isfinite(self.last_grad_norm):
            self.optimizer.step()
        else:
            self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def save(self, directory: Path) -> None:
        trainable = {n: p for n, p in self.module.named_parameters() if p.requires_grad}
        torch.save({"params": {n: p.detach().cpu() for n, p in trainable.items()},
                    "optimizer": self.optimizer.state_dict(), "micro_steps": self.micro_steps,
                    "skipped_steps": self.skipped_steps}, directory / "engine.pt")

    def load(self, directory: Path) -> None:
        state = torch.load(directory / "engine.pt", map_location="cpu", weights_only=False)
        named = dict(self.module.named_parameters())
        with torch.no_grad():
            for name, value in state["params"].items():
                named[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.micro_steps, self.skipped_steps = state["micro_steps"], state["skipped_steps"]


class DeepSpeedEngine:
    """DeepSpeed ZeRO engine; its gradient_accumulation_steps is the number of backward calls per
    optimizer step, so the boundary falls where ours does. DeepSpeed skips a step whose gradient
    norm is not finite (counted in its skipped_steps)."""

    def __init__(self, module, params, config: cfg.Config):
        import deepspeed

        t = config.train
        ds_config = {
            "train_micro_batch_size_per_gpu": t.batch_size,
            "gradient_accumulation_steps": config.engine_accumulation_steps,
            "gradient_clipping": t.max_grad_norm if t.max_grad_norm > 0 else 0.0,
            "zero_optimization": {"stage": config.zero_stage},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": config.mixed_precision == "bf16"},
            "fp16": {"enabled": config.mixed_precision == "fp16", "initial_scale_power": 16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        optimizer = torch.optim.AdamW(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                      weight_decay=t.adam_weight_decay, eps=t.adam_epsilon)
        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
        self.module = self.engine.module
        self.accumulation_steps = config.engine_accumulation_steps
        self.last_grad_norm = float("nan")

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    @property
    def skipped_steps(self) -> int:
        return int(self.engine.skipped_steps)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> bool:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if boundary:
            norm = self.engine.get_global_grad_norm()
            self.last_grad_norm = float(norm) if norm is not None else float("nan")
        return boundary

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag="engine", save_latest=False)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag="engine")
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")


# ---- model setup -----------------------------------------------------------------------------
def prepare_unet(pipe, config: cfg.Config):
    """Freezes the VAE and text encoder; returns (unet, trainable params): the full UNet, or LoRA."""
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    unet = pipe.unet
    if config.use_lora:
        from peft import LoraConfig

        unet.requires_grad_(False)
        targets = [m.strip() for m in config.lora.target_modules.split(",")]
        unet.add_adapter(LoraConfig(r=config.lora.rank, lora_alpha=config.lora.alpha, target_modules=targets,
                                    init_lora_weights="gaussian"))
    else:
        unet.requires_grad_(True)
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"lora.target_modules={config.lora.target_modules!r} matched no UNet module")
    return unet, params


def save_final_model(pipe, unet, config: cfg.Config, run_dir: Path) -> Path:
    """The finetuned UNet in diffusers format (run_dir/unet), or LoRA weights (run_dir/lora)."""
    if config.use_lora:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        out = run_dir / "lora"
        StableDiffusionPipeline.save_lora_weights(str(out), unet_lora_layers=layers, safe_serialization=True)
        return out
    out = run_dir / "unet"
    unet.save_pretrained(str(out))
    return out


# ---- checkpoints -----------------------------------------------------------------------------
def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a save in progress lives under a temporary name)."""
    ckpt_dir = run_dir / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir()
             if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def save_checkpoint(run_dir: Path, epoch: int, engine, state: dict, limit: int) -> Path:
    """Writes into a temporary directory, then renames it: a kill mid-save leaves no checkpoint
    that resume would pick. Keeps the newest `limit` checkpoints."""
    ckpt_dir = run_dir / "checkpoints"
    final = ckpt_dir / f"{CHECKPOINT_PREFIX}{epoch}"
    tmp = ckpt_dir / f".tmp-{CHECKPOINT_PREFIX}{epoch}"
    rank = world()[0]
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    engine.save(tmp)
    barrier()
    if rank == 0:
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


# ---- run directory outputs ---------------------------------------------------------------------
def save_grid(path: Path, images: torch.Tensor, prompts: list[str], rewards: np.ndarray, scale: int = 2) -> None:
    """A grid of images, each captioned with its prompt and reward."""
    from PIL import Image, ImageDraw

    n = len(images)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    h, w = images.shape[2] * scale, images.shape[3] * scale
    caption = 24
    grid = Image.new("RGB", (cols * w, rows * (h + caption)), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        tile = Image.fromarray(images[i].permute(1, 2, 0).numpy()).resize((w, h), Image.NEAREST)
        x, y = (i % cols) * w, (i // cols) * (h + caption)
        grid.paste(tile, (x, y))
        draw.text((x + 2, y + h + 1), prompts[i][:24], fill="black")
        draw.text((x + 2, y + h + 12), f"r={rewards[i]:.3f}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def save_samples(path: Path, samples: list[dict]) -> None:
    """One JSON line per sample of rank 0 (the grid shows the first ones): prompt, reward and the
    reward's per-image info, e.g. the VLM's answer of llava_bertscore."""
    with open(path, "w") as f:
        for sample in samples:
            f.write(json.dumps(sample, default=str) + "\n")


def plot_rewards(path: Path, metrics: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [m["epoch"] for m in metrics]
    mean = np.array([m["reward_mean"] for m in metrics])
    std = np.array([m["reward_std"] for m in metrics])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, mean, marker="o", label="reward mean")
    ax.fill_between(epochs, mean - std, mean + std, alpha=0.2, label="± std")
    ax.set_xlabel("epoch")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Logger:
    """metrics.jsonl, TensorBoard (and wandb when asked) and the reward curve, on rank 0."""

    def __init__(self, run_dir: Path, config: cfg.Config, start_epoch: int):
        self.run_dir = run_dir
        self.metrics = [m for m in read_metrics(run_dir) if m["epoch"] < start_epoch]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in self.metrics))
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_epoch)
        self.wandb = None
        if config.log_wandb:
            try:
                import wandb
            except ImportError as e:
                raise ValueError("log_wandb=true needs the wandb package (pip install wandb)") from e
            self.wandb = wandb.init(project="ddpo_fast", config=config.to_dict(), dir=str(run_dir))

    def log(self, record: dict) -> None:
        self.metrics.append(record)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, record["epoch"])
        self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(record, step=record["epoch"])
        plot_rewards(self.run_dir / "reward_curve.png", self.metrics)

    def close(self) -> None:
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


# ---- the epoch ---------------------------------------------------------------------------------
class Trainer:
    def __init__(self, config: cfg.Config, run_dir: Path, pipe, engine, device, prompt_fn, reward_pool):
        self.config, self.run_dir, self.pipe, self.engine, self.device = config, run_dir, pipe, engine, device
        self.prompt_fn, self.reward_pool = prompt_fn, reward_pool
        self.rank, _, self.world_size = world()
        s = config.sample
        self.scheduler = pipe.scheduler
        self.scheduler.set_timesteps(s.num_steps, device=device)
        self.timesteps = self.scheduler.timesteps.to(device)
        self.mixed_dtype = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]
        self.storage_dtype = DTYPES[s.storage_dtype] if s.storage_dtype != "auto" else (self.mixed_dtype or torch.float32)
        latent_size = pipe.unet.config.sample_size
        self.latent_shape = (pipe.unet.config.in_channels, latent_size, latent_size)
        self.negative_embeds = self.encode([""])[0:1] if config.use_cfg else None
        self.tracker = (PerPromptStatTracker(config.per_prompt_stat_tracking.buffer_size,
                                             config.per_prompt_stat_tracking.min_count)
                        if config.per_prompt_stat_tracking.enabled else None)
        self.dropped_samples = 0

    def encode(self, prompts: list[str]) -> torch.Tensor:
        from ddpo_fast.models import encode_prompts

        return encode_prompts(self.pipe, prompts, self.device)

    # 1. sampling ------------------------------------------------------------------------------
    def sample_epoch(self, epoch: int, progress):
        c, s = self.config, self.config.sample
        parts, prompts, futures, images_kept = [], [], [], None
        unet = self.engine.module
        unet.eval()
        for b in range(s.num_batches_per_epoch):
            rng = random.Random(derive_seed(c.seed, epoch, b, self.rank, 1))
            batch = [self.prompt_fn(rng) for _ in range(s.batch_size)]
            batch_prompts = [p for p, _ in batch]
            batch_meta = [dict(m) for _, m in batch]
            traj, final = sample_batch(
                unet, self.scheduler, self.encode(batch_prompts), self.negative_embeds,
                latent_shape=self.latent_shape, eta=s.eta, guidance_scale=s.guidance_scale,
                num_train_timesteps=c.num_train_timesteps, seed=derive_seed(c.seed, epoch, b, self.rank, 0),
                storage_dtype=self.storage_dtype, autocast_dtype=self.mixed_dtype, progress=progress)
            images = decode_images(self.pipe.vae, final)
            futures.append(self.reward_pool.submit(images, batch_prompts, batch_meta))  # overlaps the next batch
            if images_kept is None:
                images_kept = images
            parts.append(traj)
            prompts += batch_prompts
        wait_start = time.perf_counter()  # rewards overlap sampling: this is what was not hidden
        results = [f.result() for f in futures]
        reward_wait = time.perf_counter() - wait_start
        rewards = torch.cat([r for r, _ in results])
        info: dict[str, float] = {}  # batch-level numbers, averaged over the batches
        samples = []  # per sample: prompt, reward and the per-image info lists' entries (e.g. a VLM's answer)
        for batch_rewards, batch_info in results:
            per_image = {k: v for k, v in batch_info.items() if isinstance(v, list) and len(v) == len(batch_rewards)}
            for i, r in enumerate(batch_rewards.tolist()):
                samples.append({"prompt": prompts[len(samples)], "reward": r, **{k: v[i] for k, v in per_image.items()}})
            for k, v in batch_info.items():
                if isinstance(v, (int, float)):
                    info[k] = info.get(k, 0.0) + float(v) / len(results)
        return Trajectories.cat(parts), prompts, rewards, info, images_kept, reward_wait, samples

    # 3. the policy update -----------------------------------------------------------------------
    def loss_fn(self, out, x, x_next, alpha_t, alpha_prev, old_log_prob, advantages, weights):
        c, t = self.config, self.config.train
        guidance = c.sample.guidance_scale if (c.use_cfg and t.cfg) else None
        if t.algorithm == "ddpo_is":
            return ddim_ppo_loss(out, x, x_next, alpha_t, alpha_prev, old_log_prob, advantages,
                                 clip_range=t.clip_range, adv_clip_max=t.adv_clip_max, eta=c.sample.eta,
                                 guidance_scale=guidance)
        _, log_prob = ddim_step_logprob(out, x, alpha_t, alpha_prev, eta=c.sample.eta, prev_sample=x_next,
                                        guidance_scale=guidance)
        if t.algorithm == "ddpo_sf":  # REINFORCE: the score function weighted by the advantage
            loss = -(advantages.clamp(-t.adv_clip_max, t.adv_clip_max) * log_prob).mean()
        else:  # rwr: likelihood weighted by exp(beta * advantage), normalised over the batch
            loss = -(weights * log_prob).mean()
        log_ratio = (log_prob - old_log_prob).detach()
        stats = {"approx_kl": 0.5 * (log_ratio**2).mean(),
                 "clipfrac": ((log_ratio.exp() - 1).abs() > t.clip_range).float().mean(), "log_prob": log_prob.detach()}
        return loss, stats

    def train_epoch(self, epoch: int, traj: Trajectories, advantages: torch.Tensor, weights: torch.Tensor, progress):
        c, t = self.config, self.config.train
        train_cfg = c.use_cfg and t.cfg
        n, k = len(traj), c.num_train_timesteps
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, approx_kl, clipfrac
        count, grad_norms = 0, []
        self.engine.module.train()
        for inner in range(t.num_inner_epochs):
            g = torch.Generator().manual_seed(derive_seed(c.seed, epoch, inner, self.rank, 2))
            order = torch.randperm(n, generator=g)
            step_order = torch.argsort(torch.rand(n, k, generator=g), dim=1)  # per-sample timestep shuffle
            for start in range(0, n, t.batch_size):
                batch = order[start:start + t.batch_size]
                rows, cols = batch.to(self.device), step_order[batch].to(self.device)
                embeds = traj.prompt_embeds[rows]
                adv, w = advantages[rows], weights[rows]
                for j in range(k):
                    col = cols[:, j]
                    x = traj.latents[rows, col].contiguous()
                    x_next = traj.next_latents[rows, col].contiguous()
                    old_log_prob = traj.log_probs[rows, col].contiguous()
                    step_t = self.timesteps[traj.step_indices[rows, col]]
                    alpha_t, alpha_prev = scheduler_alphas(self.scheduler, step_t, len(rows), self.device)
                    with autocast(self.device, self.mixed_dtype if isinstance(self.engine, TorchEngine) else None):
                        out = unet_forward(self.engine, x, step_t, embeds,
                                           self.negative_embeds if train_cfg else None)
                    loss, stats = self.loss_fn(out.contiguous(), x, x_next, alpha_t, alpha_prev, old_log_prob, adv, w)
                    self.engine.backward(loss)
                    if self.engine.step():
                        grad_norms.append(self.engine.last_grad_norm)
                    sums += torch.stack([loss.detach(), stats["approx_kl"], stats["clipfrac"]]).double()  # no sync
                    count += 1
                    if progress is not None:
                        progress.update(1)
        result = dict(zip(["loss", "approx_kl", "clipfrac"], (sums / max(count, 1)).tolist()))
        finite = [g for g in grad_norms if math.isfinite(g)]
        result["grad_norm"] = float(np.mean(finite)) if finite else float("nan")
        return result

    def gathered_for_sampling(self):
        """ZeRO-3 partitions the UNet's parameters: gather them once for the whole sampling phase
        instead of on each of its forwards."""
        if isinstance(self.engine, DeepSpeedEngine) and self.config.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)
        return contextlib.nullcontext()

    def run_epoch(self, epoch: int) -> dict:
        c = self.config
        show = self.rank == 0 and os.environ.get("DDPO_FAST_NO_PROGRESS") != "1"
        from tqdm import tqdm

        start = time.perf_counter()
        with tqdm(total=c.sample.num_batches_per_epoch * c.sample.num_steps, desc=f"epoch {epoch} sampling",
                  disable=not show, leave=False) as bar, self.gathered_for_sampling():
            traj, prompts, rewards, info, images, reward_wait, samples = self.sample_epoch(epoch, bar)
        sample_seconds = time.perf_counter() - start

        # 2. advantages over the rewards of all ranks; non-finite rewards are dropped (advantage 0)
        advantages, all_rewards, all_advantages = compute_advantages(rewards, prompts, self.tracker, self.rank)
        valid = np.isfinite(all_rewards)
        dropped = int((~valid).sum())
        self.dropped_samples += dropped
        weights = self.rwr_weights(all_advantages, valid)
        advantages = advantages.to(self.device)

        start = time.perf_counter()
        skipped_before = self.engine.skipped_steps
        with tqdm(total=c.train.num_inner_epochs * len(traj) // c.train.batch_size * c.num_train_timesteps,
                  desc=f"epoch {epoch} training", disable=not show, leave=False) as bar:
            stats = self.train_epoch(epoch, traj, advantages, weights, bar)
        train_seconds = time.perf_counter() - start
        stats = mean_across_ranks(stats)
        sample_seconds = max(mean_across_ranks({"s": sample_seconds})["s"], 1e-9)
        reward_wait = mean_across_ranks({"s": reward_wait})["s"]
        train_seconds = mean_across_ranks({"s": train_seconds})["s"]
        total_samples = len(all_rewards)
        record = {
            "epoch": epoch,
            "reward_mean": float(all_rewards[valid].mean()) if valid.any() else float("nan"),
            "reward_std": float(all_rewards[valid].std()) if valid.any() else float("nan"),
            **stats,
            "samples_per_s": total_samples / (sample_seconds + train_seconds),
            "sample_seconds": sample_seconds,
            "reward_wait_seconds": reward_wait,
            "train_seconds": train_seconds,
            "skipped_steps": self.engine.skipped_steps - skipped_before,
            "dropped_samples": dropped,
            "buffer_bytes_per_sample": traj.bytes_per_sample(),
            **{f"reward_info/{k}": v for k, v in info.items()},
        }
        record["_grid"] = (images, prompts[:len(images)], rewards[:len(images)].numpy())
        record["_samples"] = samples  # this rank's prompts, rewards and per-image reward info
        return record

    def rwr_weights(self, all_advantages: np.ndarray, valid: np.ndarray) -> torch.Tensor:
        """exp(beta * A) normalised to mean 1 over the valid samples of all ranks; this rank's slice."""
        logits = self.config.train.rwr_beta * np.where(valid, all_advantages, -np.inf)
        w = np.exp(logits - logits[valid].max()) if valid.any() else np.zeros_like(logits)
        w = w / w[valid].mean() if valid.any() else w
        n = len(all_advantages) // self.world_size
        return torch.from_numpy(w[self.rank * n:(self.rank + 1) * n].astype(np.float32)).to(self.device)


# ---- entry point -------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m ddpo_fast.train",
        description="DDPO finetuning of a Stable Diffusion UNet. Settings are key=value overrides of a preset.")
    parser.add_argument("--preset", default=cfg.DEFAULT_PRESET, help=f"one of: {', '.join(cfg.PRESETS)}")
    parser.add_argument("--run-dir", help="output directory (config.json, metrics.jsonl, plots, checkpoints, model)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    if args.resume and args.run_dir and Path(args.run_dir) != Path(args.resume):
        parser.error("--resume RUN_DIR continues in RUN_DIR; do not also give a different --run-dir")
    if not args.resume and not args.run_dir:
        parser.error("give --run-dir DIR (a new run) or --resume RUN_DIR")
    return args


def resolve_config(args, world_size: int) -> tuple[cfg.Config, Path]:
    """The validated config and the run directory; raises ConfigError before any model is built."""
    if args.resume:
        run_dir = Path(args.resume)
        path = run_dir / "config.json"
        if not path.is_file():
            raise cfg.ConfigError(f"--resume {run_dir}: no config.json there (not a run directory)")
        config = cfg.apply_overrides(cfg.from_dict(json.loads(path.read_text())), args.overrides)
    else:
        run_dir = Path(args.run_dir)
        config = cfg.from_preset(args.preset, args.overrides)
    cfg.validate(config, world_size)
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise cfg.ConfigError("mixed_precision=fp16 needs a CUDA GPU (DeepSpeed's CPU accelerator has no fp16); use bf16")
    try:
        if config.reward_server in ("", "auto"):  # a running server was started with its own options
            check_reward(config.reward, **reward_options(config))
        get_prompt_fn(config.prompts)
    except ValueError as e:
        raise cfg.ConfigError(str(e)) from None
    return config, run_dir


def reward_options(config: cfg.Config) -> dict[str, str]:
    """reward_options with reward_device as the reward's device option."""
    options = parse_options(config.reward_options)
    if config.reward_device:
        if "device" in options:
            raise ValueError(f"reward_device={config.reward_device!r} and reward_options device={options['device']!r} "
                             "are both given; give one")
        options["device"] = config.reward_device
    return options


def broadcast_from_rank0(value):
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def first_error_of_all_ranks(error: str | None) -> str | None:
    """The first rank's error, on every rank: all ranks stop together rather than some waiting forever."""
    if not is_distributed():
        return error
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


def make_reward(config: cfg.Config, run_dir: Path):
    """(reward function, reward server process or None) as config.reward_server says: in this process,
    a server started by rank 0 (auto; every rank sends it requests), or a running server at a URL.
    Every rank checks that it reaches the server before any model loads."""
    from ddpo_fast.rewards.client import RemoteReward, health, start_server

    if not config.reward_server:
        return build_reward(config.reward, **reward_options(config)), None
    server, url, error = None, config.reward_server, None
    if config.reward_server == "auto":
        if world()[0] == 0:
            log(f"starting the reward server (log: {run_dir / 'reward_server.log'})")
            try:
                server = start_server(config.reward, reward_options(config), log_path=run_dir / "reward_server.log")
                url = server.url
            except Exception as e:  # noqa: BLE001 - every rank must learn of it (below)
                error = f"reward_server=auto: {e}"
        url = broadcast_from_rank0(url)
    if error is None:
        try:
            served = health(url).get("reward")
            if served != config.reward:
                error = f"reward_server={url} serves reward {served!r}, but reward={config.reward!r}"
        except Exception as e:  # noqa: BLE001 - e.g. auto's 127.0.0.1 seen from another machine
            error = f"reward_server={url} (rank {world()[0]}): {e}"
    error = first_error_of_all_ranks(error)
    if error:
        if server is not None:
            server.close()
        raise RewardServerError(error)
    log(f"reward {config.reward} served at {url}")
    return RemoteReward(url, config.reward, timeout=config.reward_timeout), server


def describe(config: cfg.Config, world_size: int, engine_name: str) -> str:
    s, t = config.sample, config.train
    return "\n".join([
        f"ddpo_fast: model={config.model} reward={config.reward} prompts={config.prompts} "
        f"algorithm={t.algorithm} engine={engine_name}"
        + (f" zero_stage={config.zero_stage}" if engine_name == "deepspeed" else "")
        + f" lora={config.use_lora} mixed_precision={config.mixed_precision} ranks={world_size}",
        f"  samples per epoch: {config.samples_per_rank * world_size} "
        f"(sample.batch_size {s.batch_size} x sample.num_batches_per_epoch {s.num_batches_per_epoch} x {world_size} ranks)",
        f"  train.batch_size {t.batch_size} per rank; {config.train_batches_per_epoch} train batches per rank per inner epoch; "
        f"timesteps trained per sample {config.num_train_timesteps} of {s.num_steps}",
        f"  backward calls per optimizer step (engine gradient_accumulation_steps): {config.engine_accumulation_steps}; "
        f"optimizer steps per epoch: {config.optimizer_steps_per_epoch}; epochs: {config.num_epochs}",
    ])


def main(argv=None) -> Path:
    args = parse_args(argv)
    rank, local_rank, world_size = world()
    config, run_dir = resolve_config(args, world_size)  # all errors before any model is built
    engine_name = cfg.resolved_engine(config, world_size)

    if engine_name == "deepspeed":
        import deepspeed

        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        # Denormal floats (tiny Adam moments and gradients) slow CPU kernels by 10-20x: measured on
        # the tiny model, a train phase of 3 s took 50-75 s in some epochs without this.
        torch.set_flush_denormal(True)

    start_epoch, checkpoint = 0, None
    if args.resume:
        checkpoints = list_checkpoints(run_dir)
        if checkpoints:
            checkpoint = checkpoints[-1]
            start_epoch = json.loads((checkpoint / "trainer_state.json").read_text())["epoch"] + 1
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(config.to_json())
    log(describe(config, world_size, engine_name))

    with contextlib.ExitStack() as stack:
        reward_fn, server = make_reward(config, run_dir)  # first: a reward that cannot start fails fast
        if server is not None:
            stack.callback(server.close)
        return _train(config, run_dir, engine_name, device, start_epoch, checkpoint, reward_fn)


def _train(config: cfg.Config, run_dir: Path, engine_name: str, device: torch.device, start_epoch: int,
           checkpoint: Path | None, reward_fn) -> Path:
    rank, _, world_size = world()
    from ddpo_fast.models import load_pipeline

    torch.manual_seed(config.seed)
    pipe = load_pipeline(config.model)
    pipe.vae.to(device)
    pipe.text_encoder.to(device)
    pipe.unet.to(device)
    unet, params = prepare_unet(pipe, config)
    engine = (DeepSpeedEngine if engine_name == "deepspeed" else TorchEngine)(unet, params, config)
    pool = RewardPool(reward_fn, workers=config.reward_workers)
    trainer = Trainer(config, run_dir, pipe, engine, device, get_prompt_fn(config.prompts), pool)
    if checkpoint is not None:
        engine.load(checkpoint)
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        if trainer.tracker is not None and state.get("tracker") is not None:
            trainer.tracker.load_state_dict(state["tracker"])
        trainer.dropped_samples = state.get("dropped_samples", 0)
        log(f"resumed from {checkpoint} at epoch {start_epoch}")
    logger = Logger(run_dir, config, start_epoch) if rank == 0 else None
    log(f"trajectory buffer: {describe_buffer(trainer, config)}")

    try:
        for epoch in range(start_epoch, config.num_epochs):
            record = trainer.run_epoch(epoch)
            images, grid_prompts, grid_rewards = record.pop("_grid")
            samples = record.pop("_samples")
            last = epoch == config.num_epochs - 1
            if rank == 0:
                logger.log(record)
                print(f"epoch {epoch}: reward {record['reward_mean']:.4f} ± {record['reward_std']:.4f}  "
                      f"loss {record['loss']:.3g}  kl {record['approx_kl']:.3g}  clipfrac {record['clipfrac']:.3f}  "
                      f"{record['samples_per_s']:.2f} samples/s", flush=True)
                if epoch % config.save_freq == 0 or last:
                    save_grid(run_dir / "samples" / f"epoch_{epoch:04d}.png", images, grid_prompts, grid_rewards)
                    save_samples(run_dir / "samples" / f"epoch_{epoch:04d}.jsonl", samples)
            if (epoch + 1) % config.checkpoint_freq == 0 or last:
                state = {"epoch": epoch, "tracker": trainer.tracker.state_dict() if trainer.tracker else None,
                         "dropped_samples": trainer.dropped_samples}
                save_checkpoint(run_dir, epoch, engine, state, config.num_checkpoint_limit)
    finally:
        pool.close()
        if logger is not None:
            logger.close()

    final_unet = engine.module
    if engine_name == "deepspeed" and config.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(final_unet.parameters()), modifier_rank=None):
            if rank == 0:
                out = save_final_model(pipe, final_unet, config, run_dir)
    elif rank == 0:
        out = save_final_model(pipe, final_unet, config, run_dir)
    barrier()
    if rank == 0:
        grids = sorted((run_dir / "samples").glob("*.png"))
        print(f"final model: {out}")
        print(f"sample grid: {grids[-1] if grids else None}")
        print(f"reward curve: {run_dir / 'reward_curve.png'}")
        print(f"metrics: {run_dir / 'metrics.jsonl'}", flush=True)
    return run_dir


def describe_buffer(trainer: Trainer, config: cfg.Config) -> str:
    embed_shape = (trainer.pipe.tokenizer.model_max_length, trainer.pipe.text_encoder.config.hidden_size)
    from ddpo_fast.sampling import expected_bytes_per_sample

    nbytes = expected_bytes_per_sample(config.num_train_timesteps, trainer.latent_shape, trainer.storage_dtype,
                                       embed_shape, trainer.pipe.text_encoder.dtype)
    return (f"{nbytes} bytes per sample ({config.num_train_timesteps} steps x 2 latents "
            f"{tuple(trainer.latent_shape)} in {str(trainer.storage_dtype).replace('torch.', '')} + log-probs, "
            f"step indices, prompt embedding)")


def cli(argv=None) -> int:
    try:
        main(argv)
    except cfg.ConfigError as e:
        print(f"ddpo_fast.train: error: {e}", file=sys.stderr)
        return 2
    except RewardServerError as e:  # the checkpoints written so far stay; --resume continues the run
        print(f"ddpo_fast.train: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
