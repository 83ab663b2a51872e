"""What the platform costs on top of the training it schedules: `python -m bench.study`.

N equal trials (digits, PGD-AT, one seed each) run twice in one run of this script: one after
another in this process through `gacd.train.fit` (no Ray, no MLflow), then as an ablation
through `python -m study.run` on a fresh local Ray instance, one trial at a time with the same
CPU threads. Reported, as ratios:
- whole study: its wall time over the direct runs' (Ray's start, MLflow, worker processes, the
  report);
- per trial, start-up included: Ray's time for the trial (its worker's imports, data and model
  building, every epoch) over the direct fit's;
- per trial, start-up excluded: inside each trial, the time between Ray's reports over the
  training loop's own epoch time, after the first epoch (what every further epoch pays for its
  report, checkpoint and MLflow logging; measured in one process, so free of the noise between
  runs).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from bench.step import write_results
from gacd.config import Config
from gacd.train import fit


def trial_values(epochs: int, seed: int) -> dict:
    return {
        "method": "pgd_at",
        "device": "cpu",
        "seed": seed,
        "data": {"name": "digits", "batch_size": 64},
        "student": {"arch": "small_cnn", "width": 32},
        "optim": {"epochs": epochs, "lr": 0.05},
        "attack": {"epsilon": 0.1, "steps": 5},
        "eval": {"val_steps": 5, "autoattack": False},
    }


def direct(trials: int, epochs: int, threads: int) -> list[float]:
    torch.set_num_threads(threads)
    seconds = []
    for seed in range(trials):
        config = Config.from_dict({**trial_values(epochs, seed), "final": True})
        started = time.perf_counter()
        fit(config)
        seconds.append(time.perf_counter() - started)
    return seconds


def through_study(
    trials: int, epochs: int, threads: int, folder: Path
) -> tuple[float, list[float], list[float]]:
    """The study's wall time, each trial's time in Ray, and each trial's per-epoch ratio."""
    base = trial_values(epochs, 0)
    del base["seed"]
    spec = {
        "study": {
            "name": "bench",
            "mode": "ablation",
            "metric": "test/pgd_acc",
            "max_concurrent": 1,
        },
        "resources": {"cpus_per_trial": threads},
        "base": base,
        "ablation": {"seeds": list(range(trials))},
    }
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(spec))
    command = [
        sys.executable,
        "-m",
        "study.run",
        str(path),
        "--num-cpus",
        str(threads),
        "--storage",
        str(folder / "results"),
        "--tracking-uri",
        f"sqlite:///{folder / 'mlflow.db'}",
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    wall = time.perf_counter() - started
    trials_seen = []
    for result_file in sorted((folder / "results" / "bench").glob("*/result.json")):
        rows = [json.loads(line) for line in result_file.read_text().strip().splitlines()]
        after_first = rows[1:]
        per_epoch = sum(r["time_this_iter_s"] for r in after_first) / sum(
            r["time/epoch_s"] for r in after_first
        )
        trials_seen.append((rows[-1]["config"]["seed"], rows[-1]["time_total_s"], per_epoch))
    trials_seen.sort()
    return wall, [seconds for _, seconds, _ in trials_seen], [ratio for *_, ratio in trials_seen]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.study", description=__doc__)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (and CPUs) per trial")
    parser.add_argument("--out", default="bench/results/study.json")
    args = parser.parse_args(argv)
    direct_seconds = direct(args.trials, args.epochs, args.threads)
    with tempfile.TemporaryDirectory() as folder:
        wall, study_seconds, per_epoch = through_study(
            args.trials, args.epochs, args.threads, Path(folder)
        )
    per_trial = [s / d for s, d in zip(study_seconds, direct_seconds, strict=True)]
    result = {
        "trials": args.trials,
        "epochs": args.epochs,
        "direct_trial_s": direct_seconds,
        "study_trial_s": study_seconds,
        "study_wall_s": wall,
        "ratio_whole_study": wall / sum(direct_seconds),
        "ratio_per_trial_startup_included": sum(per_trial) / len(per_trial),
        "ratio_per_trial_startup_excluded": sum(per_epoch) / len(per_epoch),
    }
    print(f"direct trials   {', '.join(f'{s:.1f}' for s in direct_seconds)} s")
    print(f"study trials    {', '.join(f'{s:.1f}' for s in study_seconds)} s (Ray's time)")
    print(
        f"whole study     {wall:.1f} s vs {sum(direct_seconds):.1f} s direct: "
        f"ratio {result['ratio_whole_study']:.3f}"
    )
    print(
        f"per trial       ratio {result['ratio_per_trial_startup_included']:.3f} "
        f"(start-up included), {result['ratio_per_trial_startup_excluded']:.3f} "
        "(start-up excluded: per epoch after the first)"
    )
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
