"""How close one GACD training step is to its compute floor: `python -m bench.step`.

The step is what `gacd.train.train_epoch` does per batch: the teacher's forward on the clean
batch, PGD on the student (`steps` forward+backward passes), the student's forward+backward on
x', the contrastive critic and memory bank, the optimizer step. Its floor is the sum of its
parts timed alone in the same run: the student's forward+backward, times (steps + 1), plus the
teacher's forward. The ratio step / floor is the overhead the step adds on top of the model
passes it cannot avoid (the floor counts full backward passes for the attack, which needs only
input gradients, so a ratio under 1 is possible). Medians of repeated timings; the machine is
noisy, so only ratios measured in one run are compared.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gacd.config import Config
from gacd.data import Batch, DatasetSpec
from gacd.methods import METHODS
from gacd.teacher import FrozenTeacher, build_classifier
from gacd.train import resolve_device


@dataclass
class Case:
    name: str
    student: dict
    teacher: dict
    image_size: int
    channels: int
    classes: int
    batch: int
    steps: int
    train_size: int
    device: str  # cpu | cuda


CASES = {
    "digits_cnn_cpu": Case(
        "digits_cnn_cpu",
        {"arch": "small_cnn", "width": 16},
        {"arch": "small_cnn", "width": 32},
        8,
        1,
        10,
        64,
        5,
        1293,
        "cpu",
    ),
    "resnet18_cpu": Case(
        "resnet18_cpu",
        {"arch": "resnet18"},
        {"arch": "resnet18"},
        32,
        3,
        10,
        32,
        2,
        5000,
        "cpu",
    ),
    "resnet18_wrn34_cuda": Case(
        "resnet18_wrn34_cuda",
        {"arch": "resnet18"},
        {"arch": "wide_resnet", "depth": 34, "width": 10},
        32,
        3,
        10,
        128,
        10,
        50000,
        "cuda",
    ),
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(function, device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        function()
    synchronize(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def build(case: Case, device: torch.device):
    spec = DatasetSpec(
        case.classes,
        case.channels,
        case.image_size,
        (0.5,) * case.channels,
        (0.25,) * case.channels,
        1,
        False,
    )
    config = Config.from_dict(
        {
            "device": case.device,
            "teacher.checkpoint": "unused.pt",
            "student": case.student,
            "attack.steps": case.steps,
            "negatives.count": 4096,
        }
    )
    teacher = FrozenTeacher(
        build_classifier(
            Config.from_dict({"method": "natural", "student": case.teacher}).student, spec
        )
    ).to(device)
    student = build_classifier(config.student, spec)
    labels = torch.arange(case.train_size) % case.classes
    method = METHODS.get("gacd")(config, student, teacher, labels).to(device)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(case.batch, case.channels, case.image_size, case.image_size, generator=generator)
    batch = Batch(
        x.to(device), labels[: case.batch].to(device), torch.arange(case.batch, device=device)
    )
    return method, teacher, batch


def measure(case: Case, repeats: int, warmup: int) -> dict:
    device = resolve_device(case.device)
    torch.manual_seed(0)
    method, teacher, batch = build(case, device)
    method.train()
    optimizer = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        loss = method(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def student_pass() -> None:
        method.student(batch.x).sum().backward()

    def teacher_pass() -> None:
        teacher.head(teacher.features(batch.x))

    embed_dim = method.config.embed_dim
    anchors = torch.nn.functional.normalize(torch.randn(case.batch, embed_dim, device=device))
    embeddings = torch.nn.functional.normalize(torch.randn(case.batch, embed_dim, device=device))

    def contrast_pass() -> None:
        # The contrastive critic alone (memory-bank NCE, both directions), forward+backward.
        method.contrast(anchors, embeddings.requires_grad_(True), batch.index).sum().backward()

    step_s = median_seconds(step, device, repeats, warmup)
    contrast_s = median_seconds(contrast_pass, device, repeats, warmup)
    student_s = median_seconds(student_pass, device, repeats, warmup)
    teacher_s = median_seconds(teacher_pass, device, repeats, warmup)
    floor_s = (case.steps + 1) * student_s + teacher_s
    return {
        "case": case.name,
        "device": str(device),
        "batch": case.batch,
        "pgd_steps": case.steps,
        "step_s": step_s,
        "floor_s": floor_s,
        "student_fwd_bwd_s": student_s,
        "teacher_fwd_s": teacher_s,
        "contrast_fwd_bwd_s": contrast_s,
        "ratio_step_to_floor_plus_contrast": step_s / (floor_s + contrast_s),
        "ratio_step_to_floor": step_s / floor_s,
        "images_per_s": case.batch / step_s,
    }


def machine() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.step", description=__doc__)
    parser.add_argument(
        "--cases", nargs="+", choices=sorted(CASES), help="default: every case the machine can run"
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="bench/results/step.json")
    args = parser.parse_args(argv)
    names = args.cases or [
        n for n, c in CASES.items() if c.device == "cpu" or torch.cuda.is_available()
    ]
    rows = []
    for name in names:
        row = measure(CASES[name], args.repeats, args.warmup)
        rows.append(row)
        print(
            f"{name:22} step {row['step_s'] * 1e3:8.1f} ms  floor {row['floor_s'] * 1e3:8.1f} ms"
            f"  ratio {row['ratio_step_to_floor']:.3f}  {row['images_per_s']:8.0f} images/s"
            f"  (contrast {row['contrast_fwd_bwd_s'] * 1e3:.1f} ms; step / (floor + contrast) "
            f"{row['ratio_step_to_floor_plus_contrast']:.3f})",
            flush=True,
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "results": rows}, indent=2
        )
    )
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
