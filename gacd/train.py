"""Train one configuration: `fit(config, report=callback)`, and `python -m gacd.train CONFIG.yaml`.

The same loop trains GACD students, baselines and adversarially trained teachers. Each
epoch ends with a call `report(metrics, state)`: the metrics of the epoch and a checkpoint
payload (save it with `gacd.checkpoint.save_checkpoint` during the call). Resuming from such a
payload continues to the same weights as an uninterrupted run. A final run also keeps the
student of its epoch with the best `val/pgd_acc` and reports the test split for it
(`test_best/...`) beside the last epoch's (`test/...`); `best_checkpoint` gives it as `best.pt`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gacd import parallel, schema
from gacd.checkpoint import FORMAT, CheckpointError, load_checkpoint, save_checkpoint
from gacd.cli import add_override_argument, load_config_file, parse_overrides
from gacd.config import Config, ConfigError, OptimConfig
from gacd.data import Batch, Datasets, DatasetSpec, augment, batches, load_datasets
from gacd.evaluate import robustness_metrics, validation_metrics
from gacd.methods import METHODS, Method
from gacd.models import ImageClassifier, build_classifier
from gacd.runtime import random_state, resolve_device, seed_everything, set_random_state
from gacd.structure import structure_metrics
from gacd.teacher import load_teacher
from gacd.transfer import load_target, transfer_metrics

State = dict[str, Any]
Report = Callable[[dict[str, float], State], None]


class NonFiniteLossError(RuntimeError):
    """A loss that became NaN or infinite; the message names the epoch and step."""


@dataclass
class FitResult:
    method: Method
    history: list[dict[str, float]]
    state: State

    @property
    def metrics(self) -> dict[str, float]:
        return self.history[-1]


# A final run's best epoch so far: `{"epoch", "value", "student"}` (the student's weights then).
Best = dict[str, Any]


def track_best(best: Best | None, epoch: int, value: float, student: torch.nn.Module) -> Best:
    """The best epoch by `schema.SELECTION` (the first of equals), its weights copied."""
    if best is not None and value <= best["value"]:
        return best
    weights = {key: tensor.detach().clone() for key, tensor in student.state_dict().items()}
    return {"epoch": epoch, "value": value, "student": weights}


def fit(
    config: Config,
    report: Report | None = None,
    resume: State | str | Path | None = None,
    data: Datasets | None = None,
) -> FitResult:
    """Train `config` from scratch, or from a checkpoint payload or file given as `resume`."""
    epochs = training(config, resume, data)
    while True:
        try:
            epoch_metrics, state = next(epochs)
        except StopIteration as done:
            return done.value
        if report is not None:
            report(epoch_metrics, state)


# `fit`'s epochs one at a time: each yields its metrics and checkpoint payload; the end returns
# the `FitResult`.
Epochs = Generator[tuple[dict[str, float], State], None, FitResult]


def training(
    config: Config,
    resume: State | str | Path | None = None,
    data: Datasets | None = None,
) -> Epochs:
    """What `fit` runs, an epoch per `next`: `fit_seeds` interleaves several."""
    device = resolve_device(config.device)
    seed_everything(config.seed)
    # Fixed input shapes: let cuDNN pick its fastest kernels (results stay seeded, not bitwise).
    torch.backends.cudnn.benchmark = device.type == "cuda"
    data = (data or load_datasets(config.data, config.seed, with_test=config.final)).to(device)
    # Loaded up front so that a missing target fails before training, not after it.
    target = load_target(config, data.spec) if config.final else None
    method = build_method(config, data, device)
    # Among data-parallel workers (`gacd.parallel`): gradients averaged, evaluation sharded.
    group = parallel.current()
    trained = parallel.data_parallel(method, device, group)
    optimizer = torch.optim.SGD(
        method.parameters(),
        lr=config.optim.lr,
        momentum=config.optim.momentum,
        weight_decay=config.optim.weight_decay,
        nesterov=config.optim.nesterov,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config.optim))
    history: list[dict[str, float]] = []
    start_epoch, best = 0, None
    if resume is not None:
        start_epoch, history, best = restore(resume, config, method, optimizer, scheduler)
    state = training_state(
        config, start_epoch, method, optimizer, scheduler, history, best, data.spec
    )
    for epoch in range(start_epoch, config.optim.epochs):
        started = time.perf_counter()
        epoch_metrics = {schema.EPOCH: epoch + 1, schema.LR: optimizer.param_groups[0]["lr"]}
        epoch_metrics |= train_epoch(
            method, optimizer, data, config, epoch, device, trained=trained
        )
        parallel.same_buffers(method, group)  # one model on every worker, rank 0's
        scheduler.step()
        epoch_metrics |= validation_metrics(
            method.student,
            data.val,
            config.eval,
            config.data.eval_batch_size,
            device,
            seed=config.seed,
        )
        if config.final:
            best = track_best(best, epoch + 1, epoch_metrics[schema.SELECTION], method.student)
        if config.final and epoch + 1 == config.optim.epochs:
            last = final_metrics(config, method, data, target, device)
            epoch_metrics |= last | best_metrics(config, method, data, target, device, best, last)
        epoch_metrics[schema.EPOCH_SECONDS] = time.perf_counter() - started
        schema.check_metric_names(epoch_metrics)
        history.append(epoch_metrics)
        state = training_state(
            config, epoch + 1, method, optimizer, scheduler, history, best, data.spec
        )
        yield epoch_metrics, state
    return FitResult(method, history, state)


# --- one configuration over several training seeds, side by side ------------------------------

SeedsReport = Callable[[list[dict[str, float]], list[State]], None]


def fit_seeds(
    configs: list[Config],
    report: SeedsReport | None = None,
    resumes: list[State | None] | None = None,
    data: list[Datasets] | None = None,
) -> list[FitResult]:
    """`fit` of one configuration on several training seeds (`configs`: one per seed, alike
    but for it), an epoch of each in turn; `report` gets every seed's metrics and state of each
    epoch together (`seed_mean` averages them). Each seed's run keeps its own random generators,
    swapped in for its epoch and out after it, so each trains exactly as `fit` alone would; the
    caller's generators are left as they were. `data`: each seed's data sets, if loaded already
    (each seed's validation split is drawn from its own seed)."""
    resumes = resumes or [None] * len(configs)
    starts = {0 if resume is None else resume["epoch"] for resume in resumes}
    check_seeds(configs)
    if len(starts) > 1:
        raise CheckpointError(f"resume: the seeds' checkpoints are at different epochs {starts}")
    given = data or [None] * len(configs)
    runs = [training(c, r, d) for c, r, d in zip(configs, resumes, given, strict=True)]
    streams: list[dict[str, Any] | None] = [None] * len(runs)  # each run's generators
    outer = random_state()
    try:
        while True:
            epoch, results = [], []
            for index, run in enumerate(runs):
                if streams[index] is not None:
                    set_random_state(streams[index])
                try:
                    epoch.append(next(run))
                except StopIteration as done:
                    results.append(done.value)
                finally:
                    streams[index] = random_state()
            if results:  # every seed has as many epochs: all end together
                return results
            if report is not None:
                report([metrics for metrics, _ in epoch], [state for _, state in epoch])
    finally:
        set_random_state(outer)


def check_seeds(configs: list[Config]) -> None:
    """`fit_seeds`' configs: at least one, on distinct seeds, otherwise alike."""
    if not configs:
        raise ConfigError("seed", "one config per training seed (fit_seeds got no configs)")
    seeds = [config.seed for config in configs]
    if len(set(seeds)) != len(seeds):
        raise ConfigError("seed", "distinct seeds (they repeat)", seeds)
    first = dataclasses.replace(configs[0], seed=0).to_dict()
    for config in configs[1:]:
        other = dataclasses.replace(config, seed=0).to_dict()
        if other != first:
            changed = sorted(key for key in first if first[key] != other.get(key))
            raise ConfigError(
                changed[0],
                f"one configuration on several seeds (the configs differ in {', '.join(changed)})",
            )


def seed_mean(seeds: list[int], epochs: list[dict[str, float]]) -> dict[str, float]:
    """One epoch of a configuration trained on `seeds`, as one trial reports it: each metric's
    mean over the seeds (the epoch's seconds summed: the time the trial spent on it; a value
    every seed shares as it is: the epoch, the learning rate), and each seed's own validation
    metrics as `seeds/SEED/val/...` (`schema.per_seed`)."""
    names = [name for name in epochs[0] if all(name in epoch for epoch in epochs)]
    mean = {}
    for name in names:
        values = [epoch[name] for epoch in epochs]
        if name == schema.EPOCH_SECONDS:
            mean[name] = float(sum(values))
        elif all(value == values[0] for value in values):  # the epoch, its learning rate, ...
            mean[name] = values[0]
        else:
            mean[name] = float(sum(values)) / len(values)
    for seed, epoch in zip(seeds, epochs, strict=True):
        for name, value in epoch.items():
            if name.startswith(schema.VAL_PREFIX):
                mean[schema.per_seed(seed, name)] = value
    return mean


def build_method(config: Config, data: Datasets, device: torch.device) -> Method:
    """The method with its student, and the teacher when it distils from one or when a final
    run has one configured (its structural metrics compare the student with it)."""
    method_class = METHODS.get(config.method)
    teacher = None
    if config.teacher.checkpoint is not None and (method_class.uses_teacher or config.final):
        # Building the teacher draws random initial weights (then overwritten): a method that
        # only measures against the teacher must start from the same student without it.
        with contextlib.nullcontext() if method_class.uses_teacher else torch.random.fork_rng():
            teacher = load_teacher(config.teacher, data.spec).to(device)
    student = build_classifier(config.student, data.spec)
    method = method_class(config, student, teacher, data.train.labels).to(device)
    for model in (method.student, teacher.model if teacher is not None else None):
        if model is not None:
            apply_speed_switches(model, config, device)
    return method


def apply_speed_switches(model: ImageClassifier, config: Config, device: torch.device) -> None:
    """Apply `memory_format` and `compile` to a model already on `device`."""
    channels_last = config.memory_format == "channels_last"
    model.set_memory_format(torch.channels_last if channels_last else torch.contiguous_format)
    if config.compile:
        model.compile_features()


def final_metrics(
    config: Config,
    method: Method,
    data: Datasets,
    target: Datasets | None,
    device: torch.device,
) -> dict[str, float]:
    """The test split's robust accuracy; with a teacher, the student's structural similarity
    to it (`test/cka_clean`, ...); with `transfer.data`, its transfer (`transfer/pgd_acc`, ...)."""
    batch_size, seed = config.data.eval_batch_size, config.seed
    # The structure metrics' PGD inputs are the test suite's own (same batches, same starts);
    # data-parallel workers attack only their share, so there they make their own.
    kept: dict[str, list[torch.Tensor]] = {} if parallel.current().parallel else {"pgd": []}
    values = robustness_metrics(
        method.student, data.test, config.eval, batch_size, device, seed=seed, keep=kept
    )
    if method.teacher is not None:
        values |= structure_metrics(
            method.student,
            method.teacher,
            data.test,
            config.eval,
            batch_size,
            device,
            seed=seed,
            adversarial=kept.get("pgd"),
        )
    if target is not None:
        values |= transfer_metrics(method.student, target, config, device)
    return values


def best_metrics(
    config: Config,
    method: Method,
    data: Datasets,
    target: Datasets | None,
    device: torch.device,
    best: Best,
    last: dict[str, float],
) -> dict[str, float]:
    """`final_metrics` of the best epoch's student, as `test_best/...` and `transfer_best/...`,
    with that epoch as `test_best/epoch` (the last epoch's values when it is the best)."""
    if best["epoch"] == config.optim.epochs:
        values = last
    else:
        current = {key: tensor.clone() for key, tensor in method.student.state_dict().items()}
        method.student.load_state_dict(best["student"])
        try:
            values = final_metrics(config, method, data, target, device)
        finally:
            method.student.load_state_dict(current)
    return {schema.best(name): value for name, value in values.items()} | {
        schema.BEST_EPOCH: float(best["epoch"])
    }


def train_epoch(
    method: Method,
    optimizer: torch.optim.Optimizer,
    data: Datasets,
    config: Config,
    epoch: int,
    device: torch.device,
    max_steps: int | None = None,
    trained: torch.nn.Module | None = None,
) -> dict[str, float]:
    """One pass over the training split (or its first `max_steps` batches); returns the mean
    of each loss term. Nothing in it waits for the device but a NaN check every few steps.
    `trained`: `method` wrapped for data parallelism (`gacd.parallel`): every worker draws the
    same global batch and steps on its rows, and the terms are averaged over workers."""
    group = parallel.current()
    trained = method if trained is None else trained
    parallel.worker_batch_size(config.data.batch_size, group)
    method.train()
    # Data order and crops depend only on (seed, epoch), so a resumed run sees the same ones.
    shuffle = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    crops = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch + 500_000)
    sums: dict[str, torch.Tensor] = {}
    recent: list[dict[str, torch.Tensor]] = []  # the terms of the steps not yet checked
    steps = 0
    limit = None if max_steps is None else max_steps * config.data.batch_size
    for step, batch in enumerate(
        batches(data.train, config.data.batch_size, device, shuffle, drop_last=True, limit=limit)
    ):
        if config.data.augment:
            batch.x = augment(batch.x, data.spec, crops)
        batch = parallel.shard(batch, group)
        recent.append(training_step(trained, optimizer, batch, config.precision))
        for name, value in recent[-1].items():
            sums[name] = sums.get(name, 0.0) + value
        steps += 1
        # Checking every step would make a GPU wait for each batch; every few steps is enough
        # to stop a diverged run early and still name the step where it went.
        if len(recent) == FINITE_CHECK_STEPS:
            check_finite(recent, epoch, step + 1 - len(recent))
            recent.clear()
    check_finite(recent, epoch, steps - len(recent))
    return {
        schema.train_loss(name): (parallel.total(total, group) / group.size / steps).item()
        for name, total in sums.items()
    }


def training_step(
    method: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, precision: str
) -> dict[str, torch.Tensor]:
    """One update: attack, loss (under bfloat16 autocast for `precision: bf16`), backward,
    optimizer step. Returns the loss terms, detached and still on the device."""
    autocast = torch.autocast(batch.x.device.type, torch.bfloat16, enabled=precision == "bf16")
    with autocast:
        terms = {name: value.float() for name, value in method(batch).items()}
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    optimizer.step()
    return {name: value.detach() for name, value in terms.items()}


FINITE_CHECK_STEPS = 20
BEST_CHECKPOINT_FILE = "best.pt"


def check_finite(recent: list[dict[str, torch.Tensor]], epoch: int, first_step: int) -> None:
    """Raise `NonFiniteLossError` naming the first of `recent` steps whose loss is NaN/inf
    (one host-device synchronisation for all of them)."""
    if not recent:
        return
    # Among data-parallel workers a step is finite only if it is on every one: all stop.
    losses = torch.stack([terms["loss"] for terms in recent])
    finite = parallel.all_true(torch.isfinite(losses), parallel.current()).tolist()
    if all(finite):
        return
    index = finite.index(False)
    terms = {name: value.item() for name, value in recent[index].items()}  # this worker's
    raise NonFiniteLossError(
        f"loss is {terms['loss']} at epoch {epoch + 1}, step {first_step + index + 1} "
        f"(terms: {terms}); lower optim.lr or check the loss weights"
    )


def lr_factor(optim: OptimConfig) -> Callable[[int], float]:
    """Per-epoch learning-rate multiplier for `constant`, `step` and `cosine` schedules."""
    epochs = optim.epochs
    if optim.schedule == "cosine":
        return lambda epoch: 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if optim.schedule == "step":
        boundaries = [round(fraction * epochs) for fraction in optim.milestones]
        return lambda epoch: optim.lr_decay ** sum(epoch >= b for b in boundaries)
    return lambda epoch: 1.0


# --- checkpoints ----------------------------------------------------------------------------


def training_state(
    config: Config,
    epoch: int,
    method: Method,
    optimizer,
    scheduler,
    history: list[dict[str, float]],
    best: Best | None = None,
    spec: DatasetSpec | None = None,
) -> State:
    """Everything a resumed run needs: weights, heads, bank, optimizer, schedule, RNG, config,
    and in a final run the best epoch so far with its student's weights; with the data set's
    `spec`, what rebuilds the student without its data (`models.classifier_from_checkpoint`)."""
    task_state = {
        key: value for key, value in method.state_dict().items() if not key.startswith("student.")
    }
    return {
        "format": FORMAT,
        "config": config.to_dict(),
        "epoch": epoch,
        "student": method.student.state_dict(),
        "task": task_state,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        "history": history,
        "best": best,
        "data_spec": dataclasses.asdict(spec) if spec is not None else None,
        "workers": parallel.current().size,  # data-parallel workers that trained it
    }


def best_checkpoint(state: State) -> State | None:
    """A final run's best epoch as a checkpoint of its own (`best.pt`): the student's weights
    then, the config and the history up to it; `gacd.evaluate` reads it like any checkpoint."""
    best = state.get("best")
    if best is None:
        return None
    return {
        "format": FORMAT,
        "config": state["config"],
        "epoch": best["epoch"],
        "selected_by": schema.SELECTION,
        "student": best["student"],
        "history": state["history"][: best["epoch"]],
        "data_spec": state.get("data_spec"),
    }


def restore(
    resume: State | str | Path, config: Config, method: Method, optimizer, scheduler
) -> tuple[int, list[dict[str, float]], Best | None]:
    state = resume if isinstance(resume, dict) else load_checkpoint(resume)
    if state.get("format") != FORMAT:
        raise CheckpointError(f"resume: not a checkpoint of this project ({FORMAT})")
    if "optimizer" not in state:
        raise CheckpointError(
            "resume: a best-epoch checkpoint holds the student only; resume from the run's "
            "checkpoint.pt"
        )
    if state["config"] != config.to_dict():
        changed = sorted(
            key for key in config.to_dict() if state["config"].get(key) != config.to_dict()[key]
        )
        raise CheckpointError(
            f"resume: the checkpoint was written by another config "
            f"(differs in: {', '.join(changed)})"
        )
    method.student.load_state_dict(state["student"])
    missing, unexpected = method.load_state_dict(state["task"], strict=False)
    if unexpected or any(not key.startswith("student.") for key in missing):
        raise CheckpointError(
            f"resume: the checkpoint's method state does not fit "
            f"(missing {missing}, unexpected {unexpected})"
        )
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["epoch"], list(state["history"]), state.get("best")


# --- command line -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gacd.train", description=__doc__.split("\n")[0]
    )
    parser.add_argument("config", help="YAML file of config overrides (see configs/)")
    parser.add_argument(
        "--out",
        default="runs/latest",
        help="folder for checkpoint.pt and metrics.jsonl (default: runs/latest)",
    )
    parser.add_argument("--resume", help="continue from this checkpoint.pt")
    add_override_argument(parser, "e.g. --set attack.epsilon=8/255")
    args = parser.parse_args(argv)
    try:
        config = load_config_file(args.config, parse_overrides(args.overrides))
    except (ConfigError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))

    def report(epoch_metrics: dict[str, float], state: State) -> None:
        save_checkpoint(state, out / "checkpoint.pt")
        if state["epoch"] == config.optim.epochs and (best := best_checkpoint(state)):
            save_checkpoint(best, out / BEST_CHECKPOINT_FILE)
        with open(out / "metrics.jsonl", "a") as file:
            file.write(json.dumps(epoch_metrics) + "\n")
        print(" ".join(f"{k}={v:.4g}" for k, v in epoch_metrics.items()), flush=True)

    try:
        fit(config, report=report, resume=args.resume)
    except (CheckpointError, ConfigError, FileNotFoundError, NonFiniteLossError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2 if not isinstance(error, NonFiniteLossError) else 1
    print(f"checkpoint: {out / 'checkpoint.pt'}")
    if (out / BEST_CHECKPOINT_FILE).is_file():
        print(f"best epoch ({schema.SELECTION}): {out / BEST_CHECKPOINT_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
