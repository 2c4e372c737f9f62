"""DDPO trainer: `python -m ddpo_fast.train --preset NAME --run-dir DIR [key=value ...]`
or `deepspeed --num_gpus N ddpo_fast/train.py ...` (same arguments), `--resume RUN_DIR` to continue.

One epoch, top to bottom (`Trainer.run_epoch`):
  1. sample: prompts -> prompt conditioning -> the policy's steps with log-probs (DDIM or Flow-GRPO's
     SDE step, fused ops, CFG fused) -> trajectory buffer on the device -> VAE decode -> reward
     submitted to a background pool; the next batch samples while the reward is computed;
  2. rewards -> advantages (per-prompt stat tracking over the rewards of all ranks);
  3. inner epochs of the policy update over (sample, timestep) minibatches: one backward call per
     (train batch, timestep); the optimizer steps every train.gradient_accumulation_steps batches;
  4. metrics (metrics.jsonl, TensorBoard), sample grid, reward curve, checkpoint.

Every random choice is derived from (seed, epoch, batch, rank), so a run resumed from the
checkpoint of epoch e redoes epoch e + 1 exactly as an uninterrupted run would. The parts live in
modules of their own: families (the model: SD, SDXL, SD3), steps (the policy's step), distributed
(collectives), engines (optimizer steps), precision (the one autocast policy of both phases),
checkpoints, run_logging, rewards.run (the run's reward).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import random
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (`deepspeed ddpo_fast/train.py`)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from ddpo_fast import config as cfg
from ddpo_fast import distributed
from ddpo_fast.advantages import (PerPromptStatTracker, compute_advantages, global_advantages, group_advantages,
                                  per_prompt_stats)
from ddpo_fast.ema import EMA
from ddpo_fast.checkpoints import CHECKPOINT_PREFIX, StopRequests, Stopped, save_checkpoint, save_final_model
from ddpo_fast.distributed import log, mean_across_ranks
from ddpo_fast.engines import DeepSpeedEngine, TorchEngine, prepare_denoiser
from ddpo_fast.families import ModelFamily
from ddpo_fast.precision import Precision
from ddpo_fast.reference import add_kl_penalty
from ddpo_fast.models import check_model_source
from ddpo_fast.prompts import check_prompt_fn, get_prompt_fn
from ddpo_fast.rewards import RewardError, RewardPool
from ddpo_fast.rewards import check as check_reward
from ddpo_fast.rewards.run import make_reward, reward_options
from ddpo_fast.run_dir import (Resume, RunFinished, check_new_run, how_to_launch, plan_resume, start_new_run,
                               write_config)
from ddpo_fast.run_logging import Logger, save_grid, save_samples
from ddpo_fast.sampling import DTYPES, Trajectories, derive_seed, sample_batch, sample_images_per_seed


class _StopSampling(Exception):
    """A stop was requested while sampling: the weights are still those of the last finished epoch."""


class Trainer:
    def __init__(self, config: cfg.Config, run_dir: Path, model: ModelFamily, engine, device, precision: Precision,
                 prompt_fn, reward_pool, stop: StopRequests | None = None):
        self.config, self.run_dir, self.model, self.engine, self.device = config, run_dir, model, engine, device
        self.precision, self.prompt_fn, self.reward_pool, self.stop = precision, prompt_fn, reward_pool, stop
        self.rank, _, self.world_size = distributed.world()
        s = config.sample
        self.step = model.make_step(s, device)  # DDIM or the flow SDE step, by the model's family
        self.storage_dtype = DTYPES[s.storage_dtype] if s.storage_dtype != "auto" else (precision.dtype or torch.float32)
        self.negative = model.negative_conditioning(device) if config.use_cfg else None
        self.tracker = (PerPromptStatTracker(config.per_prompt_stat_tracking.buffer_size,
                                             config.per_prompt_stat_tracking.min_count)
                        if config.per_prompt_stat_tracking.enabled else None)
        t = config.train
        if t.advantage == "group":
            self.normalise = lambda _, r: group_advantages(r, s.group_size, t.group_global_std)
        else:
            self.normalise = self.tracker.update if self.tracker else lambda _, r: global_advantages(r)
        self.ema = EMA(engine.module, config.ema.decay, config.ema.update_every) if config.ema.decay else None
        self.reference_denoiser = self.make_reference() if t.kl_beta > 0 else None
        self.dropped_samples = 0
        self.nonfinite_epochs = 0  # consecutive epochs without a finite reward

    def make_reference(self):
        """The starting model for the KL penalty: LoRA's base (the adapters switched off: no copy), or a
        frozen copy of the whole denoiser in the mixed-precision dtype (made before a checkpoint loads)."""
        if self.config.use_lora:
            return None
        import copy

        frozen = copy.deepcopy(self.engine.module).requires_grad_(False).eval()
        return frozen.to(self.precision.dtype) if self.precision.dtype is not None else frozen

    def reference_output(self, x, step_t, cond, negative) -> torch.Tensor:
        with torch.no_grad():
            if self.reference_denoiser is not None:
                return self.model.denoise(self.reference_denoiser, x, step_t, cond, negative, self.precision)
            module = self.engine.module
            module.disable_adapters()
            try:
                return self.model.denoise(module, x, step_t, cond, negative, self.precision)
            finally:
                module.enable_adapters()

    def encode(self, prompts: list[str]):
        return self.model.encode(prompts, self.device)

    def stop_requested(self) -> bool:
        return self.stop is not None and self.stop.requested()

    # the epoch ---------------------------------------------------------------------------------
    def run_epoch(self, epoch: int) -> dict:
        c = self.config
        show = self.rank == 0 and os.environ.get("DDPO_FAST_NO_PROGRESS") != "1"
        from tqdm import tqdm

        # 1. sampling, with rewards computed in the background
        start = time.perf_counter()
        with tqdm(total=c.sample.num_batches_per_epoch * c.sample.num_steps, desc=f"epoch {epoch} sampling",
                  disable=not show, leave=False) as bar, self.engine.sampling_phase():
            traj, prompts, rewards, info, images, reward_wait, samples = self.sample_epoch(epoch, bar)
        sample_seconds = time.perf_counter() - start
        if self.stop_requested():  # the last chance to stop before this epoch changes the weights
            raise _StopSampling

        # 2. advantages over the rewards of all ranks; non-finite rewards are dropped (advantage 0)
        advantages, all_rewards, all_advantages, all_prompts = compute_advantages(rewards, prompts, self.normalise,
                                                                                  self.rank, self.device)
        valid = np.isfinite(all_rewards)
        dropped = int((~valid).sum())
        self.dropped_samples += dropped
        self.check_rewards_finite(epoch, dropped, len(all_rewards))
        weights = self.rwr_weights(all_advantages, valid)

        # 3. the policy update
        start = time.perf_counter()
        skipped_before = self.engine.skipped_steps
        with tqdm(total=c.train.num_inner_epochs * len(traj) // c.train.batch_size * c.num_train_timesteps,
                  desc=f"epoch {epoch} training", disable=not show, leave=False) as bar:
            stats = self.train_epoch(epoch, traj, advantages, weights, bar)
        train_seconds = time.perf_counter() - start

        # 4. the epoch's record (rank 0 logs it)
        stats = mean_across_ranks({**stats, "sample_seconds": sample_seconds, "reward_wait_seconds": reward_wait,
                                   "train_seconds": train_seconds})
        record = {
            "epoch": epoch,
            "reward_mean": float(all_rewards[valid].mean()) if valid.any() else float("nan"),
            "reward_std": float(all_rewards[valid].std()) if valid.any() else float("nan"),
            **stats,
            "samples_per_s": len(all_rewards) / max(stats["sample_seconds"] + stats["train_seconds"], 1e-9),
            "skipped_steps": self.engine.skipped_steps - skipped_before,
            "dropped_samples": dropped,
            "buffer_bytes_per_sample": traj.bytes_per_sample(),
            "learning_rate": self.engine.learning_rate,
            **{f"reward_info/{k}": v for k, v in info.items()},
            "per_prompt": per_prompt_stats(all_prompts, all_rewards),
        }
        record["_grid"] = (images, prompts[:len(images)], rewards[:len(images)].numpy())
        record["_samples"] = samples  # this rank's prompts, rewards and per-image reward info

        # 5. evaluation on fixed prompts and seeds, every eval_freq epochs and at the end
        if c.eval_freq and (epoch % c.eval_freq == 0 or epoch == c.num_epochs - 1):
            record.update(self.evaluate())
        return record

    def evaluate(self) -> dict:
        """The current weights (the EMA's, when on) on the eval prompts and seeds; every rank runs it
        (ZeRO-3 needs them all for a forward), rank 0 logs it."""
        from ddpo_fast.evaluate import DEFAULT_PROMPTS

        c = self.config
        prompts = [p.strip() for p in c.eval_prompts.split(",") if p.strip()] or DEFAULT_PROMPTS
        seeds = [int(x) for x in c.eval_seeds.split(",")]
        with (self.ema.swapped_in() if self.ema else contextlib.nullcontext()), self.engine.sampling_phase():
            self.engine.module.eval()
            images = sample_images_per_seed(self.model, self.engine.sampling_module, self.step, self.encode(prompts),
                                            self.negative, seeds, guidance_scale=c.sample.guidance_scale,
                                            storage_dtype=self.storage_dtype, precision=self.precision)
        all_prompts = [p for p in prompts for _ in seeds]
        rewards, _ = self.reward_pool.submit(images, all_prompts, [{} for _ in all_prompts]).result()
        rewards = rewards.double().numpy()
        finite = rewards[np.isfinite(rewards)]
        return {"eval/reward_mean": float(finite.mean()) if len(finite) else float("nan"),
                "eval/per_prompt": per_prompt_stats(all_prompts, rewards),
                "_eval_grid": (images, all_prompts, rewards)}

    def check_rewards_finite(self, epoch: int, dropped: int, total: int) -> None:
        """Says when rewards were dropped; stops after `max_nonfinite_epochs` epochs without one finite reward."""
        self.nonfinite_epochs = self.nonfinite_epochs + 1 if dropped == total else 0
        if dropped:
            log(f"warning: epoch {epoch}: {dropped} of {total} rewards were not finite (NaN or inf); those samples "
                "are dropped (advantage 0)")
        if self.nonfinite_epochs >= self.config.max_nonfinite_epochs:
            raise RewardError(f"reward {self.config.reward} gave no finite reward in {self.nonfinite_epochs} epochs in "
                              f"a row (max_nonfinite_epochs={self.config.max_nonfinite_epochs}); the run stops "
                              "rather than train on nothing")

    # 1. sampling ------------------------------------------------------------------------------
    def sample_epoch(self, epoch: int, progress):
        c, s = self.config, self.config.sample
        parts, prompts, futures, images_kept = [], [], [], None
        denoiser = self.engine.sampling_module
        self.engine.module.eval()
        for b in range(s.num_batches_per_epoch):
            if b and self.stop_requested():
                raise _StopSampling
            batch = self.batch_prompts(epoch, b)
            batch_prompts = [p for p, _ in batch]
            batch_meta = [dict(m) for _, m in batch]
            traj, final = sample_batch(
                self.model, denoiser, self.step, self.encode(batch_prompts), self.negative,
                guidance_scale=s.guidance_scale, num_train_timesteps=c.num_train_timesteps,
                seed=derive_seed(c.seed, epoch, b, self.rank, 0), storage_dtype=self.storage_dtype,
                precision=self.precision, progress=progress, timestep_selection=c.train.timestep_selection,
                window_start=self.window_start(epoch))
            images = self.model.decode(final)
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

    def window_start(self, epoch: int) -> int:
        """With train.timestep_selection=window: the first step of the epoch's window, drawn per epoch
        (the same on every rank and batch)."""
        span = self.config.sample.num_steps - self.config.num_train_timesteps + 1
        return derive_seed(self.config.seed, epoch, 0, 0, 4) % span

    def batch_prompts(self, epoch: int, b: int) -> list[tuple[str, dict]]:
        """Batch b's (prompt, metadata): drawn per rank, or with groups (sample.group_size > 1) from the
        epoch's prompts, drawn once for all ranks and each repeated group_size times in a row."""
        c, s = self.config, self.config.sample
        if s.group_size == 1:
            rng = random.Random(derive_seed(c.seed, epoch, b, self.rank, 1))
            return [self.prompt_fn(rng) for _ in range(s.batch_size)]
        rng = random.Random(derive_seed(c.seed, epoch, 0, 0, 3))  # the same on every rank
        drawn = [self.prompt_fn(rng) for _ in range(c.samples_per_rank * self.world_size // s.group_size)]
        start = self.rank * c.samples_per_rank + b * s.batch_size
        return [drawn[i // s.group_size] for i in range(start, start + s.batch_size)]

    # 2. advantages: RWR's weights (DDPO-IS and -SF use the advantages directly) -----------------
    def rwr_weights(self, all_advantages: np.ndarray, valid: np.ndarray) -> torch.Tensor:
        """exp(beta * A) normalised to mean 1 over the valid samples of all ranks; this rank's slice."""
        logits = self.config.train.rwr_beta * np.where(valid, all_advantages, -np.inf)
        w = np.exp(logits - logits[valid].max()) if valid.any() else np.zeros_like(logits)
        w = w / w[valid].mean() if valid.any() else w
        n = len(all_advantages) // self.world_size
        return torch.from_numpy(w[self.rank * n:(self.rank + 1) * n].astype(np.float32)).to(self.device)

    # 3. the policy update -----------------------------------------------------------------------
    def train_epoch(self, epoch: int, traj: Trajectories, advantages: torch.Tensor, weights: torch.Tensor, progress):
        c, t = self.config, self.config.train
        train_cfg = c.use_cfg and t.cfg
        n, k = len(traj), c.num_train_timesteps
        trained = self.samples_to_train(advantages) if t.skip_zero_advantage else n
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, approx_kl, clipfrac, kl
        count, grad_norms = 0, []
        self.engine.module.train()
        for inner in range(t.num_inner_epochs):
            g = torch.Generator().manual_seed(derive_seed(c.seed, epoch, inner, self.rank, 2))
            order = torch.randperm(n, generator=g)
            step_order = torch.argsort(torch.rand(n, k, generator=g), dim=1)  # per-sample timestep shuffle
            if t.skip_zero_advantage:  # the samples with an advantage first: the first `trained` hold them all
                order = order[torch.argsort((advantages.cpu()[order] == 0).to(torch.int8), stable=True)]
            for start in range(0, trained, t.batch_size):
                batch = order[start:start + t.batch_size]
                rows, cols = batch.to(self.device), step_order[batch].to(self.device)
                cond = {name: v[rows] for name, v in traj.conditioning.items()}
                negative = self.negative if train_cfg else None
                adv, w = advantages[rows], weights[rows]
                for j in range(k):
                    col = cols[:, j]
                    x = traj.latents[rows, col].contiguous()
                    x_next = traj.next_latents[rows, col].contiguous()
                    old_log_prob = traj.log_probs[rows, col].contiguous()
                    indices = traj.step_indices[rows, col]
                    step_t = self.step.timesteps[indices]
                    out = self.model.denoise(self.engine, x, step_t, cond, negative, self.precision)
                    # the starting model's output, for the KL penalty to its step
                    ref = self.reference_output(x, step_t, cond, negative) if t.kl_beta > 0 else None
                    loss, stats = self.loss_fn(out, x, x_next, indices, old_log_prob, adv, w, ref)
                    kl = stats.get("kl", torch.zeros((), device=self.device))
                    self.engine.backward(loss)
                    if self.engine.step():
                        grad_norms.append(self.engine.last_grad_norm)
                        if self.ema is not None:
                            self.ema.after_optimizer_step()
                    sums += torch.stack([loss.detach(), stats["approx_kl"], stats["clipfrac"], kl]).double()
                    count += 1
                    if progress is not None:
                        progress.update(1)
        result = dict(zip(["loss", "approx_kl", "clipfrac", "kl"], (sums / max(count, 1)).tolist()))
        finite = [g for g in grad_norms if math.isfinite(g)]
        result["grad_norm"] = float(np.mean(finite)) if finite else float("nan")
        result["skipped_samples"] = n - trained
        return result

    def samples_to_train(self, advantages: torch.Tensor) -> int:
        """With train.skip_zero_advantage: how many samples (of this rank's, nonzero advantages first)
        train. The same on every rank, and whole optimizer steps, so that ranks and the engine's
        accumulation boundaries stay in step: the most any rank needs, rounded up."""
        t = self.config.train
        needed = math.ceil(int((advantages != 0).sum()) / t.batch_size)
        batches = max(distributed.all_gather_objects(needed))
        batches = math.ceil(batches / t.gradient_accumulation_steps) * t.gradient_accumulation_steps
        return min(batches * t.batch_size, len(advantages) // t.batch_size * t.batch_size)

    @property
    def train_guidance(self) -> float | None:
        """The CFG scale of the training forward (None: trained without CFG)."""
        c = self.config
        return c.sample.guidance_scale if (c.use_cfg and c.train.cfg) else None

    def loss_fn(self, out, x, x_next, indices, old_log_prob, advantages, weights, reference_output=None):
        """The algorithm's loss of one step and its stats; with `reference_output`, plus train.kl_beta x
        the KL to the starting model's step (fused into the DDPO-IS loss op), logged as `kl`."""
        t = self.config.train
        if t.algorithm == "ddpo_is":
            return self.step.ppo_loss(out, x, x_next, indices, old_log_prob, advantages, clip_range=t.clip_range,
                                      adv_clip_max=t.adv_clip_max, guidance_scale=self.train_guidance,
                                      reference_output=reference_output, kl_beta=t.kl_beta)
        log_prob = self.step.log_prob(out, x, x_next, indices, guidance_scale=self.train_guidance)
        if t.algorithm == "ddpo_sf":  # REINFORCE: the score function weighted by the advantage
            loss = -(advantages.clamp(-t.adv_clip_max, t.adv_clip_max) * log_prob).mean()
        else:  # rwr: likelihood weighted by exp(beta * advantage), normalised over the batch
            loss = -(weights * log_prob).mean()
        log_ratio = (log_prob - old_log_prob).detach()
        stats = {"approx_kl": 0.5 * (log_ratio**2).mean(),
                 "clipfrac": ((log_ratio.exp() - 1).abs() > t.clip_range).float().mean(), "log_prob": log_prob.detach()}
        if reference_output is not None:
            kl = self.step.kl(out, reference_output, x, indices, guidance_scale=self.train_guidance)
            loss, stats = add_kl_penalty(loss, stats, kl, t.kl_beta)
        return loss, stats


# ---- entry point -------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m ddpo_fast.train",
        description="DDPO / Flow-GRPO finetuning of a diffusion model (SD, SDXL, SD3 families). Settings are key=value overrides of a preset "
                    "(then of --config FILE, then of the command line).",
        epilog="keys (key=default):\n" + cfg.help_key_list(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", help=f"one of: {', '.join(cfg.PRESETS)} (default {cfg.DEFAULT_PRESET})")
    parser.add_argument("--config", metavar="FILE", help="a YAML or JSON file of keys (as on the command line, or "
                                                         "nested by section); key=value arguments win over it")
    parser.add_argument("--run-dir", help="output directory (config.json, metrics.jsonl, plots, checkpoints, model); "
                                          "must be new or empty")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete what an earlier run left in --run-dir and start again")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    if args.resume and args.run_dir and Path(args.run_dir) != Path(args.resume):
        parser.error("--resume RUN_DIR continues in RUN_DIR; do not also give a different --run-dir")
    if args.resume and args.preset:
        parser.error("--preset is not used with --resume: the run's config.json holds its settings")
    if args.resume and args.overwrite:
        parser.error("--overwrite starts a new run; --resume continues one: give one of them")
    if not args.resume and not args.run_dir:
        parser.error("give --run-dir DIR (a new run) or --resume RUN_DIR")
    return args


def resolve_config(args, world_size: int) -> tuple[cfg.Config, Path, Resume | None]:
    """The validated config, the run directory and, with --resume, what to resume; raises ConfigError
    before anything is written or any model is built."""
    overrides = cfg.read_config_file(args.config) if args.config else {}
    overrides.update(cfg.parse_overrides(args.overrides))  # the command line wins
    resume = None
    if args.resume:
        run_dir = Path(args.resume)
        resume = plan_resume(run_dir, overrides, world_size)
        config = resume.config
    else:
        run_dir = Path(args.run_dir)
        check_new_run(run_dir, args.overwrite)
        config = cfg.from_preset(args.preset or cfg.DEFAULT_PRESET, overrides)
    cfg.validate(config, world_size)
    check_environment(config)
    return config, run_dir, resume


def check_environment(config: cfg.Config) -> None:
    """What the values need from this machine: packages, files, importable user functions."""
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise cfg.ConfigError("mixed_precision=fp16 needs a CUDA GPU (DeepSpeed's CPU accelerator has no fp16); use bf16")
    for key, package, needed in [("attention=xformers", "xformers", config.attention == "xformers"),
                                 ("log_wandb=true", "wandb", config.log_wandb)]:
        if needed and importlib.util.find_spec(package) is None:
            raise cfg.ConfigError(f"{key} needs the {package} package (pip install {package})")
    try:
        check_model_source(config.model)
        if config.reward_server in ("", "auto"):  # a running server was started with its own options
            check_reward(config.reward, **reward_options(config))
        check_prompt_fn(config.prompts)
    except ValueError as e:
        raise cfg.ConfigError(str(e)) from None


def configure_device(device: torch.device) -> None:
    if device.type == "cuda":
        # TF32 for what still runs in fp32 (the optimizer's matmul-free math is unaffected), and
        # cuDNN's autotuner for the fixed convolution shapes of a run.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    else:
        # Denormal floats (tiny Adam moments and gradients) slow CPU kernels by 10-20x: measured on
        # the tiny model, a train phase of 3 s took 50-75 s in some epochs without this.
        torch.set_flush_denormal(True)


def describe(config: cfg.Config, world_size: int, engine_name: str, precision: Precision) -> str:
    s, t = config.sample, config.train
    return "\n".join([
        f"ddpo_fast: model={config.model} reward={config.reward} prompts={config.prompts} "
        f"algorithm={t.algorithm} engine={engine_name}"
        + (f" zero_stage={config.zero_stage}" if engine_name == "deepspeed" else "")
        + f" lora={config.use_lora} mixed_precision={precision.mode} compile={config.compile} ranks={world_size}",
        f"  samples per epoch: {config.samples_per_rank * world_size} "
        f"(sample.batch_size {s.batch_size} x sample.num_batches_per_epoch {s.num_batches_per_epoch} x {world_size} ranks)",
        f"  train.batch_size {t.batch_size} per rank; {config.train_batches_per_epoch} train batches per rank per inner epoch; "
        f"timesteps trained per sample {config.num_train_timesteps} of {s.num_steps}",
        f"  backward calls per optimizer step (engine gradient_accumulation_steps): {config.engine_accumulation_steps}; "
        f"optimizer steps per epoch: {config.optimizer_steps_per_epoch}; epochs: {config.num_epochs}",
    ])


def main(argv=None) -> Path:
    args = parse_args(argv)
    rank, _, world_size = distributed.world()
    config, run_dir, resume = resolve_config(args, world_size)  # all errors before anything is written or built
    engine_name = cfg.resolved_engine(config, world_size)
    device = distributed.rank_device()
    from ddpo_fast.rewards.run import SERVER_STARTUP_TIMEOUT

    distributed.init(device, distributed.process_group_timeout(config.reward_timeout, SERVER_STARTUP_TIMEOUT),
                     use_deepspeed=engine_name == "deepspeed")
    configure_device(device)
    precision = Precision.for_device(config.mixed_precision, device)
    if resume is None and rank == 0:  # every rank has checked the directory before joining the group
        start_new_run(run_dir, config, args.overwrite)
    distributed.barrier()
    log(describe(config, world_size, engine_name, precision))

    with contextlib.ExitStack() as stack:
        reward_fn, server = make_reward(config, run_dir)  # first: a reward that cannot start fails fast
        if server is not None:
            stack.callback(server.close)
        return _train(config, run_dir, engine_name, device, precision, resume, reward_fn)


def _train(config: cfg.Config, run_dir: Path, engine_name: str, device: torch.device, precision: Precision,
           resume: Resume | None, reward_fn) -> Path:
    rank, _, world_size = distributed.world()
    from ddpo_fast.models import load_model, set_attention

    torch.manual_seed(config.seed)
    try:
        model = load_model(config.model, resolution=config.sample.resolution)
    except ValueError as e:  # a resolution the model cannot take
        raise cfg.ConfigError(str(e)) from None
    model.place(device, precision.dtype)
    set_attention(model.denoiser, config.attention)
    denoiser, params = prepare_denoiser(model, config)
    engine = (DeepSpeedEngine if engine_name == "deepspeed" else TorchEngine)(denoiser, params, config, precision,
                                                                              device)
    pool = RewardPool(reward_fn, workers=config.reward_workers, device=device)
    stop = StopRequests()
    trainer = Trainer(config, run_dir, model, engine, device, precision, get_prompt_fn(config.prompts), pool, stop)
    start_epoch, last_saved = 0, None
    if resume is not None:
        start_epoch = resume.start_epoch
        if resume.checkpoint is not None:
            engine.load(resume.checkpoint)
            engine.apply_optimizer_settings(config.train)  # the checkpoint restored the old ones
            state = json.loads((resume.checkpoint / "trainer_state.json").read_text())
            if trainer.tracker is not None and state.get("tracker") is not None:
                trainer.tracker.load_state_dict(state["tracker"])
            trainer.dropped_samples = state.get("dropped_samples", 0)
            if trainer.ema is not None:
                trainer.ema.load_state_dict(torch.load(resume.checkpoint / "ema.pt", weights_only=True))
            last_saved = state["epoch"]
            log(f"resumed from {resume.checkpoint} at epoch {start_epoch}")
        if rank == 0:  # written once the checkpoint loaded: what config.json says is what runs
            changes = {k: list(v) for k, v in resume.changes.items()}
            history = resume.history + ([{"epoch": start_epoch, "changes": changes}] if changes else [])
            write_config(run_dir, config, history)
        if resume.changes:
            log(f"changed on resume, from epoch {start_epoch}: "
                + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in resume.changes.items()))
    logger = Logger(run_dir, config, start_epoch) if rank == 0 else None
    log(f"trajectory buffer: {describe_buffer(trainer, config)}")

    def checkpoint_of(epoch: int) -> Path:
        state = {"epoch": epoch, "tracker": trainer.tracker.state_dict() if trainer.tracker else None,
                 "dropped_samples": trainer.dropped_samples, "engine": engine_name, "world_size": world_size}
        extra = {"ema.pt": trainer.ema.state_dict()} if trainer.ema is not None else {}
        return save_checkpoint(run_dir, epoch, engine, state, config.num_checkpoint_limit, extra)

    try:
        with stop:
            for epoch in range(start_epoch, config.num_epochs):
                try:
                    record = trainer.run_epoch(epoch)
                except _StopSampling:  # the weights are still those of the last finished epoch
                    finished = epoch - 1
                    if last_saved == finished:
                        saved = run_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{finished}"
                    elif epoch > start_epoch:
                        saved = checkpoint_of(finished)
                    else:  # no epoch finished: nothing to keep
                        saved = None
                    raise Stopped(stop.received, saved, how_to_launch(engine_name, world_size, run_dir)) from None
                images, grid_prompts, grid_rewards = record.pop("_grid")
                samples = record.pop("_samples")
                eval_grid = record.pop("_eval_grid", None)
                last = epoch == config.num_epochs - 1
                if rank == 0:
                    logger.log(record)
                    print(f"epoch {epoch}: reward {record['reward_mean']:.4f} ± {record['reward_std']:.4f}  "
                          f"loss {record['loss']:.3g}  kl {record['approx_kl']:.3g}  clipfrac {record['clipfrac']:.3f}  "
                          + (f"kl_to_start {record['kl']:.3g}  " if config.train.kl_beta else "")
                          + f"{record['samples_per_s']:.2f} samples/s", flush=True)
                    if epoch % config.save_freq == 0 or last:
                        grid = run_dir / "samples" / f"epoch_{epoch:04d}.png"
                        save_grid(grid, images, grid_prompts, grid_rewards)
                        logger.log_grid(grid, epoch)
                        save_samples(run_dir / "samples" / f"epoch_{epoch:04d}.jsonl", samples)
                    if eval_grid is not None:
                        grid = run_dir / "samples" / f"eval_{epoch:04d}.png"
                        save_grid(grid, *eval_grid)
                        logger.log_grid(grid, epoch, tag="eval")
                        print(f"epoch {epoch}: eval reward {record['eval/reward_mean']:.4f} ({grid})", flush=True)
                stopping = trainer.stop_requested()
                if (epoch + 1) % config.checkpoint_freq == 0 or last or stopping:
                    saved = checkpoint_of(epoch)
                    last_saved = epoch
                    if stopping and not last:
                        raise Stopped(stop.received, saved, how_to_launch(engine_name, world_size, run_dir))
    finally:
        pool.close()
        if logger is not None:
            logger.close()

    final = engine.module
    if config.ema.use_for_final:  # (no EMA under ZeRO-3: the config check refuses it)
        with trainer.ema.swapped_in():
            if rank == 0:
                out = save_final_model(model, final, config, run_dir)
    elif engine_name == "deepspeed" and config.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(final.parameters()), modifier_rank=None):
            if rank == 0:
                out = save_final_model(model, final, config, run_dir)
    elif rank == 0:
        out = save_final_model(model, final, config, run_dir)
    distributed.barrier()
    if rank == 0:
        grids = sorted((run_dir / "samples").glob("epoch_*.png"))
        print(f"final model: {out}")
        print(f"sample grid: {grids[-1] if grids else None}")
        print(f"reward curve: {run_dir / 'reward_curve.png'}")
        print(f"metrics: {run_dir / 'metrics.jsonl'}", flush=True)
    return run_dir


def describe_buffer(trainer: Trainer, config: cfg.Config) -> str:
    from ddpo_fast.sampling import expected_bytes_per_sample

    latent_shape = trainer.model.latent_shape
    nbytes = expected_bytes_per_sample(config.num_train_timesteps, latent_shape, trainer.storage_dtype,
                                       trainer.encode([""]))
    return (f"{nbytes} bytes per sample ({config.num_train_timesteps} steps x 2 latents "
            f"{tuple(latent_shape)} in {str(trainer.storage_dtype).replace('torch.', '')} + log-probs, "
            f"step indices, prompt conditioning)")


def cli(argv=None) -> int:
    try:
        main(argv)
    except cfg.ConfigError as e:
        print(f"ddpo_fast.train: error: {e}", file=sys.stderr)
        return 2
    except RunFinished as e:
        log(f"ddpo_fast.train: {e}")
        return 0
    except RewardError as e:  # (RewardServerError too) the checkpoints written so far stay; --resume continues
        print(f"ddpo_fast.train: error: {e}\nThe checkpoints written so far are kept; continue with --resume "
              "RUN_DIR once the reward is fixed.", file=sys.stderr)
        return 1
    except Stopped as e:
        log(f"ddpo_fast.train: {e}")
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(cli())
