"""The packing benchmark on CPU, and the GPU memory cap packed trials get."""

from __future__ import annotations

import json

import pytest
import ray
import torch

from bench import packing, step
from study.trainable import limit_gpu_memory


def test_step_bench_compares_variants_against_their_floors_and_counts_every_pass(tmp_path):
    out = tmp_path / "step.json"
    argv = ["--cases", "digits_cnn_cpu", "--variants", "fp32_contiguous", "fp32_channels_last"]
    argv += ["--repeats", "2", "--warmup", "1", "--loop-batches", "2", "--out", str(out)]
    assert step.main(argv) == 0
    rows = json.loads(out.read_text())["results"]
    assert [row["variant"] for row in rows] == ["fp32_contiguous", "fp32_channels_last"]
    case = step.CASES["digits_cnn_cpu"]
    setup = step.build(case, torch.device("cpu"))
    with step.CountFlops() as student:
        setup.method.student(setup.batch.x).sum().backward()
    with step.CountFlops() as teacher:
        setup.teacher.features(setup.batch.x)
    for row in rows:
        assert min(row["floor_s"], row["step_s"], row["epoch_s"]) > 0
        assert row["ratio_step_to_floor"] == pytest.approx(row["step_s"] / row["floor_s"])
        # The step holds (PGD steps + 1) student passes, the attack's without weight gradients.
        assert row["step_flops"] > (case.steps + 1) * student.total * 2 / 3 + teacher.total
        assert 0 < row["fraction_of_matmul_rate"] < 1
    assert rows[0]["speedup_vs_first_variant"] == 1


@pytest.mark.slow
def test_packing_measures_every_image_of_every_packed_trial(tmp_path):
    out = tmp_path / "packing.json"
    argv = ["--device", "cpu", "--concurrency", "1", "2", "--steps", "3", "--warmup", "1"]
    assert packing.main([*argv, "--out", str(out)]) == 0
    assert not ray.is_initialized()
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["case"]["name"] == "digits_cnn_cpu"
    rows = result["rows"]
    assert [row["concurrency"] for row in rows] == [1, 2]
    batch = result["case"]["batch"]
    for row in rows:
        n = row["concurrency"]
        assert row["images"] == n * 3 * batch
        assert row["images_per_s"] > 0 and len(row["per_trial_images_per_s"]) == n
        assert all(speed > 0 for speed in row["per_trial_images_per_s"])
        assert row["gpus_per_trial"] == 0 and row["cpus_per_trial"] > 0
    assert rows[0]["speedup_vs_1"] == 1
    assert rows[1]["speedup_vs_1"] == pytest.approx(
        rows[1]["images_per_s"] / rows[0]["images_per_s"]
    )


@pytest.mark.parametrize("gpus", [0.0, 1.0, 2.0])
def test_a_whole_gpu_or_none_leaves_memory_uncapped(gpus):
    assert limit_gpu_memory(gpus) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_without_cuda_a_fractional_gpu_caps_nothing():
    assert limit_gpu_memory(0.5) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_fractional_gpu_cannot_allocate_beyond_its_share():
    device = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(device).total_memory
    try:
        assert limit_gpu_memory(0.25) == 0.25
        with pytest.raises(torch.cuda.OutOfMemoryError):
            torch.empty(int(0.3 * total), dtype=torch.uint8, device=device)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


@pytest.mark.slow
def test_study_bench_compares_a_real_study_with_the_same_trials_run_directly(tmp_path):
    from bench import study

    out = tmp_path / "study.json"
    assert study.main(["--trials", "1", "--epochs", "3", "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["direct_trial_s"]) == len(result["study_trial_s"]) == 1
    # Every ratio is a time over a time of the same work: positive, and a study is no free lunch.
    assert result["study_wall_s"] > result["study_trial_s"][0] > 0
    assert result["ratio_whole_study"] > 1
    assert result["ratio_per_trial_startup_excluded"] > 0.9


@pytest.mark.slow
def test_the_gpu_script_runs_every_part_in_its_dry_run(tmp_path):
    """`bash bench/gpu.sh --dry-run`: every part of the GPU script (the gpu tests, bench.step,
    bench.packing, a two-trial study) runs on the CPU and ends well, its results under $OUT,
    and the targets are reported, not judged. A GPU-less run without --dry-run is refused."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", "bench/gpu.sh", "--dry-run"],
        cwd=root,
        env={**os.environ, "OUT": str(out)},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [p["part"] for p in summary["parts"]] == ["gpu_tests", "step", "packing", "study"]
    assert all(p["rc"] == 0 for p in summary["parts"]), summary["parts"]
    assert summary["targets"] and all(
        t["verdict"] == "not judged (dry run)" for t in summary["targets"]
    )
    assert {"summary.md", "step.json", "packing.json", "study.log"} <= {
        p.name for p in out.iterdir()
    }
    if not torch.cuda.is_available():
        refused = subprocess.run(
            ["bash", "bench/gpu.sh"], cwd=root, env={**os.environ, "OUT": str(tmp_path / "no")},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert refused.returncode == 2 and "no CUDA device" in refused.stdout
