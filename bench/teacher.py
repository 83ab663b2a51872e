"""The teacher's training, data-parallel against one worker: `python -m bench.teacher`.

Trains a study file's teacher (`study.teacher.train_teacher`, Ray Train's `TorchTrainer` on a
fresh local Ray instance bound to 127.0.0.1) once per worker count, on the same CPUs (or GPUs),
each into its own folder, and reports the wall time (Ray Train's start included), the training
epochs' median time, the final evaluation's time (the last epoch's time beyond a training epoch)
and the teacher's test accuracies, with each count's speed-up over the first count measured in
the same run. On CPUs each worker gets an equal share of `--cpus`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# Local Ray instances bind to 127.0.0.1 only (Ray reads this when it is imported).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from bench.step import write_results
from gacd import schema
from gacd.checkpoint import load_checkpoint
from study.spec import read_study_file
from study.teacher import Workers, train_teacher


def measure(spec_file: str, budget: str | None, epochs: int | None, workers: int, cpus: int,
            gpus: int, out: Path) -> dict:  # fmt: skip
    spec = read_study_file(spec_file, teacher_cache=out / "teachers", budget=budget)
    config = spec.teacher_training_config()
    if config is None:
        raise SystemExit(f"error: {spec_file} trains no teacher (teacher.train)")
    if epochs is not None:
        config.optim.epochs = epochs
    checkpoint = out / f"workers{workers}" / "checkpoint.pt"
    per_worker = Workers(workers, 1.0 if gpus else cpus / workers, 1.0 if gpus else 0.0)
    started = time.perf_counter()
    train_teacher(config, checkpoint, per_worker, max_failures=0)
    wall = time.perf_counter() - started
    history = load_checkpoint(checkpoint)["history"]
    seconds = [entry[schema.EPOCH_SECONDS] for entry in history]
    epoch_s = statistics.median(seconds[:-1]) if len(seconds) > 1 else seconds[0]
    last = history[-1]
    return {
        "workers": workers,
        "cpus_per_worker": per_worker.cpus,
        "gpus_per_worker": per_worker.gpus,
        "epochs": len(history),
        "wall_s": wall,
        "epoch_s_median": epoch_s,
        "final_evaluation_s": seconds[-1] - epoch_s,
        "metrics": {key: value for key, value in last.items() if key.startswith("test/")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.teacher", description=__doc__)
    parser.add_argument("--study", default="search_spaces/fashion_mnist_baselines.yaml")
    parser.add_argument("--budget", default=None, help="the study file's budget (default: its own)")
    parser.add_argument("--epochs", type=int, default=None, help="override the teacher's epochs")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--gpus", type=int, default=0, help="one per worker when > 0")
    parser.add_argument("--storage", default="runs/bench-teacher", help="the teachers' folders")
    parser.add_argument("--out", default="bench/results/teacher.json")
    args = parser.parse_args(argv)
    import ray

    rows = []
    for workers in args.workers:
        storage = Path(args.storage).resolve() / time.strftime("%Y%m%d-%H%M%S")
        ray.init(address="local", num_cpus=args.cpus, num_gpus=args.gpus, include_dashboard=False)
        try:
            row = measure(
                args.study, args.budget, args.epochs, workers, args.cpus, args.gpus, storage
            )
        finally:
            ray.shutdown()
        row["speedup_vs_first"] = (rows[0]["wall_s"] if rows else row["wall_s"]) / row["wall_s"]
        rows.append(row)
        shown = " ".join(f"{k.removeprefix('test/')}={v:.3f}" for k, v in row["metrics"].items())
        print(
            f"{workers} worker(s): {row['wall_s']:.0f} s (x{row['speedup_vs_first']:.2f}), "
            f"epochs {row['epoch_s_median']:.1f} s, final evaluation "
            f"{row['final_evaluation_s']:.0f} s; {shown}",
            flush=True,
        )
    write_results(args.out, {"study": args.study, "budget": args.budget, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
