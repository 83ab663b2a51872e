"""What one GPU gains from running small trials side by side: `python -m bench.packing`.

For each concurrency N, N Ray tasks run at once on a fresh local Ray instance (127.0.0.1), each
holding 1/N of the CPU cores and, on CUDA, 1/N of the GPU (Ray's fractional `num_gpus`), set up
as a study's trial is (`study.trainable.set_up_worker`: CPU threads, and GPU memory capped at
its share of the card). Each task is a small trial: `bench.step.build`'s GACD method, warm-up
steps, then full training steps (forward, backward, optimizer step) between two wall-clock
times; a barrier starts every task's timed steps together. Throughput for N: all tasks' images
over the span from the earliest start to the latest end; its speed-up is that throughput over
N=1's. Only figures measured in one run are compared (the machines are noisy).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import asdict, replace

import torch

# Local Ray instances bind to 127.0.0.1 only (Ray reads this when it is imported).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray

from bench.step import CASES, VARIANTS, Case, build, synchronize, write_results
from gacd.runtime import resolve_device
from study.trainable import set_up_worker

PACKING_CASES = {
    "digits_cnn_cpu": CASES["digits_cnn_cpu"],
    "resnet18_resnet18_cuda": Case(
        "resnet18_resnet18_cuda",
        {"arch": "resnet18"},
        {"arch": "resnet18"},
        32,
        3,
        10,
        128,
        5,
        50000,
        "cuda",
    ),
}
DEFAULT_CASE = {"cpu": "digits_cnn_cpu", "cuda": "resnet18_resnet18_cuda"}
DEFAULT_VARIANT = {"cpu": "fp32_channels_last", "cuda": "bf16_channels_last"}


class Barrier:
    """A Ray actor every task waits on until all `parties` have arrived."""

    def __init__(self, parties: int) -> None:
        self.parties = parties
        self.arrived = 0
        self.everyone = asyncio.Event()

    async def wait(self) -> None:
        self.arrived += 1
        if self.arrived == self.parties:
            self.everyone.set()
        await self.everyone.wait()


def small_trial(
    case: Case, variant: str, cpus: float, gpus: float, steps: int, warmup: int, barrier
) -> dict:
    """One packed trial (a Ray task): `steps` timed training steps after `warmup` untimed."""
    set_up_worker(cpus, gpus)
    device = resolve_device(case.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    setup = build(case, device, variant)
    for _ in range(warmup):
        setup.step()
    synchronize(device)
    ray.get(barrier.wait.remote())
    started = time.time()
    for _ in range(steps):
        setup.step()
    synchronize(device)
    return {"images": steps * case.batch, "start": started, "end": time.time()}


def gather(refs: list) -> list:
    """`ray.get`, raising the first task's failure at once: the others would wait at the barrier
    for it forever."""
    pending = refs
    while pending:
        done, pending = ray.wait(pending)
        ray.get(done)
    return ray.get(refs)


def run_packed(
    case: Case, variant: str, concurrency: int, cpus: int, steps: int, warmup: int
) -> dict:
    gpus = 1 / concurrency if case.device == "cuda" else 0.0
    cpus_per_trial = cpus / concurrency
    barrier = ray.remote(num_cpus=0)(Barrier).remote(concurrency)
    task = ray.remote(num_cpus=cpus_per_trial, num_gpus=gpus, max_retries=0)(small_trial)
    trials = gather(
        [
            task.remote(case, variant, cpus_per_trial, gpus, steps, warmup, barrier)
            for _ in range(concurrency)
        ]
    )
    ray.kill(barrier)
    images = sum(trial["images"] for trial in trials)
    seconds = max(trial["end"] for trial in trials) - min(trial["start"] for trial in trials)
    return {
        "concurrency": concurrency,
        "gpus_per_trial": gpus,
        "cpus_per_trial": cpus_per_trial,
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds,
        "per_trial_images_per_s": [
            trial["images"] / (trial["end"] - trial["start"]) for trial in trials
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.packing", description=__doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per trial")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cuda" if torch.cuda.is_available() else "cpu",
    )
    parser.add_argument("--case", choices=sorted(PACKING_CASES), help="default: by --device")
    parser.add_argument(
        "--variant",
        choices=sorted(VARIANTS),
        help="bench.step's speed switches for every trial (default: fp32_channels_last on "
        "CPU, bf16_channels_last on CUDA)",
    )
    parser.add_argument("--out", default="bench/results/packing.json")
    args = parser.parse_args(argv)
    case = replace(PACKING_CASES[args.case or DEFAULT_CASE[args.device]], device=args.device)
    variant = args.variant or DEFAULT_VARIANT[args.device]
    cpus = os.cpu_count() or 1

    ray.init(
        address="local",
        num_cpus=cpus,
        num_gpus=1 if args.device == "cuda" else 0,
        include_dashboard=False,
    )
    try:
        rows = [
            run_packed(case, variant, n, cpus, args.steps, args.warmup) for n in args.concurrency
        ]
    finally:
        ray.shutdown()
    single = next((row["images_per_s"] for row in rows if row["concurrency"] == 1), None)
    for row in rows:
        row["speedup_vs_1"] = row["images_per_s"] / single if single else None
        per_trial = row["per_trial_images_per_s"]
        print(
            f"{case.name:22} N={row['concurrency']}  {row['images_per_s']:8.0f} images/s total"
            f"  {sum(per_trial) / len(per_trial):8.0f} per trial"
            + (f"  speed-up {row['speedup_vs_1']:.2f}" if single else ""),
            flush=True,
        )
    result = {
        "device": args.device,
        "case": asdict(case),
        "variant": variant,
        "steps": args.steps,
        "warmup": args.warmup,
        "rows": rows,
    }
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    # Ray sends tasks by reference to their module: `bench.packing`, not `__main__`.
    from bench import packing

    sys.exit(packing.main())
