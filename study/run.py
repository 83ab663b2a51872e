"""Run a study: `python -m study.run SPACE.yaml [--num-gpus N] [--address auto] [--resume] ...`

Ray Tune schedules the trials (locally, or on a cluster with `--address`), Optuna proposes the
searched values (seeded TPE, trials kept in SQLite beside the MLflow store), ASHA stops poor
trials early, and every trial is a child run of the study's run in MLflow.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import shlex
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.runs import store_exists
from gacd import schema
from gacd.checkpoint import CheckpointError
from gacd.config import ConfigError, flatten
from gacd.data import DatasetNotFoundError
from study.spec import (
    DEFAULTS_POINT,
    ENTRY_KEY,
    RESULT_WORKER_GROUP,
    SEED_KEY,
    VARIANT_KEY,
    StudyError,
    StudySpec,
    describe_distribution,
    read_study_file,
    spec_from_dict,
)

# Local Ray instances bind to 127.0.0.1 only, so a laptop study opens no port to the network.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# An MLflow server that went away fails a call in seconds, not minutes of retries: the study
# goes on without it and brings the missed epochs in later (study.tracking.sync_results).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
# Short trials sync Ray's experiment state often, which is what a resume needs: no warning.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
# Ray's own result files are the CSV and JSON ones (`build_tuner` asks for them): no
# TensorBoard files, nor the hint to open them (MLflow holds the curves).
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
# A study's log is one line per epoch: no progress bar for each small artifact MLflow moves
# (a student model, a comparison's state).
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@dataclass
class StudyPaths:
    storage: Path  # Ray's results: one folder per study, checkpoints, the teacher cache
    tracking_uri: str
    optuna_url: str

    @property
    def teachers(self) -> Path:
        return self.storage / "teachers"

    def experiment(self, name: str) -> Path:
        return self.storage / name


def study_paths(storage: str | None, tracking_uri: str | None, optuna: str | None) -> StudyPaths:
    """Absolute paths: every trial runs in a working directory of its own."""
    from analysis.runs import default_tracking_uri
    from study.tracking import check_tracking_uri_form

    storage_path = storage or "ray_results"
    if "://" in storage_path and not storage_path.startswith("file://"):
        raise StudyError(
            f"--storage {storage_path!r}: give a path (for a multi-node cluster, one on a "
            "filesystem every node mounts, such as NFS)"
        )
    root = Path(storage_path.removeprefix("file://")).expanduser().resolve()
    uri = tracking_uri or default_tracking_uri()
    check_tracking_uri_form(uri)
    if optuna is None:
        beside = (
            Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else root
        )
        optuna = f"sqlite:///{beside / 'optuna.db'}"
    else:
        check_optuna_url_form(optuna)
    return StudyPaths(root, uri, optuna)


OPTUNA_DIALECTS = ("sqlite", "postgresql", "mysql")


def check_optuna_url_form(url: str) -> None:
    """An Optuna storage URL Optuna's RDB storage can open (checked before anything starts)."""
    dialect = url.split("://", 1)[0].split("+", 1)[0] if "://" in url else ""
    if dialect not in OPTUNA_DIALECTS:
        raise StudyError(
            f"--optuna-storage {url!r}: expected sqlite:///ABSOLUTE/PATH.db or a "
            "postgresql:// or mysql:// database URL"
        )
    if dialect == "sqlite" and not Path(url.split(":///", 1)[-1]).parent.is_dir():
        raise StudyError(f"--optuna-storage {url!r}: the folder of the database does not exist")


# --- the plan -------------------------------------------------------------------------------


def trial_count(spec: StudySpec) -> int:
    if spec.study.mode == "search":
        return spec.study.num_samples
    if spec.study.mode == "compare":
        return sum(spec.trials_by_entry().values())
    assert spec.ablation is not None
    return len(spec.variants()) * len(spec.ablation.seeds)


def describe(spec: StudySpec, paths: StudyPaths, address: str | None) -> str:
    """What a run of this study would do, without doing it (`--dry-run`)."""
    study = spec.study
    resources = spec.resources
    lines = [
        f"study      {spec.name} ({study.mode}), {trial_count(spec)} trials, "
        f"{study.metric} ({study.direction})"
        + (f", budget {study.budget}" if study.budget else ""),
        f"resources  {resources.cpus_per_trial:g} CPU, {resources.gpus_per_trial:g} GPU per "
        f"trial{data_parallel_words(resources.trial_workers)}; "
        f"at most {study.max_concurrent or 'as many as fit'} at once; "
        f"{study.max_failures} retries",
        f"cluster    {address or 'a local Ray instance on 127.0.0.1'}",
        f"scheduler  {spec.scheduler}"
        + (
            f" (grace {study.scheduler.grace_period} epochs, "
            f"reduction {study.scheduler.reduction_factor:g})"
            if spec.scheduler == "asha"
            else ""
        ),
    ]
    if address is None:
        lines += local_resource_problems(spec)
    config = spec.trial_config(first_trial(spec))
    lines.append(
        f"trial      {config.method} on {config.data.name}, {config.student.arch} student, "
        f"{config.optim.epochs} epochs on {config.data.train_subset or 'all'} training "
        f"images, evaluated at epsilon {config.eval.epsilon:.4g} on "
        f"{config.eval.max_samples or 'all'} images"
        + (
            f", on each of seeds {study.trial_seeds} (their mean reported)"
            if study.trial_seeds
            else ""
        )
    )
    if spec.teacher is not None:
        source = "trained first, cached at" if spec.teacher.train else "checkpoint"
        lines.append(f"teacher    {source} {spec.teacher.checkpoint}")
    if spec.searches:
        lines.append(
            f"sampler    Optuna {study.sampler.name} (seed {study.sampler.seed}"
            + (", multivariate" if study.sampler.multivariate else "")
            + ")"
        )
        points = study.sampler.points_to_evaluate or []
        if study.mode == "search":
            for point, params in zip(points, spec.points_to_evaluate(), strict=True):
                named = " (the base configuration)" if point == DEFAULTS_POINT else ""
                if len(params) < len(spec.search):
                    named = " (the other keys drawn by the sampler)"
                lines.append(f"  run first  {params}{named}")
        elif points:
            lines.append("  run first  each method's base configuration")
    if study.mode == "search":
        lines += [f"  {key:24} {describe_distribution(d)}" for key, d in spec.search.items()]
    elif study.mode == "compare":
        from study.compare import describe_comparison

        lines += describe_comparison(spec)
    else:
        assert spec.ablation is not None
        source = spec.ablation.from_study
        lines.append(
            f"reference  {'best full-budget trial of study ' + source + ' + ' if source else ''}"
            f"{json.dumps(spec.ablation.reference)}; seeds {spec.ablation.seeds}"
        )
        lines += [f"  {name:24} {json.dumps(o)}" for name, o in spec.variants().items()]
    lines += [
        f"results    {paths.experiment(spec.name)}",
        f"mlflow     {paths.tracking_uri} (experiment {spec.name})",
        f"optuna     {paths.optuna_url} ("
        + (
            f"studies {', '.join(spec.optuna_study_name(e) for e in spec.compare.methods)}"
            if spec.compare is not None
            else f"study {spec.name}"
        )
        + ")",
    ]
    return "\n".join(lines)


def first_trial(spec: StudySpec) -> dict[str, Any]:
    if spec.study.mode == "ablation":
        assert spec.ablation is not None
        return {VARIANT_KEY: spec.reference, SEED_KEY: spec.ablation.seeds[0]}
    if spec.study.mode == "compare":
        assert spec.compare is not None
        return {ENTRY_KEY: spec.compare.reference}
    return {}


# --- running --------------------------------------------------------------------------------


def connect(address: str | None, num_cpus: int | None, num_gpus: int | None) -> dict[str, float]:
    """Join a cluster (claiming nothing) or start a local instance; returns its resources."""
    if address:
        check_reachable(address)
        use_cluster_token()  # before Ray is imported: it caches its authentication settings
    import ray

    try:
        if address:
            ray.init(address=address)
        else:
            from study.reaper import children_of, start_reaper

            # "local": always a new instance, never a cluster a `ray start` left on this machine.
            before = children_of(os.getpid()) if sys.platform.startswith("linux") else set()
            ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False)
            # The instance's own processes, watched so that none outlives a killed driver.
            if sys.platform.startswith("linux"):
                start_reaper(children_of(os.getpid()) - before)
    except (ConnectionError, TimeoutError, RuntimeError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise StudyError(
            f"--address {address!r}: no Ray cluster answers there ({first_line})"
        ) from error
    return ray.cluster_resources()


def check_reachable(address: str) -> None:
    """Ray waits minutes for a head node that is not there; a TCP probe answers at once."""
    host, separator, port = address.rpartition(":")
    if not separator or not port.isdigit():
        if address != "auto":
            raise StudyError(f"--address {address!r}: expected auto or HOST:PORT")
        return
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as error:
        raise StudyError(
            f"--address {address!r}: no Ray cluster answers there ({error.strerror or error}); "
            "start one with `ray start --head` or check the address"
        ) from error


def use_cluster_token() -> None:
    """A cluster started with token authentication (Ray's default when a token exists) only
    answers drivers that send the token: send it whenever one is configured here."""
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if "RAY_AUTH_MODE" not in os.environ and (
        "RAY_AUTH_TOKEN" in os.environ or token_file.is_file()
    ):
        os.environ["RAY_AUTH_MODE"] = "token"


def data_parallel_words(workers: int) -> str:
    return f" (data-parallel: a Ray Train run of {workers} workers)" if workers > 1 else ""


def local_resource_problems(spec: StudySpec) -> list[str]:
    """For a study on a local Ray instance: a trial that asks more than this machine has
    (`--dry-run` says so; the run itself refuses it in `concurrency`)."""
    import torch

    have = {"GPU": torch.cuda.device_count(), "CPU": os.cpu_count() or 1}
    wanted = {"GPU": spec.resources.gpus_per_trial, "CPU": spec.resources.cpus_per_trial}
    return [
        f"warning    resources.{kind.lower()}s_per_trial is {wanted[kind]:g} but this machine has "
        f"{have[kind]} {kind}s: a local run would refuse to start (join a cluster with --address)"
        for kind in ("GPU", "CPU")
        if wanted[kind] > have[kind]
    ]


def concurrency(spec: StudySpec, resources: dict[str, float], num_cpus, num_gpus) -> int | None:
    """Refuse trials the cluster cannot hold; cap concurrency at `--num-gpus`/`--num-cpus`."""
    per_trial, limits = spec.resources, []
    for kind, needed in (("GPU", per_trial.gpus_per_trial), ("CPU", per_trial.cpus_per_trial)):
        if needed > resources.get(kind, 0.0):
            raise StudyError(
                f"resources.{kind.lower()}s_per_trial is {needed:g} but the cluster has "
                f"{resources.get(kind, 0.0):g} {kind}s"
            )
        if per_trial.trial_workers > 1 and needed > 0:  # Tune reserves nothing for its trials
            limits.append(math.floor(resources[kind] / needed))
    if spec.study.max_concurrent:
        limits.append(spec.study.max_concurrent)
    if num_gpus is not None and per_trial.gpus_per_trial > 0:
        limits.append(max(1, math.floor(num_gpus / per_trial.gpus_per_trial)))
    if num_cpus is not None:
        limits.append(max(1, math.floor(num_cpus / per_trial.cpus_per_trial)))
    return min(limits) if limits else None


def ensure_teacher(
    spec: StudySpec,
    tracking,
    commit: str,
    max_concurrent: int | None = None,
    num_gpus: float | None = None,
) -> str | None:
    """Train the study's teacher once, data-parallel over the GPUs (or the trials' CPUs) the
    study may use (`study.teacher`); log it once."""
    from study.teacher import teacher_is_trained, teacher_workers, train_teacher

    config = spec.teacher_training_config()
    if config is None:
        return None
    assert spec.teacher is not None and spec.teacher.checkpoint is not None
    checkpoint = Path(spec.teacher.checkpoint)
    if teacher_is_trained(checkpoint):
        print(f"teacher: cached {checkpoint}", flush=True)
    else:
        workers = teacher_workers(spec, config, max_concurrent, num_gpus)
        print(
            f"teacher: training {config.method} {config.student.arch} on "
            f"{workers.describe()} -> {checkpoint}",
            flush=True,
        )
        train_teacher(config, checkpoint, workers, spec.study.max_failures)
    return tracking.teacher_run(checkpoint, commit)


def resolve_reference(spec: StudySpec, paths: StudyPaths) -> None:
    """`ablation.from_study`: the best full-budget trial of a finished search becomes the
    reference (under the ablation's own `reference` overrides, which win)."""
    from study.search import best_full_budget_trial, study_exists

    assert spec.ablation is not None
    source = spec.ablation.from_study
    if source is None:
        return
    if not store_exists(paths.optuna_url) or not study_exists(paths.optuna_url, source):
        raise StudyError(
            f"ablation.from_study: no study {source!r} in {paths.optuna_url}; run that search "
            "first (with the same --tracking-uri / --optuna-storage)"
        )
    try:
        best = best_full_budget_trial(paths.optuna_url, source)
    except ValueError as error:
        raise StudyError(
            f"ablation.from_study: study {source!r} has no trial that ran its full budget"
        ) from error
    spec.ablation.reference = {**best.params, **spec.ablation.reference}
    print(f"reference: study {source} trial {best.number} ({best.value:.4f}): {best.params}")


def private_group(gid: int) -> bool:
    """The user's own group with no other member (a umask of 002 makes files group-writable
    in it, which lets no one else write them)."""
    import grp
    import pwd

    try:
        group, user = grp.getgrgid(gid), pwd.getpwuid(os.getuid())
    except KeyError:
        return False
    return gid == user.pw_gid and set(group.gr_mem) <= {user.pw_name}


def check_trusted(folder: Path) -> None:
    """A resume unpickles Ray's state (`tuner.pkl`, the experiment state) from the study's
    folder: code runs from it. Refuse a folder, or a file in it, that another user owns or
    that group or others may write (docs/reliability.md, "Trust boundary")."""
    if not hasattr(os, "getuid"):
        return  # no owners and modes to check
    me = os.getuid()
    for path in [folder, *sorted(folder.iterdir())]:
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            continue
        info = path.stat()
        group_writable = info.st_mode & 0o020 and not private_group(info.st_gid)
        if info.st_uid != me or info.st_mode & 0o002 or group_writable:
            raise StudyError(
                f"--resume: {path} is writable by others or owned by another user; a resume "
                "runs the code Ray pickled there, so the study's folder must be yours alone "
                "(chmod go-w, or start a new --name)"
            )


def load_saved_spec(spec: StudySpec, path: Path, teachers: Path) -> StudySpec:
    """On `--resume`, the spec the study started with (its resolved reference included)."""
    saved = json.loads((path / schema.SPEC_FILE).read_text())
    before = flatten(fixed_source(read_as_now(saved["source"], teachers)))
    now = flatten(fixed_source(spec_source(spec)))
    # a key one side lacks and the other has unset (None) is no change
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        if changed == ["teacher.checkpoint"] and before[changed[0]] is not None:
            old_cache = Path(str(before["teacher.checkpoint"])).parents[1]
            raise StudyError(
                f"--resume: study {spec.name!r} was started with its teacher cached in "
                f"{old_cache} (--storage {old_cache.parent}), not in {teachers}: resume with "
                "that --storage (a study's folder cannot be moved on its own; move the whole "
                "--storage folder, teachers/ included, and its checkpoints still name the old "
                "place)"
            )
        shown = ", ".join(
            f"{key} (was {before.get(key)!r}, now {now.get(key)!r})" for key in changed[:3]
        )
        raise StudyError(
            f"--resume: the study file (or --budget) differs from the one study {spec.name!r} "
            f"started with (saved in {path / schema.SPEC_FILE}) at {shown}"
            + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
            + "; resume with that file and budget, or start a new --name"
        )
    resumed = load_study_spec(path, teachers)
    for key, seeds in grown_seeds(saved["resolved"], spec).items():
        setattr(resumed.compare, key, seeds)
    return resumed


def read_as_now(source: dict[str, Any], teachers: Path) -> dict[str, Any]:
    """A saved study's source as this version reads it: keys added to the study format since
    the study started stand at their defaults, so a resume after an upgrade compares like with
    like (as saved where this version cannot read it: the comparison then names what differs).
    A trained teacher is read against the cache it was trained into (a moved --storage is
    refused by the caller, naming that cache)."""
    teacher = source.get("teacher") or {}
    if teacher.get("train") is not None and teacher.get("checkpoint"):
        teachers = Path(teacher["checkpoint"]).parents[1]
    try:
        return spec_source(spec_from_dict(copy.deepcopy(source), teacher_cache=teachers))
    except (ConfigError, StudyError):
        return source


def fixed_source(source: dict[str, Any]) -> dict[str, Any]:
    """What a resume must not change: the saved source without a comparison's seed lists."""
    source = copy.deepcopy(source)
    for key in schema.COMPARE_SEED_LISTS:
        (source.get("compare") or {}).pop(key, None)
    return source


def grown_seeds(saved: dict[str, Any], spec: StudySpec) -> dict[str, list[int]]:
    """The comparison seed lists a resume appends to (`saved`: the resolved spec it started
    with, or last grew to): a saved list that is the start of the new one grows to it; a new
    one that is the start of the saved one (the study file as it was before seeds were added)
    continues the saved one; any other change is refused."""
    if spec.compare is None:
        return {}
    grown = {}
    for key in schema.COMPARE_SEED_LISTS:
        before, now = list((saved.get("compare") or {}).get(key) or []), getattr(spec.compare, key)
        if before[: len(now)] == now:
            continue
        if now[: len(before)] != before:
            flag = f"--{schema.COMPARE_SEED_LISTS[key]}-seeds"
            raise StudyError(
                f"--resume: compare.{key} of study {spec.name!r} can only grow: it has "
                f"{before}, now {now}; keep every seed it ran, in its order, and append new "
                f"ones ({flag} {' '.join(str(seed) for seed in before)} ...)"
            )
        if len(now) > len(before):
            grown[key] = list(now)
    if "confirm_seeds" in grown and not spec.confirms:
        raise StudyError(
            f"--resume: compare.confirm_seeds of study {spec.name!r}: its compare.top is 1 and "
            "its searches do not start from their defaults, so no confirm stage runs and added "
            "confirm seeds would run nothing; add final seeds (--final-seeds) instead"
        )
    return grown


def save_study_spec(path: Path, spec: StudySpec) -> None:
    """Save in a new study's folder what `load_study_spec` and a resume's checks read back: the
    spec as its file gave it (`spec_source`) and as resolved."""
    path.mkdir(parents=True, exist_ok=True)
    saved = {"source": spec_source(spec), "resolved": spec.to_dict()}
    (path / schema.SPEC_FILE).write_text(json.dumps(saved, indent=2, default=str))


def load_study_spec(path: Path, teachers: Path) -> StudySpec:
    """The resolved spec a study saved in its folder when it started."""
    saved = json.loads((path / schema.SPEC_FILE).read_text())
    return spec_from_dict(saved["resolved"], teacher_cache=teachers)


# Ray restores a study's TuneConfig as it was saved (`Tuner.restore` takes no new one), and
# with it the trial count and the concurrency: a resume neither compares them with the file's
# nor runs others (`check_resumed_counts`).
RESUMED_COUNTS = ("num_samples", "max_concurrent")


def spec_source(spec: StudySpec) -> dict[str, Any]:
    """The parts of a spec that a resume must not change (not concurrency or sample count)."""
    source = spec.to_dict()
    for key in RESUMED_COUNTS:
        source["study"].pop(key)
    return json.loads(json.dumps(source, default=str))


def trial_dirname(trial: Any) -> str:
    """Folders named by trial id; hyperparameters live in MLflow, never in folder names."""
    return trial.trial_id


def build_tuner(spec: StudySpec, paths: StudyPaths, callbacks: list, max_concurrent: int | None):
    from ray import tune

    from study.search import compare_searcher, optuna_storage, scheduler, searcher

    config = spec.trial_config(first_trial(spec))
    if spec.searches:
        param_space: dict[str, Any] = {}
        make = compare_searcher if spec.study.mode == "compare" else searcher
        search_alg = make(spec, optuna_storage(paths.optuna_url))
        num_samples = trial_count(spec)
    else:
        assert spec.ablation is not None
        param_space = {
            VARIANT_KEY: tune.grid_search(list(spec.variants())),
            SEED_KEY: tune.grid_search(spec.ablation.seeds),
        }
        search_alg, num_samples = None, 1
    return tune.Tuner(
        trainable(spec),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            # An ablation's metric (a test metric) exists only after the last epoch; nothing in
            # Ray needs it, so it is left to the summary.
            metric=spec.study.metric if search_alg else None,
            mode=spec.study.direction if search_alg else None,
            search_alg=search_alg,
            scheduler=scheduler(spec, config.optim.epochs),
            num_samples=num_samples,
            max_concurrent_trials=max_concurrent,
            trial_name_creator=trial_dirname,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=spec.name,
            storage_path=str(paths.storage),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            failure_config=tune.FailureConfig(max_failures=spec.study.max_failures),
            callbacks=[*callbacks, *result_files(), free_worker_groups()],
            verbose=0,
        ),
    )


def free_worker_groups():
    """A Tune callback that removes an ended data-parallel trial's Ray Train placement group
    when it outlived the trial (Tune ends a stopped trial's process at once; the group belongs
    to this job, which alone frees it then), so that the next trial gets its CPUs and GPUs."""
    import ray
    from ray.tune import Callback
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    class FreeWorkerGroups(Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
            self.free(trial)

        def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
            self.free(trial)

        def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
            self.free(trial)  # before its retry asks for the same CPUs and GPUs

        @staticmethod
        def free(trial) -> None:
            group = (trial.last_result or {}).get(RESULT_WORKER_GROUP)
            if not group:
                return
            state = ray.util.placement_group_table().get(group, {}).get("state")
            if state in (None, "REMOVED"):
                return
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group))))

    return FreeWorkerGroups()


def result_files() -> list:
    """Ray's per-trial `progress.csv` and `result.json` (what `ExperimentAnalysis` reads back),
    asked for by name since the automatic loggers (TensorBoard's among them) are off."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    return [CSVLoggerCallback(), JsonLoggerCallback()]


# What the process of a data-parallel trial holds: it drives its Ray Train workers, which hold
# the trial's CPUs and GPUs (Ray asks a trial for some resource; CPUs would starve the workers).
DRIVER_MEMORY = 256 * 2**20


def trainable(spec: StudySpec):
    """The trial function with the study bound to it and a trial's resources."""
    from ray import tune

    from study.trainable import train_trial

    resources = {"cpu": spec.resources.cpus_per_trial, "gpu": spec.resources.gpus_per_trial}
    if spec.resources.trial_workers > 1:  # its Ray Train workers hold them (study.trainable)
        resources = {"memory": DRIVER_MEMORY}
    return tune.with_resources(tune.with_parameters(train_trial, spec=spec), resources)


def fail_orphans(spec: StudySpec, paths: StudyPaths, experiment_path: Path | None) -> None:
    """Optuna trials no restored Ray trial will tell (a killed driver asked for them)."""
    from ray import tune

    from study.search import fail_orphaned_trials, study_exists

    known = set()
    if experiment_path is not None:
        known = {trial.trial_id for trial in tune.ExperimentAnalysis(str(experiment_path)).trials}
    entries = list(spec.compare.methods) if spec.compare is not None else [None]
    for entry in entries:
        name = spec.optuna_study_name(entry)
        if study_exists(paths.optuna_url, name):
            fail_orphaned_trials(paths.optuna_url, name, known)


def restore_tuner(spec: StudySpec, path: Path):
    from ray import tune

    return tune.Tuner.restore(
        str(path), trainable(spec), resume_unfinished=True, resume_errored=True
    )


def check_writable(folder: Path, option: str) -> None:
    """`folder`, or the nearest folder above it that exists, is one this process can write
    in (checked without creating anything: a refused start leaves no empty folder)."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise StudyError(f"{option} {str(folder)!r}: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StudyError(f"{option} {str(folder)!r}: cannot write in {str(existing)!r}")


def preflight(spec: StudySpec, paths: StudyPaths) -> None:
    """What would fail a trial fails here, before anything starts or is written: the results
    folder writable, the data sets on disk, the teacher readable and of its architecture."""
    from gacd.data import load_datasets
    from gacd.teacher import load_teacher

    check_writable(paths.storage, "--storage")
    trained_first = spec.teacher is not None and spec.teacher.train is not None
    data_checked, teachers_checked = {}, set()
    for ray_config, where in preflight_trials(spec):
        config = spec.trial_config(ray_config)
        key = json.dumps(dataclasses.asdict(config.data), sort_keys=True)
        try:
            if key not in data_checked:
                data_checked[key] = load_datasets(config.data, config.seed).spec
            teacher = config.teacher
            path = teacher.checkpoint
            if path is not None and path not in teachers_checked and not trained_first:
                load_teacher(teacher, data_checked[key])
                teachers_checked.add(path)
        except (CheckpointError, DatasetNotFoundError) as error:
            if not where:
                raise
            raise type(error)(f"{where}: {error}") from error


def preflight_trials(spec: StudySpec) -> list[tuple[dict[str, Any], str]]:
    """The trials whose files a start checks: the first, and in a search one per value of
    each `choice` (a searched teacher checkpoint or data set that is not there is refused
    now, not when a trial draws it)."""
    from study.spec import distribution_values

    first = first_trial(spec)
    trials = [(first, "")]
    entries: list[str | None] = [None] if spec.study.mode == "search" else []
    if spec.compare is not None:
        entries = list(spec.compare.methods)
    for entry in entries:
        start = {ENTRY_KEY: entry} if entry else first
        section = f"compare.methods.{entry}.search" if entry else "search"
        if entry:
            trials.append((start, f"compare.methods.{entry}"))
        for key, distribution in spec.search_space_of(entry).items():
            if distribution.distribution == "choice":
                for value in distribution_values(key, distribution, section):
                    trials.append(({**start, key: value}, f"{section}.{key}={value!r}"))
    return trials


def saved_or_new(
    spec: StudySpec, paths: StudyPaths, resume: bool, given: dict[str, int | None] | None = None
) -> tuple[StudySpec, bool]:
    """The spec to run and whether the study exists: a resume runs the one it saved (and
    refuses a study that is not there, or `given` counts it cannot run), a new study refuses
    one that is."""
    folder = paths.experiment(spec.name)
    exists = (folder / schema.SPEC_FILE).is_file()
    if resume and not exists:
        raise StudyError(f"--resume: no study {spec.name!r} in {paths.storage} to resume")
    if exists and not resume:
        raise StudyError(
            f"study {spec.name!r} already exists in {folder}: pass --resume to "
            "continue it, or --name for a new study"
        )
    if resume:
        check_trusted(folder)
        spec = load_saved_spec(spec, folder, paths.teachers)
        check_resumed_counts(spec, given or {})
    return spec, exists


def given_counts(args: argparse.Namespace) -> dict[str, int | None]:
    """The study counts the command line set (None: not given)."""
    return {key: getattr(args, key) for key in RESUMED_COUNTS}


def check_resumed_counts(resumed: StudySpec, given: dict[str, int | None]) -> None:
    """A resume continues the trial count and concurrency its study started with: a command
    line asking for others is refused rather than silently run with the saved ones."""
    for key, value in given.items():
        saved = getattr(resumed.study, key)
        if value is None or value == saved:
            continue
        flag = "--" + key.replace("_", "-")
        raise StudyError(
            f"--resume: {flag} {value}, but study {resumed.name!r} was started with "
            f"study.{key} {saved if saved is not None else '(as many as fit)'}, and a resume "
            f"continues with that (Ray restores a study's trial count and concurrency as "
            f"saved); resume without {flag}, or start a new --name for a study with {value}"
        )


def run_study(spec: StudySpec, paths: StudyPaths, args: argparse.Namespace) -> int:
    from study.tracking import check_tracking_uri

    if spec.study.mode == "compare":
        from study.compare import run_comparison

        return run_comparison(spec, paths, args, sys.modules[__name__])
    spec, exists = saved_or_new(spec, paths, args.resume, given_counts(args))
    # Every refusal comes before anything is written: no results folder, no MLflow store,
    # no Optuna study (a local Ray instance's session files in /tmp aside).
    preflight(spec, paths)
    if not args.resume and spec.study.mode == "ablation":
        resolve_reference(spec, paths)
    resources = connect(args.address, args.num_cpus, args.num_gpus)
    try:
        max_concurrent = concurrency(spec, resources, args.num_cpus, args.num_gpus)
        check_tracking_uri(paths.tracking_uri)
        return run_on_ray(spec, paths, args, exists, max_concurrent)
    finally:
        import ray

        ray.shutdown()


def run_on_ray(
    spec: StudySpec,
    paths: StudyPaths,
    args: argparse.Namespace,
    exists: bool,
    max_concurrent: int | None,
    parent: str | None = None,
) -> int:
    """Run (or continue) one study on the connected Ray cluster; `parent`: the MLflow run of
    the comparison it is a stage of."""
    from ray import tune

    from study.progress import EpochLines
    from study.report import print_summary
    from study.tracking import Tracking, TrialRuns, git_commit, sync_results

    experiment_path = paths.experiment(spec.name)
    tracking, commit = Tracking(paths.tracking_uri), git_commit()
    from study.teacher import TeacherTrainingError

    try:
        teacher_run = ensure_teacher(spec, tracking, commit, max_concurrent, args.num_gpus)
    except TeacherTrainingError as error:
        print(f"error: {spec.name}: {error}", file=sys.stderr)
        return 1
    experiment_id, parent_run = tracking.study_run(spec, commit, args.resume, parent)
    if teacher_run is not None:
        tracking.client.set_tag(parent_run, schema.TAG_TEACHER_RUN, teacher_run)
    if not exists:
        save_study_spec(experiment_path, spec)
    runs = TrialRuns(
        paths.tracking_uri,
        experiment_id,
        parent_run,
        spec,
        commit,
        log_checkpoints=spec.study.mode == "ablation",
    )
    restorable = args.resume and tune.Tuner.can_restore(str(experiment_path))
    if args.resume and spec.searches:
        fail_orphans(spec, paths, experiment_path if restorable else None)
    if restorable:
        tuner = restore_tuner(spec, experiment_path)
    else:  # new, or stopped before Ray wrote its first experiment state
        epochs = spec.trial_config(first_trial(spec)).optim.epochs
        lines = EpochLines(spec, trial_count(spec), epochs)
        tuner = build_tuner(spec, paths, [runs, lines], max_concurrent)
    results = tuner.fit()
    # Ray marks trials it stopped on SIGINT as terminated; their runs were never completed.
    runs.outage = False  # whatever happened during the study, ask the store again now
    unfinished = runs.mark_unfinished("KILLED")
    if runs.outage:
        print(
            f"warning: MLflow at {paths.tracking_uri} does not answer; every result is in "
            f"{experiment_path}: bring them in with python -m study.sync {spec.name} "
            f"--storage {paths.storage} --tracking-uri {paths.tracking_uri}",
            file=sys.stderr,
        )
        return 1
    finished = len(results) - unfinished
    if finished < trial_count(spec):
        tracking.finish(parent_run, "KILLED")
        print(
            f"interrupted: {finished} of {trial_count(spec)} trials finished; continue with "
            + resume_command(args),
            file=sys.stderr,
        )
        return 130
    if sync_results(runs, experiment_path):
        print(
            f"warning: MLflow at {paths.tracking_uri} failed while the results were brought "
            f"in; run python -m study.sync {spec.name} --storage {paths.storage} "
            f"--tracking-uri {paths.tracking_uri}",
            file=sys.stderr,
        )
        return 1
    if len(results) and results.num_errors == len(results):
        # Nothing to summarise: each trial's reason is above and in its run's `failure` tag.
        tracking.finish(parent_run, "FAILED")
        print(
            f"error: {spec.name}: every trial failed ({results.num_errors} of {len(results)}); "
            "each reason is printed above and in its MLflow run's failure tag",
            file=sys.stderr,
        )
        return 1
    print_summary(spec, paths, tracking, parent_run)
    tracking.finish(parent_run, "FINISHED")
    return 0


# --- command line ---------------------------------------------------------------------------


def count_argument(text: str) -> int:
    """A whole number >= 0 (`--num-gpus 0` runs on CPUs only)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


class OneLineParser(argparse.ArgumentParser):
    """Bad command lines are one line on stderr and exit status 2, as bad files are."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m study.run", description=__doc__.split("\n")[0])
    parser.add_argument("file", help="the study file (YAML), e.g. search_spaces/digits.yaml")
    parser.add_argument(
        "--num-gpus", type=count_argument, help="GPUs the study may use (all by default)"
    )
    parser.add_argument(
        "--num-cpus", type=count_argument, help="CPUs the study may use (all by default)"
    )
    parser.add_argument(
        "--address", help="join a running Ray cluster: auto, or HOST:PORT of its head node"
    )
    parser.add_argument(
        "--num-samples",
        type=int,
        help="trials of a search (study.num_samples; a comparison entry's own num_samples "
        "stays; a resume keeps the count its study started with)",
    )
    parser.add_argument(
        "--max-concurrent",
        type=int,
        help="trials at once (study.max_concurrent; a resume keeps the saved one)",
    )
    parser.add_argument("--tracking-uri", help="MLflow store (default: sqlite:///$PWD/mlflow.db)")
    parser.add_argument(
        "--storage", help="folder for Ray's results and checkpoints (default: ./ray_results)"
    )
    parser.add_argument(
        "--optuna-storage", help="Optuna's database (default: optuna.db beside mlflow.db)"
    )
    parser.add_argument("--name", help="the study's name (default: study.name in the file)")
    parser.add_argument(
        "--budget",
        help="apply this entry of the file's budgets section (e.g. full: the whole training "
        "set, more epochs, AutoAttack on every test image), or several joined by + (full+"
        "from_defaults), each in turn; default: the file's study.budget",
    )
    parser.add_argument(
        "--confirm-seeds",
        type=int,
        nargs="+",
        metavar="SEED",
        help="a comparison's confirm seeds (compare.confirm_seeds); with --resume, seeds "
        "appended to a comparison's re-run only what they add",
    )
    parser.add_argument(
        "--final-seeds",
        type=int,
        nargs="+",
        metavar="SEED",
        help="a comparison's final seeds (compare.seeds); appended on --resume as above",
    )
    parser.add_argument(
        "--sampler-seed",
        type=int,
        metavar="SEED",
        help="a search's or comparison's sampler seed (study.sampler.seed): the same study "
        "again with other proposals, named NAME_samplerSEED unless --name is given; read "
        "several comparisons together with `python -m analysis.compare --experiment A B`",
    )
    parser.add_argument("--resume", action="store_true", help="continue an interrupted study")
    parser.add_argument(
        "--dry-run", action="store_true", help="validate the file and print the plan; run nothing"
    )
    return parser.parse_args(argv)


# The options that say which study a command ran and where: a resume needs them all again.
RESUME_OPTIONS = ("budget", "sampler_seed", "name", "storage", "tracking_uri", "optuna_storage")


def resume_command(args: argparse.Namespace) -> str:
    """The command that continues the study `args` ran: its file, budget, sampler seed, name,
    stores and cluster as given (a comparison's stage, too, is continued by its comparison)."""
    parts = ["python -m study.run", shlex.quote(args.file), "--resume"]
    for key in (*RESUME_OPTIONS, "address"):
        value = getattr(args, key, None)
        if value is not None:
            parts += ["--" + key.replace("_", "-"), shlex.quote(str(value))]
    return " ".join(parts)


def compare_seeds(args: argparse.Namespace) -> dict[str, list[int]]:
    """The comparison seed lists the command line replaces (`--confirm-seeds`, `--final-seeds`)."""
    given = {"confirm_seeds": args.confirm_seeds, "seeds": args.final_seeds}
    return {key: seeds for key, seeds in given.items() if seeds is not None}


def quiet_libraries() -> None:
    """MLflow says "Creating initial MLflow database tables" whenever a store is first opened,
    Optuna "A new study created in RDB": the study's own lines say what runs. (Both libraries
    set their loggers' levels when imported, so this runs after the imports.)"""
    import mlflow  # noqa: F401 - configures its loggers
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    try:
        paths = study_paths(args.storage, args.tracking_uri, args.optuna_storage)
        spec = read_study_file(
            args.file,
            args.name,
            args.num_samples,
            args.max_concurrent,
            paths.teachers,
            args.budget,
            compare_seeds(args),
            args.sampler_seed,
        )
        if args.dry_run:
            if args.resume:  # the plan of what a resume runs: the saved study, as it checks it
                spec, _ = saved_or_new(spec, paths, resume=True, given=given_counts(args))
            print(describe(spec, paths, args.address))
            if args.resume and spec.compare is not None:
                from study.compare import resume_plan

                print("\n".join(resume_plan(spec, paths.experiment(spec.name))))
            return 0
        return run_study(spec, paths, args)
    except (ConfigError, StudyError, CheckpointError, DatasetNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
