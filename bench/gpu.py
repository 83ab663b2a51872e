"""Everything GPU-side in one go, for the few minutes a GPU is lent: `bash bench/gpu.sh`.

Runs, each as its own process with its own time limit, writing under `$OUT` (or `--out`):
1. the `gpu`-marked tests (`pytest -m gpu`: the CUDA path against the CPU path, no host-device
   synchronisation inside a step under `torch.cuda.set_sync_debug_mode("error")`, ...);
2. `bench.step` on the CIFAR-size GACD step (ResNet-18 student of a WRN-34-10 teacher, PGD-10,
   batch 128, random CIFAR-shaped data) in fp32, bf16, bf16 + channels-last and bf16 + compile,
   each against its floor and the bf16 matmul rate measured in the same run;
3. `bench.packing` with 1, 2 and 4 small trials on one card;
4. a two-trial study through `study.run` (`search_spaces/smoke.yaml --budget gpu`: half a GPU
   per trial) on a real local Ray instance, its teacher trained first through Ray Train;
then checks the issue's targets from what they wrote, into `summary.json` and `summary.md`.

`--dry-run` runs the same parts on the CPU at toy sizes (CI runs it, so the script cannot rot):
the targets are then reported but not judged.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The targets.
STEP_TO_FLOOR_AT_MOST = 1.15
MATMUL_FRACTION_AT_LEAST = 0.25
PACKED_4_SPEEDUP_AT_LEAST = 3.0


@dataclass
class Part:
    name: str
    command: list[str]
    timeout_s: int


# What each part runs beyond its module, on a GPU and in the dry run (the CPU, toy sizes).
STEP = {
    False: "--cases resnet18_wrn34_cuda --variants fp32_contiguous bf16_contiguous "
    "bf16_channels_last bf16_channels_last_compile --repeats 8 --warmup 3",
    True: "--cases digits_cnn_cpu --variants fp32_contiguous fp32_channels_last "
    "--repeats 2 --warmup 1 --loop-batches 1",
}
PACKING = {
    False: "--device cuda --concurrency 1 2 4",
    True: "--device cpu --concurrency 1 2 --steps 2 --warmup 1",
}
STUDY = {False: "--budget gpu", True: ""}  # smoke.yaml: half a GPU per trial, or the CPUs
# Seconds each part may take: on a GPU they add up to the 8 minutes the script is given.
TIMEOUTS = {
    False: {"gpu_tests": 120, "step": 180, "packing": 60, "study": 120},
    True: {"gpu_tests": 300, "step": 300, "packing": 300, "study": 600},
}


def parts(out: Path, dry_run: bool) -> list[Part]:
    python = sys.executable
    commands = {
        "gpu_tests": ["-m", "pytest", "-q", "-m", "gpu", "tests"],
        "step": ["-m", "bench.step", *STEP[dry_run].split(), "--out", str(out / "step.json")],
        "packing": [
            "-m", "bench.packing", *PACKING[dry_run].split(), "--out", str(out / "packing.json")
        ],
        "study": [
            "-m", "study.run", "search_spaces/smoke.yaml", *STUDY[dry_run].split(),
            "--storage", str(out / "study" / "ray_results"),
            "--tracking-uri", f"sqlite:///{out / 'study' / 'mlflow.db'}",
        ],
    }  # fmt: skip
    return [
        Part(name, [python, *command], TIMEOUTS[dry_run][name])
        for name, command in commands.items()
    ]


def run_part(part: Part, out: Path) -> dict:
    """Run one part, its output in `<out>/<name>.log`; never raises (a failed part is a row)."""
    log = out / f"{part.name}.log"
    started = time.monotonic()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    with log.open("w") as output:
        try:
            rc = subprocess.run(
                part.command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
                timeout=part.timeout_s, env=env,
            ).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            rc = 124
    seconds = time.monotonic() - started
    print(f"{part.name:10} rc {rc:3}  {seconds:6.1f} s  -> {log}", flush=True)
    return {"part": part.name, "rc": rc, "seconds": round(seconds, 1), "log": str(log)}


def targets(out: Path, dry_run: bool) -> list[dict]:
    """The issue's targets, from the parts' JSON (missing figures: not measured)."""
    rows = []
    step = read(out / "step.json")
    by_variant = {row["variant"]: row for row in step.get("results", [])}
    for variant, row in by_variant.items():
        rows.append(
            target(
                f"{variant}: step / floor",
                row["ratio_step_to_floor"],
                f"<= {STEP_TO_FLOOR_AT_MOST}",
                row["ratio_step_to_floor"] <= STEP_TO_FLOOR_AT_MOST,
                dry_run,
            )
        )
    bf16 = [row for name, row in by_variant.items() if name.startswith("bf16")]
    if bf16:
        best = max(bf16, key=lambda row: row["fraction_of_matmul_rate"])
        rows.append(
            target(
                f"best bf16 step ({best['variant']}): fraction of bf16 matmul rate",
                best["fraction_of_matmul_rate"],
                f">= {MATMUL_FRACTION_AT_LEAST}",
                best["fraction_of_matmul_rate"] >= MATMUL_FRACTION_AT_LEAST,
                dry_run,
            )
        )
    packing = {row["concurrency"]: row for row in read(out / "packing.json").get("rows", [])}
    if 4 in packing:
        speedup = packing[4]["speedup_vs_1"]
        rows.append(
            target(
                "4 packed trials: throughput over 1",
                speedup,
                f">= {PACKED_4_SPEEDUP_AT_LEAST}",
                speedup >= PACKED_4_SPEEDUP_AT_LEAST,
                dry_run,
            )
        )
    return rows


def target(name: str, value: float, wanted: str, met: bool, dry_run: bool) -> dict:
    verdict = "not judged (dry run)" if dry_run else ("met" if met else "missed")
    return {"target": name, "value": round(value, 3), "wanted": wanted, "verdict": verdict}


def read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def markdown(summary: dict) -> str:
    lines = [
        f"# bench/gpu.sh, {summary['date']}{' (dry run, CPU)' if summary['dry_run'] else ''}",
        "",
        f"Device: {summary['device']}.",
        "",
        "| part | exit | seconds |",
        "|---|--:|--:|",
        *(f"| {p['part']} | {p['rc']} | {p['seconds']} |" for p in summary["parts"]),
        "",
        "| target | value | wanted | verdict |",
        "|---|--:|---|---|",
        *(
            f"| {t['target']} | {t['value']} | {t['wanted']} | {t['verdict']} |"
            for t in summary["targets"]
        ),
    ]
    return "\n".join(lines) + "\n"


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU only ({os.cpu_count()} cores)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bash bench/gpu.sh", description=__doc__)
    parser.add_argument("--dry-run", action="store_true", help="the CPU at toy sizes (CI)")
    parser.add_argument(
        "--out", default=os.environ.get("OUT") or "bench/results/gpu", help="default: $OUT"
    )
    parser.add_argument(
        "--only", nargs="+", choices=["gpu_tests", "step", "packing", "study"], help="these parts"
    )
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "study").mkdir(exist_ok=True)  # the study part's MLflow database lives there
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA device here (bench/gpu.sh --dry-run runs on the CPU)")
            return 2
    started = time.monotonic()
    selected = [p for p in parts(out, args.dry_run) if not args.only or p.name in args.only]
    results = [run_part(part, out) for part in selected]
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "dry_run": args.dry_run,
        "device": device_name(),
        "seconds": round(time.monotonic() - started, 1),
        "parts": results,
        "targets": targets(out, args.dry_run),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(markdown(summary))
    print(markdown(summary), end="")
    print(f"all parts in {summary['seconds']} s -> {out}")
    return 0 if all(part["rc"] == 0 for part in results) else 1


if __name__ == "__main__":
    sys.exit(main())
