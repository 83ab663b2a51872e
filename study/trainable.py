"""What runs inside a Ray worker: one trial (`train_trial`); the teacher: `study.teacher`.

It is `gacd.train.fit` with a report callback; it does not touch MLflow (the driver logs).
A trial checkpoints every epoch through `tune.report` and continues from
`tune.get_checkpoint()` after a retry or a resumed study, so epochs continue, not restart.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ray import tune

from gacd.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from gacd.config import Config, ConfigError
from gacd.data import DatasetNotFoundError, describe_splits, load_datasets
from gacd.runtime import resolve_device
from gacd.train import BEST_CHECKPOINT_FILE, NonFiniteLossError, State, best_checkpoint, fit
from study.spec import EPOCHS_TOTAL, RESULT_DATASETS, RESULT_DEVICE, StudySpec

CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.json"


def limit_gpu_memory(gpus: float) -> float | None:
    """Cap this process's CUDA caching allocator at a fractional GPU's share of the device, so
    trials packed onto one card fail with a CUDA out-of-memory error in their own process
    instead of starving their neighbours. Returns the fraction applied, or None (no CUDA, or
    `gpus` not in (0, 1)). Ray's `CUDA_VISIBLE_DEVICES` makes the current device the one held."""
    if not 0 < gpus < 1 or not torch.cuda.is_available():
        return None
    torch.cuda.set_per_process_memory_fraction(gpus, torch.cuda.current_device())
    return gpus


def set_up_worker(cpus: float, gpus: float) -> None:
    """As many intra-op threads as CPUs the trial holds, so packed trials do not oversubscribe;
    a fractional GPU's memory capped at its share; Ray's per-checkpoint info lines silenced
    (the driver prints one line per epoch)."""
    torch.set_num_threads(max(1, int(cpus)))
    limit_gpu_memory(gpus)
    logging.getLogger("ray.train").setLevel(logging.WARNING)


def restored_state() -> State | None:
    """The state of the checkpoint Ray restores the trial from. If that one is unreadable (a
    truncated or corrupted file), the newest older one Ray kept beside it that reads (its
    later epochs run again: the state holds the RNG, so they reproduce what was logged); if
    none reads, None: the trial starts over rather than fail on the same file at every retry."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        try:
            return load_checkpoint(Path(folder) / CHECKPOINT_FILE)
        except CheckpointError as error:
            print(f"warning: {error}; trying the checkpoint before it", flush=True)
    for older in older_checkpoints(checkpoint):
        try:
            return load_checkpoint(older / CHECKPOINT_FILE)
        except CheckpointError as error:
            print(f"warning: {error}; trying the checkpoint before it", flush=True)
    print("warning: no checkpoint of this trial reads: it starts over", flush=True)
    return None


def older_checkpoints(checkpoint: tune.Checkpoint) -> list[Path]:
    """The checkpoints Ray kept before `checkpoint` in the trial's folder, newest first
    (`--storage` is a filesystem path, so they are folders on this node's disk)."""
    latest = Path(checkpoint.path)
    kept = (folder for folder in latest.parent.glob("checkpoint_*") if folder.is_dir())
    return sorted((folder for folder in kept if folder.name < latest.name), reverse=True)


# A failure that would happen again from the same checkpoint: retrying it only spends
# another attempt's epochs. Its message is kept beside the trial, and a retry fails at once.
DETERMINISTIC_FAILURES = (NonFiniteLossError, ConfigError, CheckpointError, DatasetNotFoundError)
FAILURE_MARKER = "deterministic_failure.txt"


class RepeatedFailure(RuntimeError):
    """A retry of a trial whose last attempt failed deterministically (not run again)."""


def failure_marker() -> Path:
    """Beside the trial's checkpoints in `--storage` (one folder every node of a cluster sees),
    not in the node's own trial folder: a retry Ray places on another node sees it too."""
    return Path(tune.get_context().get_storage().trial_fs_path) / FAILURE_MARKER


def train_trial(ray_config: dict[str, Any], spec: StudySpec) -> None:
    """A Ray Tune function trainable: fit the trial's config, one report per epoch (the last
    checkpoint of a final run also holds `best.pt`, its best epoch's student). A diverging
    loss, a bad config or an unreadable file fails the trial once: Ray's retries of it end at
    once with the same reason instead of training again."""
    marker = failure_marker()
    if marker.is_file():
        raise RepeatedFailure(f"{marker.read_text().strip()} (not retried: it failed so before)")
    try:
        run_trial(ray_config, spec)
    except DETERMINISTIC_FAILURES as error:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{type(error).__name__}: {error}")
        raise


def run_trial(ray_config: dict[str, Any], spec: StudySpec) -> None:
    config = spec.trial_config(ray_config)
    workers = spec.resources.trial_workers
    set_up_worker(spec.resources.cpus_per_trial / workers, spec.resources.gpus_per_trial / workers)
    resume = restored_state()
    if workers > 1:
        with local_workers(ray_config, spec, resume):
            fit_and_report(config, resume)
    else:
        fit_and_report(config, resume)


def fit_and_report(config: Config, resume: State | None) -> None:
    """`fit` with one `tune.report` (metrics and checkpoint) per epoch."""
    device = str(resolve_device(config.device))
    data = load_datasets(config.data, config.seed, with_test=config.final)
    splits = json.dumps(describe_splits(config.data, data))

    def report(epoch_metrics: dict[str, float], state: State) -> None:
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(state, Path(folder) / CHECKPOINT_FILE)
            (Path(folder) / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
            # A final run's last checkpoint also holds its best epoch's student on its own.
            if state["epoch"] == config.optim.epochs and (best := best_checkpoint(state)):
                save_checkpoint(best, Path(folder) / BEST_CHECKPOINT_FILE)
            tune.report(
                {
                    **epoch_metrics,
                    EPOCHS_TOTAL: config.optim.epochs,
                    RESULT_DEVICE: device,
                    RESULT_DATASETS: splits,
                },
                checkpoint=tune.Checkpoint.from_directory(folder),
            )

    fit(config, report=report, resume=resume, data=data)


# --- a trial over several workers: its own processes, `gacd.parallel` over torch.distributed ---
#
# The trial's process is rank 0 (it reports to Tune and checkpoints, so Tune's retries,
# restores and MLflow logging stay as for any trial); it starts ranks 1.. on its node, each
# with its share of the trial's CPUs and one of its GPUs. A worker that dies breaks the
# group's next collective: the trial fails and Tune retries it from its last checkpoint.

GROUP_TIMEOUT = datetime.timedelta(minutes=10)


@contextlib.contextmanager
def local_workers(
    ray_config: dict[str, Any], spec: StudySpec, resume: State | None
) -> Iterator[None]:
    """Ranks 1..W-1 of the trial started and the process group joined as rank 0 for the
    block; afterwards the group is left and every worker must have ended well."""
    import torch.multiprocessing as mp

    workers, cuda = spec.resources.trial_workers, spec.resources.gpus_per_trial > 0
    address = f"tcp://127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory() as folder:
        resume_file = None
        if resume is not None:
            resume_file = str(save_checkpoint(resume, Path(folder) / CHECKPOINT_FILE))
        context = mp.get_context("spawn")
        processes = [
            context.Process(
                target=local_worker,
                args=(rank, address, ray_config, spec, resume_file),
                daemon=True,
            )
            for rank in range(1, workers)
        ]
        for process in processes:
            process.start()
        try:
            join_group(0, workers, address, cuda)
            yield
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            for process in processes:
                process.join(timeout=60)
                if process.is_alive():
                    process.kill()
    failed = [p.exitcode for p in processes if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"data-parallel workers of the trial ended with exit codes {failed}")


def local_worker(
    rank: int, address: str, ray_config: dict[str, Any], spec: StudySpec, resume: str | None
) -> None:
    """Rank `rank` of a trial: the same `fit` as rank 0, without reports."""
    config = spec.trial_config(ray_config)
    workers = spec.resources.trial_workers
    set_up_worker(spec.resources.cpus_per_trial / workers, spec.resources.gpus_per_trial / workers)
    join_group(rank, workers, address, spec.resources.gpus_per_trial > 0)
    try:
        fit(config, resume=load_checkpoint(resume) if resume else None)
    finally:
        dist.destroy_process_group()


def join_group(rank: int, workers: int, address: str, cuda: bool) -> None:
    if cuda and torch.cuda.is_available():
        torch.cuda.set_device(rank)  # the trial's GPUs, as Ray made them visible
    backend = "nccl" if cuda and torch.cuda.is_available() else "gloo"
    dist.init_process_group(
        backend, init_method=address, rank=rank, world_size=workers, timeout=GROUP_TIMEOUT
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
