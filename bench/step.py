"""How close one GACD training step is to its compute floor: `python -m bench.step`.

The step is `gacd.train.training_step`, what the training loop runs per batch: the teacher's
forward on the clean batch, PGD on the student (`steps` forward+backward passes), the student's
forward+backward on x', the contrastive critic and memory bank, the optimizer step. Its floor
is the sum of its parts timed alone in the same run: the student's forward+backward, times
(steps + 1), plus the teacher's forward. The ratio step / floor is the overhead the step adds on
top of the model passes it cannot avoid (the floor counts full backward passes for the attack,
which needs only input gradients, so a ratio under 1 is possible).

Each case runs in several variants of the speed switches (`precision`, `memory_format`,
`compile`), each with its own floor under the same switches, and reports:
- the FLOPs of one step (`torch.utils.flop_counter`'s formulas, on the eager float32 step) and
  the fraction of the device's matrix-multiply rate, measured in the same run, that the step
  achieves (bfloat16 rate for bf16 variants, float32 otherwise);
- the real loop (`gacd.train.train_epoch`: batches gathered and augmented on the device) over
  a few batches of a synthetic data set of the case's size, and from it seconds per epoch.

Medians of repeated timings, interleaved (the step and its parts take turns); the machine is
noisy, so only ratios measured in one run are compared.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from gacd.config import Config
from gacd.data import Batch, Datasets, DatasetSpec, ImageSplit, batches
from gacd.methods import METHODS, Method
from gacd.models import build_classifier
from gacd.runtime import resolve_device
from gacd.teacher import FrozenTeacher
from gacd.train import apply_speed_switches, train_epoch, training_step


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
    # The GPU case: CIFAR size, ResNet-18 student of a WRN-34-10 teacher, PGD-10.
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

# The speed switches of `gacd.config.Config`, by variant name.
VARIANTS = {
    "fp32_contiguous": {"precision": "fp32", "memory_format": "contiguous"},
    "fp32_channels_last": {"precision": "fp32", "memory_format": "channels_last"},
    "bf16_contiguous": {"precision": "bf16", "memory_format": "contiguous"},
    "bf16_channels_last": {"precision": "bf16", "memory_format": "channels_last"},
    "bf16_channels_last_compile": {
        "precision": "bf16",
        "memory_format": "channels_last",
        "compile": True,
    },
    "fp32_channels_last_compile": {
        "precision": "fp32",
        "memory_format": "channels_last",
        "compile": True,
    },
}
DEFAULT_VARIANTS = {
    "cpu": ["fp32_contiguous", "fp32_channels_last"],
    "cuda": [
        "fp32_contiguous",
        "fp32_channels_last",
        "bf16_channels_last",
        "bf16_channels_last_compile",
    ],
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    function: Callable[[], object], device: torch.device, repeats: int, warmup: int
) -> float:
    return interleaved_medians({"f": function}, device, repeats, warmup)["f"]


def interleaved_medians(
    functions: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int
) -> dict[str, float]:
    """Median seconds of each function, timed in rounds (one call of each per round), so that
    the machine's drifts in speed fall on all of them alike and their ratios stay fair."""
    for _ in range(warmup):
        for function in functions.values():
            function()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            synchronize(device)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


@dataclass
class Setup:
    """A case built in one variant: the GACD method, its teacher, its data and optimizer."""

    config: Config
    method: Method
    teacher: FrozenTeacher
    data: Datasets
    batch: Batch
    optimizer: torch.optim.Optimizer

    def step(self) -> dict[str, torch.Tensor]:
        return training_step(self.method, self.optimizer, self.batch, self.config.precision)


def build(case: Case, device: torch.device, variant: str = "fp32_channels_last") -> Setup:
    """The case's GACD method (randomly initialised teacher and student) on a synthetic data set
    of the case's size, in `variant`'s switches."""
    torch.manual_seed(0)
    spec = DatasetSpec(
        case.classes,
        case.channels,
        case.image_size,
        (0.5,) * case.channels,
        (0.25,) * case.channels,
        max(1, case.image_size // 8),
        case.channels == 3,
    )
    config = Config.from_dict(
        {
            "device": case.device,
            "teacher.checkpoint": "unused.pt",
            "student": case.student,
            "attack.steps": case.steps,
            "attack.objective": "contrastive",  # the guided attack, as every figure was measured
            "negatives.count": 4096,
            "data.batch_size": case.batch,
            **VARIANTS[variant],
        }
    )
    teacher_config = Config.from_dict({"method": "natural", "student": case.teacher}).student
    teacher = FrozenTeacher(build_classifier(teacher_config, spec)).to(device)
    student = build_classifier(config.student, spec)
    generator = torch.Generator().manual_seed(0)
    shape = (case.train_size, case.channels, case.image_size, case.image_size)
    train = ImageSplit(
        torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator),
        torch.arange(case.train_size) % case.classes,
    )
    data = Datasets(spec, train, train.subset(torch.arange(case.batch)), None).to(device)
    method = METHODS.get("gacd")(config, student, teacher, data.train.labels).to(device)
    for model in (method.student, teacher.model):
        apply_speed_switches(model, config, device)
    method.train()
    batch = next(batches(data.train, case.batch, device))
    optimizer = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9)
    return Setup(config, method, teacher, data, batch, optimizer)


class CountFlops(TorchDispatchMode):
    """The FLOPs of the operators run under it, by `torch.utils.flop_counter`'s formulas.

    (`FlopCounterMode` itself cannot follow `torch.autograd.grad`, which the attack uses.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def step_flops(setup: Setup) -> int:
    """Floating-point operations of one step (matrix multiplies and convolutions, forward and
    backward), counted on the eager step."""
    with CountFlops() as counter:
        setup.step()
    return counter.total


def matmul_rate(device: torch.device, dtype: torch.dtype, repeats: int = 10) -> float:
    """The device's measured dense matrix-multiply rate in FLOP/s for `dtype`."""
    size = 8192 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = median_seconds(lambda: a @ b, device, repeats, warmup=3)
    return 2 * size**3 / seconds


def measure(case: Case, variant: str, repeats: int, warmup: int, loop_batches: int) -> dict:
    device = resolve_device(case.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    setup = build(case, device, variant)
    method, teacher, batch = setup.method, setup.teacher, setup.batch
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=setup.config.precision == "bf16")

    def student_pass() -> None:
        with autocast:
            loss = method.student(batch.x).float().sum()
        loss.backward()

    def teacher_pass() -> None:
        with autocast:
            teacher.head(teacher.features(batch.x))

    embed_dim = setup.config.embed_dim
    anchors = torch.nn.functional.normalize(torch.randn(case.batch, embed_dim, device=device))
    embeddings = torch.nn.functional.normalize(torch.randn(case.batch, embed_dim, device=device))

    def contrast_pass() -> None:
        # The contrastive critic alone (memory-bank NCE, both directions), forward+backward.
        method.contrast(anchors, embeddings.requires_grad_(True), batch.index).sum().backward()

    seconds = interleaved_medians(
        {
            "step": setup.step,
            "contrast": contrast_pass,
            "student": student_pass,
            "teacher": teacher_pass,
        },
        device,
        repeats,
        warmup,
    )
    step_s, contrast_s = seconds["step"], seconds["contrast"]
    student_s, teacher_s = seconds["student"], seconds["teacher"]
    floor_s = (case.steps + 1) * student_s + teacher_s

    # The real loop: batches gathered from the device-held split and augmented there.
    def loop() -> None:
        train_epoch(method, setup.optimizer, setup.data, setup.config, 0, device, loop_batches)

    loop_step_s = median_seconds(loop, device, max(1, repeats // 3), 1) / loop_batches
    return {
        "case": case.name,
        "variant": variant,
        "device": str(device),
        "batch": case.batch,
        "pgd_steps": case.steps,
        "step_s": step_s,
        "floor_s": floor_s,
        "student_fwd_bwd_s": student_s,
        "teacher_fwd_s": teacher_s,
        "contrast_fwd_bwd_s": contrast_s,
        "ratio_step_to_floor": step_s / floor_s,
        "ratio_step_to_floor_plus_contrast": step_s / (floor_s + contrast_s),
        "images_per_s": case.batch / step_s,
        "loop_step_s": loop_step_s,
        "ratio_loop_step_to_step": loop_step_s / step_s,
        "epoch_s": loop_step_s * (case.train_size // case.batch),
    }


def add_rates(rows: list[dict], case: Case, repeats: int) -> None:
    """Each row's achieved FLOP/s and its fraction of the matrix rate of the variant's dtype."""
    device = resolve_device(case.device)
    flops = step_flops(build(case, device, "fp32_contiguous"))
    rates = {}
    for row in rows:
        dtype = torch.bfloat16 if VARIANTS[row["variant"]]["precision"] == "bf16" else torch.float32
        if dtype not in rates:
            rates[dtype] = matmul_rate(device, dtype, repeats)
        row["step_flops"] = flops
        row["achieved_flop_per_s"] = flops / row["step_s"]
        row["matmul_dtype"] = str(dtype).removeprefix("torch.")
        row["matmul_flop_per_s"] = rates[dtype]
        row["fraction_of_matmul_rate"] = row["achieved_flop_per_s"] / rates[dtype]
        row["speedup_vs_first_variant"] = rows[0]["step_s"] / row["step_s"]


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


def write_results(out: str | Path, results: dict) -> Path:
    """A benchmark's JSON: the date, the machine, then `results`; prints where it went."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), **results}
    out.write_text(json.dumps(payload, indent=2))
    print(f"-> {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.step", description=__doc__)
    parser.add_argument(
        "--cases", nargs="+", choices=sorted(CASES), help="default: every case the machine can run"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=sorted(VARIANTS),
        help=f"speed switches to compare (default on CPU: {' '.join(DEFAULT_VARIANTS['cpu'])}; "
        f"on CUDA: {' '.join(DEFAULT_VARIANTS['cuda'])})",
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--loop-batches", type=int, default=5, help="batches of the real loop per timing"
    )
    parser.add_argument("--out", default="bench/results/step.json")
    args = parser.parse_args(argv)
    names = args.cases or [
        n for n, c in CASES.items() if c.device == "cpu" or torch.cuda.is_available()
    ]
    rows = []
    for name in names:
        case = CASES[name]
        case_rows = [
            measure(case, variant, args.repeats, args.warmup, args.loop_batches)
            for variant in args.variants or DEFAULT_VARIANTS[case.device]
        ]
        add_rates(case_rows, case, args.repeats)
        for row in case_rows:
            print(
                f"{name:20} {row['variant']:27} step {row['step_s'] * 1e3:8.1f} ms"
                f"  floor {row['floor_s'] * 1e3:8.1f} ms  ratio {row['ratio_step_to_floor']:.3f}"
                f"  (+critic {row['ratio_step_to_floor_plus_contrast']:.3f})"
                f"  {row['images_per_s']:7.0f} images/s  x{row['speedup_vs_first_variant']:.2f}"
                f"  {row['fraction_of_matmul_rate']:.1%} of {row['matmul_dtype']} matmul"
                f"  epoch {row['epoch_s']:.1f} s",
                flush=True,
            )
        rows += case_rows
    write_results(args.out, {"results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
