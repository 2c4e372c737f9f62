"""Throughput of each reward, in the trainer's process and through the reward server.

For jpeg_compressibility, aesthetic, llava_bertscore and the human-preference rewards (pickscore,
clipscore, hpsv2, imagereward) on random-weight models (tiny by default; the published architectures
with --full-size: CLIP ViT-L/14, LLaVA-1.5-7B + RoBERTa-large, CLIP ViT-H/14 for pickscore and hpsv2,
BLIP ViT-L/16 + BERT-base for imagereward), it prints images/s of
  - in-process: the reward function called on batches of --batch images;
  - served, 1 client: the same batches sent one after another to `python -m ddpo_fast.rewards.serve`
    over loopback (the cost of the transport: encoding, copies, HTTP);
  - served, C clients: --clients threads sending batches at once, which the server merges into larger
    reward calls (up to --max-batch images).
Every mode gets the same images; the first call of each is a warm-up and is not timed.

    python benchmarks/rewards.py                                   # tiny models on the CPU
    python benchmarks/rewards.py --full-size --device cuda:0 --size 512   # GPU, paper-size models
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from ddpo_fast import rewards
from ddpo_fast.rewards.client import RemoteReward, start_server
from ddpo_fast.rewards.random_models import REWARDS as LEARNED, save_reward_models
from results_csv import write_rows  # benchmarks/ is the script's folder

REPO = Path(__file__).resolve().parent.parent
REWARDS = ["jpeg_compressibility", "aesthetic", "llava_bertscore", "pickscore", "clipscore", "hpsv2", "imagereward"]


def timed_calls(fn, images: torch.Tensor, prompts: list[str], calls: int) -> float:
    """Median seconds of one call after a warm-up call."""
    fn(images, prompts, [{}] * len(prompts))
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn(images, prompts, [{}] * len(prompts))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def concurrent_throughput(url: str, reward: str, images, prompts, clients: int, calls: int) -> float:
    """Images/s with `clients` threads each sending `calls` batches at once (after one warm-up each)."""
    remotes = [RemoteReward(url, reward, timeout=600) for _ in range(clients)]
    for remote in remotes:
        remote(images, prompts, [{}] * len(prompts))
    barrier = threading.Barrier(clients + 1)
    errors = []

    def client(remote):
        barrier.wait()
        try:
            for _ in range(calls):
                remote(images, prompts, [{}] * len(prompts))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(r,)) for r in remotes]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return clients * calls * len(prompts) / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rewards", default=",".join(REWARDS), help="comma-separated rewards to measure")
    parser.add_argument("--full-size", action="store_true", help="the published architectures' shapes")
    parser.add_argument("--device", default="cpu", help="reward device (cpu, cuda:0, ...)")
    parser.add_argument("--batch", type=int, default=16, help="images per call")
    parser.add_argument("--size", type=int, default=64, help="image height and width (the tiny model makes 64)")
    parser.add_argument("--calls", type=int, default=5, help="timed calls per mode")
    parser.add_argument("--clients", type=int, default=2, help="concurrent clients of the served mode")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="llava_bertscore answer length cap")
    parser.add_argument("--csv", default=str(REPO / "benchmarks" / "results" / "rewards.csv"))
    args = parser.parse_args()

    size = "full" if args.full_size else "tiny"
    on_gpu = args.device.startswith("cuda")
    models = Path(tempfile.mkdtemp(prefix="bench-rewards-"))
    print(f"saving {size} random reward models in {models} ...", flush=True)
    names = args.rewards.split(",")
    options = {name: rewards.parse_options(text) for name, text in save_reward_models(
        models, size, device=args.device if on_gpu else "cpu", dtype=torch.bfloat16 if args.full_size else torch.float32,
        rewards=tuple(n for n in names if n in LEARNED)).items()}
    if "llava_bertscore" in options:
        options["llava_bertscore"]["max_new_tokens"] = str(args.max_new_tokens)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8, generator=generator)
    prompts = [f"a cat riding a bike {i}" for i in range(args.batch)]

    rows = []
    print(f"{size} models, {args.batch} images of {args.size}x{args.size} per call, device {args.device}, "
          f"median of {args.calls} calls")
    print(f"{'reward':<22}{'in-process':>12}{'served':>10}{f'served x{args.clients}':>14}   images/s")
    for name in names:
        reward_options = dict(options.get(name, {}))
        if name != "jpeg_compressibility":
            reward_options["device"] = args.device
            if args.full_size and on_gpu:
                reward_options["dtype"] = "bf16"
        fn = rewards.build(name, **reward_options)
        local = args.batch / timed_calls(fn, images, prompts, args.calls)
        del fn
        with start_server(name, reward_options, max_batch=args.batch * args.clients) as server:
            served = args.batch / timed_calls(server.remote(timeout=600), images, prompts, args.calls)
            served_many = concurrent_throughput(server.url, name, images, prompts, args.clients, args.calls)
        print(f"{name:<22}{local:>12.1f}{served:>10.1f}{served_many:>14.1f}", flush=True)
        rows.append({"reward": name, "models": size, "device": args.device, "batch": args.batch, "size": args.size,
                     "in_process": round(local, 2), "served": round(served, 2),
                     f"served_x{args.clients}": round(served_many, 2)})
    write_rows(args.csv, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
