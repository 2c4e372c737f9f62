"""Benchmark of the fused ops against eager PyTorch, torch.compile and trl 0.23.1.

For each op and size it times every candidate interleaved round by round (so all see the same
machine load) and prints the median time, the achieved bandwidth against the bytes the op must move
(each input read once, each output written once), that bandwidth as a fraction of a measured
device copy, and the speedup of each fused backend over the eager reference, torch.compile of the
reference, and trl's scheduler_step.

    python benchmarks/ops.py                       # CPU: C++ kernels vs baselines
    python benchmarks/ops.py --isa all             # CPU: every compiled kernel variant side by side
    python benchmarks/ops.py --device cuda         # GPU: CUDA and Triton kernels vs baselines
    python benchmarks/ops.py --quick               # fewer sizes and repetitions
    python benchmarks/ops.py --threads 1           # every candidate on one thread
    python benchmarks/ops.py --only drop-in        # one view: drop-in, low-level, or noise (Philox per variant)
    python benchmarks/ops.py --only low-level --ops KL   # the ops whose name has "KL" (the loss with the KL penalty)

Two views. Low-level: `ddim_step_logprob` / `ddim_ppo_loss` on per-sample alphas, the step's noise
from the in-kernel Philox stream (`cpu[ISA]` names the CPU kernel variant), against eager PyTorch and
torch.compile with `torch.randn` outside (timed with it); "philox ns/normal" is the step with Philox
noise minus the step reading a noise tensor, per normal; `ddim_ppo_loss` with the KL penalty
(reference_output, kl_beta) against the reference with the KL term, eager and compiled, beside the
fused loss without it and with the KL computed in PyTorch beside it (bench_loss_kl). Drop-in: `ddim_step_with_logprob(scheduler,
...)` exactly as other DDPO code calls it: sampling with a `torch.Generator` (the same noise as
diffusers draws, so the `torch.randn` of that noise, candidate `randn`, is every candidate's floor;
"x randn" is each candidate's time over it), and training: the log-prob of a given `prev_sample` ->
`ppo_clip_loss` -> backward, beside the fused `ddim_ppo_loss`; against trl 0.23.1's `scheduler_step`
(CFG outside, as trl's pipeline does) and torch.compile of the same math with the same `torch.randn`.
Candidates run interleaved, so each starts with caches disturbed by the others, as an op between
UNet calls does. Noise (CPU): the Philox noise per variant in one thread's CPU time, which other
processes on the machine disturb far less than wall time (CSV: ..._noise.csv).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from ddpo_fast import ops, reference
from ddpo_fast.backends import _C, cuda_kernels_built, triton_available, use_backend
from results_csv import write_rows  # benchmarks/ is the script's folder

GUIDANCE = 5.0
SIZES = [(1, (4, 64, 64)), (8, (4, 64, 64)), (32, (4, 64, 64)), (7, (4, 17, 23))]
QUICK_SIZES = [(32, (4, 64, 64)), (7, (4, 17, 23))]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, megabytes: int = 256) -> float:
    """GB/s of a large device copy, counting bytes read plus bytes written."""
    src = torch.randn(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(times[2:]) / 1e9


def time_interleaved(candidates: dict, device: torch.device, rounds: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each candidate, run round-robin in a new random order each round
    (a candidate that always ran right after another would inherit its wake: torch's OpenMP
    workers spin for a while after each parallel region, caches hold the other's data)."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in candidates}
    order = random.Random(0)
    for _ in range(rounds):
        names = list(candidates)
        order.shuffle(names)
        for name in names:
            fn = candidates[name]
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def fused_backends(device: torch.device, isa: str = "auto") -> list[str]:
    """Fused candidates: 'cpu[ISA]' (the chosen CPU variant, or every one with isa='all'), 'cuda', 'triton'."""
    if device.type == "cpu":
        if _C is None:
            return []
        isas = list(_C.supported_cpu_isas()) if isa == "all" else [_C.cpu_isa() if isa == "auto" else isa]
        return [f"cpu[{name}]" for name in isas]
    names = ["cuda"] if cuda_kernels_built() else []
    return names + (["triton"] if triton_available() else [])


@contextlib.contextmanager
def on_backend(name: str):
    """Runs under the backend of a candidate name; 'cpu[ISA]' also selects the CPU kernel variant."""
    if not name.startswith("cpu["):
        with use_backend(name):
            yield
        return
    previous = _C.cpu_isa()
    _C.set_cpu_isa(name[4:-1])
    try:
        with use_backend("cpu"):
            yield
    finally:
        _C.set_cpu_isa(previous)


def make_inputs(batch: int, shape: tuple, device: torch.device):
    g = torch.Generator().manual_seed(0)
    model_output = torch.randn((2 * batch,) + shape, generator=g).to(device)
    sample = torch.randn((batch,) + shape, generator=g).to(device)
    alpha_t = torch.full((batch,), 0.5, device=device)
    alpha_prev = torch.full((batch,), 0.6, device=device)
    return model_output, sample, alpha_t, alpha_prev


def reference_step(model_output, sample, alpha_t, alpha_prev, noise):
    return reference.ddim_step(model_output, sample, alpha_t, alpha_prev, noise=noise, guidance_scale=GUIDANCE)


def reference_loss(model_output, sample, prev_sample, alpha_t, alpha_prev, old_log_prob, advantages):
    loss, _ = reference.ddim_ppo_loss(model_output, sample, prev_sample, alpha_t, alpha_prev, old_log_prob, advantages,
                                      clip_range=1e-4, adv_clip_max=5.0, guidance_scale=GUIDANCE)
    return loss


def trl_candidate(model_output, sample, device):
    """trl 0.23.1's scheduler_step with CFG applied outside, as trl's pipeline does; None if absent."""
    try:
        from diffusers import DDIMScheduler
        from trl.models.modeling_sd_base import scheduler_step
    except ImportError:
        return None
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(50)
    timestep = scheduler.timesteps[25].expand(sample.shape[0]).to(device)

    def step():
        uncond, cond = model_output.chunk(2)
        guided = uncond + GUIDANCE * (cond - uncond)
        return scheduler_step(scheduler, guided, timestep, sample, eta=1.0)

    return step


def bench_step(batch, shape, device, rounds, backends):
    model_output, sample, alpha_t, alpha_prev = make_inputs(batch, shape, device)
    compiled = torch.compile(reference_step)  # the math; its noise comes from torch.randn, timed with it

    def baseline(step):
        return lambda: step(model_output, sample, alpha_t, alpha_prev, torch.randn(sample.shape, device=device))

    candidates = {"eager": baseline(reference_step), "compile": baseline(compiled)}
    trl = trl_candidate(model_output, sample, device)
    if trl is not None:
        candidates["trl"] = trl
    noise = torch.randn(sample.shape, device=device)
    for name in backends:
        def fused(name=name):
            with on_backend(name):
                return ops.ddim_step_logprob(model_output, sample, alpha_t, alpha_prev, seed=1, offset=2,
                                             guidance_scale=GUIDANCE)

        def given_noise(name=name):
            with on_backend(name):
                return ops.ddim_step_logprob(model_output, sample, alpha_t, alpha_prev, noise=noise,
                                             guidance_scale=GUIDANCE)
        candidates[name] = fused
        candidates[f"{name}+noise"] = given_noise  # reads a noise tensor: the difference is the Philox cost
    numel = sample.numel()
    bytes_moved = 4 * (2 * numel + numel + numel)  # read both CFG halves and x_t, write x_{t-1}
    return candidates, bytes_moved


def loss_inputs(model_output, sample, alpha_t, alpha_prev):
    """(prev_sample, old_log_prob, advantages, leaf, run) of a training step: leaf is model_output
    requiring grad, run(loss_fn) a candidate that clears leaf.grad and backpropagates loss_fn()."""
    prev_sample, old_log_prob = reference_step(model_output, sample, alpha_t, alpha_prev, torch.randn_like(sample))
    advantages = torch.randn(sample.shape[0], device=sample.device)
    leaf = model_output.clone().requires_grad_()

    def run(loss_fn):
        def step():
            leaf.grad = None
            loss_fn().backward()
        return step

    return prev_sample, old_log_prob, advantages, leaf, run


def bench_loss(batch, shape, device, rounds, backends):
    model_output, sample, alpha_t, alpha_prev = make_inputs(batch, shape, device)
    prev_sample, old_log_prob, advantages, leaf, run = loss_inputs(model_output, sample, alpha_t, alpha_prev)
    compiled = torch.compile(reference_loss)
    candidates = {
        "eager": run(lambda: reference_loss(leaf, sample, prev_sample, alpha_t, alpha_prev, old_log_prob, advantages)),
        "compile": run(lambda: compiled(leaf, sample, prev_sample, alpha_t, alpha_prev, old_log_prob, advantages)),
    }
    for name in backends:
        def fused(name=name):
            with on_backend(name):
                return ops.ddim_ppo_loss(leaf, sample, prev_sample, alpha_t, alpha_prev, old_log_prob, advantages,
                                         clip_range=1e-4, adv_clip_max=5.0, guidance_scale=GUIDANCE)[0]
        candidates[name] = run(fused)
    numel = sample.numel()
    # forward reads both halves, x_t, x_{t-1}; backward reads them again and writes both halves' grads
    bytes_moved = 4 * (4 * numel + 4 * numel + 2 * numel)
    return candidates, bytes_moved


KL_BETA = 0.1


def reference_loss_kl(model_output, sample, prev_sample, alpha_t, alpha_prev, old_log_prob, advantages,
                      reference_output):
    loss, _ = reference.ddim_ppo_loss(model_output, sample, prev_sample, alpha_t, alpha_prev, old_log_prob, advantages,
                                      clip_range=1e-4, adv_clip_max=5.0, guidance_scale=GUIDANCE,
                                      reference_output=reference_output, kl_beta=KL_BETA)
    return loss


def bench_loss_kl(batch, shape, device, rounds, backends):
    """ddim_ppo_loss with the KL penalty to a reference output (reference_output, kl_beta), fused, against
    the eager reference with the KL term, its torch.compile, and, per backend, the loss without the KL
    ("no kl": the penalty's cost) and the fused loss plus the KL in PyTorch beside it ("+torch kl",
    reference.ddim_kl: how ddpo_fast.train adds it before the fused op takes it)."""
    model_output, sample, alpha_t, alpha_prev = make_inputs(batch, shape, device)
    prev_sample, old_log_prob, advantages, leaf, run = loss_inputs(model_output, sample, alpha_t, alpha_prev)
    g = torch.Generator().manual_seed(1)
    reference_output = model_output + 0.05 * torch.randn(model_output.shape, generator=g).to(device)
    args = (sample, prev_sample, alpha_t, alpha_prev, old_log_prob, advantages)
    compiled = torch.compile(reference_loss_kl)
    candidates = {"eager": run(lambda: reference_loss_kl(leaf, *args, reference_output)),
                  "compile": run(lambda: compiled(leaf, *args, reference_output))}
    for name in backends:
        def fused(name=name):
            with on_backend(name):
                return ops.ddim_ppo_loss(leaf, *args, clip_range=1e-4, adv_clip_max=5.0, guidance_scale=GUIDANCE,
                                         reference_output=reference_output, kl_beta=KL_BETA)[0]

        def without_kl(name=name):
            with on_backend(name):
                return ops.ddim_ppo_loss(leaf, *args, clip_range=1e-4, adv_clip_max=5.0, guidance_scale=GUIDANCE)[0]

        def torch_kl(name=name):
            with on_backend(name):
                loss = ops.ddim_ppo_loss(leaf, *args, clip_range=1e-4, adv_clip_max=5.0, guidance_scale=GUIDANCE)[0]
            kl = reference.ddim_kl(leaf, reference_output, alpha_t, alpha_prev, eta=1.0, guidance_scale=GUIDANCE)
            return loss + KL_BETA * kl.mean()
        candidates[name] = run(fused)
        candidates[f"{name} no kl"] = run(without_kl)
        candidates[f"{name}+torch kl"] = run(torch_kl)
    numel = sample.numel()
    # forward reads both halves of model_output and of reference_output, x_t, x_{t-1}; backward reads them
    # again and writes both halves' grads
    bytes_moved = 4 * (6 * numel + 6 * numel + 2 * numel)
    return candidates, bytes_moved


def drop_in_scheduler():
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(50)
    return scheduler


def trl_scheduler_step():
    try:
        from trl.models.modeling_sd_base import scheduler_step
    except ImportError:
        return None
    return scheduler_step


def guided(model_output):
    uncond, cond = model_output.chunk(2)
    return uncond + GUIDANCE * (cond - uncond)


def bench_drop_in_step(batch, shape, device, rounds, backends):
    """ddim_step_with_logprob(scheduler, ..., generator=g) as ddpo-pytorch and trl call it."""
    model_output, sample, _, _ = make_inputs(batch, shape, device)
    scheduler = drop_in_scheduler()
    timestep = scheduler.timesteps[25]
    alpha_t, alpha_prev = ops.scheduler_alphas(scheduler, timestep, batch, device)
    generator = torch.Generator(device=device).manual_seed(0)
    compiled = torch.compile(reference_step)

    def randn():
        return torch.randn(sample.shape, generator=generator, device=device)

    candidates = {"randn": randn,
                  "compile": lambda: compiled(model_output, sample, alpha_t, alpha_prev, randn())}
    scheduler_step = trl_scheduler_step()
    if scheduler_step is not None:
        per_sample = timestep.expand(batch).to(device)
        candidates["trl"] = lambda: scheduler_step(scheduler, guided(model_output), per_sample, sample, eta=1.0,
                                                   generator=generator)
    for name in backends:
        def drop_in(name=name):
            with on_backend(name):
                return ops.ddim_step_with_logprob(scheduler, model_output, timestep, sample, eta=1.0,
                                                  generator=generator, guidance_scale=GUIDANCE)
        candidates[f"drop-in {name}"] = drop_in
    numel = sample.numel()
    return candidates, 4 * (2 * numel + numel + numel)


def bench_drop_in_training(batch, shape, device, rounds, backends):
    """ddim_step_with_logprob(scheduler, ..., prev_sample=...) -> ppo_clip_loss -> backward, and the
    fused ddim_ppo_loss that replaces the pair."""
    model_output, sample, _, _ = make_inputs(batch, shape, device)
    scheduler = drop_in_scheduler()
    timestep = scheduler.timesteps[25]
    alpha_t, alpha_prev = ops.scheduler_alphas(scheduler, timestep, batch, device)
    prev_sample, old_log_prob, advantages, leaf, run = loss_inputs(model_output, sample, alpha_t, alpha_prev)
    compiled = torch.compile(reference_loss)
    candidates = {"compile": run(lambda: compiled(leaf, sample, prev_sample, alpha_t, alpha_prev, old_log_prob,
                                                  advantages))}
    scheduler_step = trl_scheduler_step()
    if scheduler_step is not None:
        per_sample = timestep.expand(batch).to(device)

        def trl_loss():  # trl's DDPOTrainer.loss on scheduler_step's log-prob
            log_prob = scheduler_step(scheduler, guided(leaf), per_sample, sample, eta=1.0,
                                      prev_sample=prev_sample).log_probs
            ratio = torch.exp(log_prob - old_log_prob)
            adv = advantages.clamp(-5.0, 5.0)
            return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - 1e-4, 1 + 1e-4)).mean()
        candidates["trl"] = run(trl_loss)
    for name in backends:
        def drop_in(name=name):
            with on_backend(name):
                log_prob = ops.ddim_step_with_logprob(scheduler, leaf, timestep, sample, eta=1.0,
                                                      prev_sample=prev_sample, guidance_scale=GUIDANCE).log_prob
                return ops.ppo_clip_loss(log_prob, old_log_prob, advantages, 1e-4, 5.0)[0]

        def fused(name=name):
            with on_backend(name):
                return ops.ddim_ppo_loss(leaf, sample, prev_sample, alpha_t, alpha_prev, old_log_prob, advantages,
                                         clip_range=1e-4, adv_clip_max=5.0, guidance_scale=GUIDANCE)[0]
        candidates[f"drop-in {name}"] = run(drop_in)
        candidates[f"ddim_ppo_loss {name}"] = run(fused)
    numel = sample.numel()
    return candidates, 4 * (4 * numel + 4 * numel + 2 * numel)


def noise_table(rounds: int) -> list[dict]:
    """The in-kernel Philox noise per CPU variant, in thread CPU time on one thread (robust to other
    processes sharing the cores): the sampling kernel with Philox noise minus the same kernel reading
    a noise tensor, per normal, beside torch.randn's CPU time per normal (its generator is one
    thread) and the time to write 4 bytes at the measured single-thread write speed."""
    from ddpo_fast.backends import DdimCall, runner

    batch, numel = 32, 4 * 64 * 64
    model_output, sample = torch.randn(2 * batch, numel), torch.randn(batch, numel)
    alpha_t, alpha_prev = torch.full((batch,), 0.5), torch.full((batch,), 0.6)
    noise, prev, log_prob = torch.randn(batch, numel), torch.empty(batch, numel), torch.empty(batch)
    common = dict(model_output=model_output, sample=sample, alpha_t=alpha_t, alpha_prev=alpha_prev,
                  prev_sample=prev, log_prob=log_prob, sample_noise=True, guidance_scale=GUIDANCE)
    philox, given = DdimCall(seed=1, offset=2, **common), DdimCall(noise=noise, **common)
    cpu = runner("cpu")
    previous_threads, previous_isa = torch.get_num_threads(), _C.cpu_isa()
    torch.set_num_threads(1)  # the runner hands torch's thread count to the kernels

    def cpu_seconds(fn) -> float:
        fn()
        samples = []
        for _ in range(rounds):
            start = time.thread_time()
            fn()
            samples.append(time.thread_time() - start)
        return statistics.median(samples)

    try:
        generator = torch.Generator().manual_seed(0)
        randn_ns = cpu_seconds(lambda: noise.normal_(generator=generator)) / noise.numel() * 1e9
        write_ns = cpu_seconds(lambda: prev.fill_(1.0)) / prev.numel() * 1e9
        rows = []
        for isa in _C.supported_cpu_isas():
            _C.set_cpu_isa(isa)
            with_philox, with_tensor = cpu_seconds(lambda: cpu.forward(philox)), cpu_seconds(lambda: cpu.forward(given))
            rows.append({"op": "philox noise (1 thread, CPU time)", "size": f"{batch}x4x64x64", "candidate": f"cpu[{isa}]",
                         "ns_per_normal": (with_philox - with_tensor) / noise.numel() * 1e9,
                         "step_philox_ms": with_philox * 1e3, "step_noise_tensor_ms": with_tensor * 1e3,
                         "torch_randn_ns_per_normal": randn_ns, "write_ns_per_float": write_ns})
    finally:
        torch.set_num_threads(previous_threads)
        _C.set_cpu_isa(previous_isa)
    print(f"{'Philox noise, 1 thread, CPU time':36} {'variant':>12} {'ns/normal':>10} {'step ms':>8} "
          f"{'step ms, noise tensor':>22}")
    for row in rows:
        print(f"{'':36} {row['candidate']:>12} {row['ns_per_normal']:10.2f} {row['step_philox_ms']:8.3f} "
              f"{row['step_noise_tensor_ms']:22.3f}")
    print(f"{'':36} {'torch.randn':>12} {randn_ns:10.2f}   (writing a float: {write_ns:.2f} ns)\n")
    return rows


LOW_LEVEL = {"ddim_step (sampling, CFG)": bench_step, "ddim_ppo_loss fwd+bwd (CFG)": bench_loss,
             "ddim_ppo_loss+KL fwd+bwd (CFG)": bench_loss_kl}
DROP_IN = {"drop-in step, generator (CFG)": bench_drop_in_step,
           "drop-in prev_sample->ppo->bwd (CFG)": bench_drop_in_training}


def ratio(times: dict, name: str, seconds: float, inverse: bool = False) -> float:
    if name not in times:
        return float("nan")
    return seconds / times[name] if inverse else times[name] / seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per candidate")
    parser.add_argument("--isa", default="auto", help="CPU kernel variant(s): auto (the machine's choice), all, or a name")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for every candidate (default: torch's; 1 is the fairest "
                             "measure on a machine that others load: no parallel region waits for a descheduled thread)")
    parser.add_argument("--only", choices=["low-level", "drop-in", "noise"], default=None, help="one view only")
    parser.add_argument("--ops", default=None, help="only the ops whose name contains this text (e.g. KL)")
    parser.add_argument("--csv", type=Path, default=None, help="CSV output (default benchmarks/results/ops_DEVICE.csv)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (15 if args.quick else 40)
    sizes = QUICK_SIZES if args.quick else SIZES
    backends = fused_backends(device, args.isa)
    if not backends:
        print("no fused backend available on", device, file=sys.stderr)
        return 1
    bandwidth = copy_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    isa = ""
    if _C is not None and device.type == "cpu":
        isa = f", CPU kernels: {_C.cpu_isa()} (the machine's choice; built and supported: {', '.join(_C.supported_cpu_isas())})"
    print(f"device: {name}{isa}; torch {torch.__version__}; measured copy bandwidth {bandwidth:.1f} GB/s\n")
    rows, noise_rows = [], []
    if device.type == "cpu" and args.only in (None, "noise"):
        noise_rows = noise_table(rounds)
    views = {"low-level": LOW_LEVEL, "drop-in": DROP_IN}
    benches = {op: build for view, table in views.items() if args.only in (None, view) for op, build in table.items()
               if args.ops is None or args.ops in op}

    header = f"{'op':36} {'size':>11} {'candidate':>26} {'median ms':>10} {'GB/s':>7} {'of copy':>8} " \
             f"{'vs eager':>8} {'vs compile':>10} {'vs trl':>7} {'x randn':>8}"
    print(header)
    print("-" * len(header))
    for op_name, build in benches.items():
        for batch, shape in sizes:
            candidates, bytes_moved = build(batch, shape, device, rounds, backends)
            times = time_interleaved(candidates, device, rounds)
            size = f"{batch}x{'x'.join(map(str, shape))}"
            for candidate, seconds in times.items():
                gbps = bytes_moved / seconds / 1e9
                row = {
                    "op": op_name, "size": size, "candidate": candidate, "median_ms": seconds * 1e3,
                    "gb_per_s": gbps, "fraction_of_copy": gbps / bandwidth,
                    "speedup_vs_eager": ratio(times, "eager", seconds),
                    "speedup_vs_compile": ratio(times, "compile", seconds),
                    "speedup_vs_trl": ratio(times, "trl", seconds),
                    "over_randn": ratio(times, "randn", seconds, inverse=True),
                }
                rows.append(row)
                print(f"{op_name:36} {size:>11} {candidate:>26} {row['median_ms']:10.3f} {gbps:7.1f} "
                      f"{row['fraction_of_copy']:8.0%} {row['speedup_vs_eager']:8.2f} "
                      f"{row['speedup_vs_compile']:10.2f} {row['speedup_vs_trl']:7.2f} {row['over_randn']:8.2f}")
                if candidate.endswith("+noise") and candidate[:-6] in times:
                    philox_ns = (times[candidate[:-6]] - seconds) / (batch * math.prod(shape)) * 1e9
                    print(f"{'':36} {'':>11} {'philox ' + candidate[:-6]:>26} {philox_ns:10.2f} ns/normal "
                          f"(writing it at copy speed: {4 / bandwidth:.2f} ns/normal)")
            print()
    path = args.csv or Path(__file__).parent / "results" / f"ops_{device.type}.csv"
    if rows:
        write_rows(path, rows)
    if noise_rows:
        write_rows(path.with_name(f"{path.stem}_noise.csv"), noise_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
