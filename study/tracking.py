"""The study's MLflow side: one experiment per study, a parent run, a child run per trial.

Only the driver writes to MLflow (through `TrialRuns`, a Ray Tune callback), so a SQLite store
has one writer however many trials run, and worker nodes need no access to the store.
The study owns each run's identity (REFERENCE.md, pitfall 6): a trial's run is found by its
Ray trial id under the study's parent run and continued, never created twice, so a resumed or
retried trial keeps one run, and an epoch already logged is not logged again.
"""

from __future__ import annotations

import functools
import getpass
import json
import math
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from ray import tune

from gacd import schema
from gacd.checkpoint import load_checkpoint
from gacd.config import Config, flatten
from gacd.methods import run_settings
from gacd.train import BEST_CHECKPOINT_FILE
from study.spec import (
    ENTRY_KEY,
    OPTUNA_NUMBER_KEY,
    POINT_KEY,
    RESULT_DATASETS,
    RESULT_DEVICE,
    RESULT_HARDWARE,
    VARIANT_KEY,
    StudyError,
    StudySpec,
    config_hash,
)
from study.trainable import CHECKPOINT_FILE

TEACHERS_EXPERIMENT = "gacd-teachers"
# MLflow 3 files an experiment under a kind (model training, GenAI) by this tag, and infers a
# GenAI one from an unmarked, trace-less experiment. Its UI still starts in GenAI mode: the page
# of a study's runs table asks for `?workflowType=machine_learning` (`study.report`).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
MAX_PARAMS_PER_BATCH = 100
# While MLflow is down, try it again at most this often (the study never waits on it).
RETRY_AFTER_OUTAGE_S = 30.0


def git_commit() -> str:
    """The commit of the code that runs the study (`unknown` outside a git checkout)."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return result.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def source_tags(commit: str) -> dict[str, str]:
    """Source, user and commit of a run, as MLflow's UI shows them (the client's `create_run`
    sets none of them; the fluent API would, from the driver's context)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (some containers)
        user = "unknown"
    return {
        schema.TAG_SOURCE_NAME: "study.run",
        schema.TAG_SOURCE_TYPE: "LOCAL",
        schema.TAG_USER: user,
        schema.TAG_GIT_COMMIT: commit,
    }


def artifact_root(tracking_uri: str) -> str | None:
    """Artifacts of a SQLite store go beside the database (not in whatever the cwd is)."""
    if tracking_uri.startswith("sqlite:///"):
        database = Path(tracking_uri.removeprefix("sqlite:///"))
        return (database.parent / "mlartifacts").resolve().as_uri()
    return None


def check_tracking_uri_form(uri: str) -> None:
    """Refuse a malformed URI (before anything is written or started)."""
    scheme = urlparse(uri).scheme
    if scheme not in ("sqlite", "http", "https", "postgresql", "mysql", "databricks"):
        raise StudyError(
            f"--tracking-uri {uri!r}: expected sqlite:///ABSOLUTE/PATH.db or http://HOST:PORT "
            "(an mlflow server)"
        )
    if scheme == "sqlite" and not Path(uri.removeprefix("sqlite:///")).parent.is_dir():
        raise StudyError(f"--tracking-uri {uri!r}: the folder of the database does not exist")


def check_tracking_uri(uri: str) -> None:
    """Refuse a store that does not answer, before anything starts."""
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as error:  # noqa: BLE001 - any failure here means "unreachable"
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise StudyError(f"MLflow at {uri!r} does not answer: {first_line}") from error


class Tracking:
    """The driver's MLflow client for one tracking URI."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.client = MlflowClient(uri)

    def experiment_id(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            if EXPERIMENT_KIND_TAG not in experiment.tags:  # made before experiments were marked
                self.client.set_experiment_tag(
                    experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
                )
            return experiment.experiment_id
        location = artifact_root(self.uri)
        location = f"{location}/{name}" if location else None
        return self.client.create_experiment(
            name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )

    def find_runs(self, experiment_id: str, **tags: str) -> list[Any]:
        clauses = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
        return self.client.search_runs([experiment_id], filter_string=clauses, max_results=5000)

    def study_run(
        self,
        spec: StudySpec,
        commit: str,
        resume: bool,
        parent: str | None = None,
        role: str = schema.ROLE_STUDY,
    ) -> tuple[str, str]:
        """`(experiment_id, parent_run_id)`: a new parent run, or the one a resume continues;
        `parent`, the comparison's run it is nested under (a stage of `study.compare`);
        `role`, a study's or a comparison's own run."""
        experiment = spec.study.experiment_name
        experiment_id = self.experiment_id(experiment)
        runs = self.find_runs(experiment_id, **{schema.TAG_ROLE: role, schema.TAG_STUDY: spec.name})
        if runs and not resume:
            raise StudyError(
                f"MLflow experiment {experiment!r} already holds study {spec.name!r} "
                f"(run {runs[0].info.run_id}) in {self.uri}: pass --resume to continue it, or "
                "--name for a new study"
            )
        if runs:
            run_id = runs[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return experiment_id, run_id
        tags = {
            schema.TAG_ROLE: role,
            schema.TAG_STUDY: spec.name,
            schema.TAG_MODE: spec.study.mode,
            schema.TAG_METRIC: spec.study.metric,
            schema.TAG_DIRECTION: spec.study.direction,
            **source_tags(commit),
        }
        if spec.study.mode == "ablation":
            tags[schema.TAG_VARIANTS] = json.dumps(list(spec.variants()))
            tags[schema.TAG_REFERENCE] = spec.reference
        if parent is not None:
            tags[schema.TAG_PARENT] = parent
        if spec.study.budget is not None:
            tags[schema.TAG_BUDGET] = spec.study.budget
        run = self.client.create_run(experiment_id, tags=tags, run_name=spec.name)
        self.client.log_dict(run.info.run_id, spec.to_dict(), schema.STUDY_ARTIFACT)
        return experiment_id, run.info.run_id

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(key, str(value)) for key, value in params.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=items[start : start + MAX_PARAMS_PER_BATCH])

    def log_epochs(self, run_id: str, history: list[dict[str, float]]) -> None:
        now = int(time.time() * 1000)
        entries = [
            Metric(key, float(value), now, int(epoch_metrics[schema.EPOCH]))
            for epoch_metrics in history
            for key, value in epoch_metrics.items()
            if schema.is_metric(key)
        ]
        for start in range(0, len(entries), 1000):
            self.client.log_batch(run_id, metrics=entries[start : start + 1000])

    def teacher_run(self, checkpoint: Path, commit: str) -> str:
        """The teacher's own run in the `gacd-teachers` experiment, logged once per config."""
        state = load_checkpoint(checkpoint, what="teacher checkpoint")
        config = Config.from_dict(flatten(state["config"]))
        key = checkpoint.parent.name  # the teacher cache is keyed by the hash of its weights
        experiment_id = self.experiment_id(TEACHERS_EXPERIMENT)
        runs = self.find_runs(
            experiment_id, **{schema.TAG_ROLE: schema.ROLE_TEACHER, schema.TAG_CONFIG_HASH: key}
        )
        if runs:
            return runs[0].info.run_id
        tags = {
            schema.TAG_ROLE: schema.ROLE_TEACHER,
            schema.TAG_CONFIG_HASH: key,
            schema.TAG_TEACHER_CHECKPOINT: str(checkpoint),
            **source_tags(commit),
        }
        name = f"{config.method}-{config.student.arch}-{key}"
        run_id = self.client.create_run(experiment_id, tags=tags, run_name=name).info.run_id
        self.log_params(run_id, run_settings(config))
        self.log_epochs(run_id, state["history"])
        self.finish(run_id)
        return run_id


def survives_outages(hook):
    """A tracking hook that never stops a study: when MLflow does not answer, the study goes on
    (Ray keeps every result) and `sync_results` brings the missed epochs in later."""

    @functools.wraps(hook)
    def guarded(self, *args: Any, **kwargs: Any) -> Any:
        if self.outage and time.monotonic() - self.outage_since < RETRY_AFTER_OUTAGE_S:
            return None  # do not stall every epoch on a store that is down
        try:
            result = hook(self, *args, **kwargs)
        except Exception as error:  # noqa: BLE001 - whatever the store raised
            if not self.outage:
                first_line = (str(error).strip().splitlines() or [repr(error)])[0]
                print(
                    f"warning: MLflow at {self.tracking_uri} failed ({first_line[:200]}); the "
                    "study goes on, its results stay in Ray's folder and are brought into "
                    "MLflow at the end, or by python -m study.sync",
                    flush=True,
                )
            self.outage, self.outage_since = True, time.monotonic()
            self._reset()
            return None
        if self.outage:
            print(f"MLflow at {self.tracking_uri} answers again", flush=True)
            self.outage = False
        return result

    return guarded


class TrialRuns(tune.Callback):
    """Logs each Ray trial to its own child run of the study's parent run.

    Pickled with the experiment (Ray restores callbacks on `Tuner.restore`), so it holds only
    plain values; the client and the caches are rebuilt after unpickling.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str,
        spec: StudySpec,
        commit: str,
        log_checkpoints: bool,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.spec = spec
        self.commit = commit
        self.log_checkpoints = log_checkpoints
        self.outage, self.outage_since = False, 0.0
        self._reset()

    def _reset(self) -> None:
        self._tracking: Tracking | None = None
        self._runs: dict[str, str] = {}
        self._last_epoch: dict[str, int] = {}
        self._device_logged: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_tracking", "_runs", "_last_epoch", "_device_logged"):
            state.pop(key)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    @property
    def tracking(self) -> Tracking:
        if self._tracking is None:
            self._tracking = Tracking(self.tracking_uri)
        return self._tracking

    # --- the run of a trial -------------------------------------------------------------

    def run_id(self, trial: Any) -> str:
        """The trial's run: cached, else found by its trial id, else created."""
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        found = self.tracking.find_runs(
            self.experiment_id,
            **{schema.TAG_RAY_TRIAL: trial.trial_id, schema.TAG_PARENT: self.parent_run_id},
        )
        if found:
            run_id = found[0].info.run_id
            history = self.tracking.client.get_metric_history(run_id, schema.EPOCH)
            self._last_epoch[trial.trial_id] = max((m.step for m in history), default=0)
        else:
            run_id = self.create_run(trial)
            self._last_epoch[trial.trial_id] = 0
        self._runs[trial.trial_id] = run_id
        return run_id

    def create_run(self, trial: Any) -> str:
        config = self.spec.trial_config(trial.config)
        tags = {
            schema.TAG_ROLE: schema.ROLE_TRIAL,
            schema.TAG_STUDY: self.spec.name,
            schema.TAG_MODE: self.spec.study.mode,
            schema.TAG_RAY_TRIAL: trial.trial_id,
            schema.TAG_SEED: schema.seed_tag(self.spec.trial_seeds(trial.config)),
            schema.TAG_CONFIG_HASH: config_hash(config),
            schema.TAG_PARENT: self.parent_run_id,
            **source_tags(self.commit),
        }
        if self.spec.study.mode == "ablation":
            variant = trial.config[VARIANT_KEY]
            overrides = self.spec.variants()[variant]
        else:
            variant = schema.SEARCH_VARIANT
            entry = trial.config.get(ENTRY_KEY)
            space = self.spec.search_space_of(entry)
            overrides = {key: trial.config[key] for key in space if key in trial.config}
            tags[schema.TAG_OPTUNA_TRIAL] = str(trial.config.get(OPTUNA_NUMBER_KEY))
            if trial.config.get(POINT_KEY):
                tags[schema.TAG_POINT_TO_EVALUATE] = "true"
            if entry is not None:
                variant = entry  # a comparison's search: the method entry it tunes
                tags[schema.TAG_ENTRY] = entry
        tags[schema.TAG_VARIANT] = variant
        tags[schema.TAG_OVERRIDES] = json.dumps(overrides, sort_keys=True)
        tags |= evaluation_tags(config)
        name = self.spec.trial_label(trial.config, trial.trial_id)
        run = self.tracking.client.create_run(self.experiment_id, tags=tags, run_name=name)
        settings = run_settings(config) | {"seed": tags[schema.TAG_SEED]}
        self.tracking.log_params(run.info.run_id, settings)
        return run.info.run_id

    # --- Ray Tune's hooks ---------------------------------------------------------------

    @survives_outages
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self.run_id(trial)
        self.tracking.client.update_run(run_id, status="RUNNING")

    @survives_outages
    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        run_id = self.run_id(trial)
        epoch = int(result.get(schema.EPOCH, 0))
        if epoch <= self._last_epoch.get(trial.trial_id, 0):
            return  # re-run after a restore from an older checkpoint: logged already
        epoch_metrics = {
            key: value
            for key, value in result.items()
            if schema.is_metric(key) and isinstance(value, int | float) and math.isfinite(value)
        }
        if trial.trial_id not in self._device_logged:
            run = self.tracking.client.get_run(run_id)
            self.log_device(run, result)
            self.log_datasets(run, result)
            self._device_logged.add(trial.trial_id)
        self.tracking.log_epochs(run_id, [{**epoch_metrics, schema.EPOCH: epoch}])
        self._last_epoch[trial.trial_id] = epoch

    def log_datasets(self, run: Any, result: dict) -> None:
        """The splits the trial used as the run's inputs (MLflow's Dataset column), once."""
        splits = result.get(RESULT_DATASETS)
        if not splits or run.inputs.dataset_inputs:
            return
        datasets = dataset_inputs(json.loads(splits))
        self.tracking.client.log_inputs(run.info.run_id, datasets=datasets)

    def log_device(self, run: Any, result: dict) -> None:
        """The `device` parameter: the one the trial ran on (its config may say `auto`), and
        `hardware`: that GPU, or that CPU with PyTorch's kernels and threads on it
        (`gacd.runtime.hardware`), which a CPU run's digits depend on. A trial resumed on
        another machine keeps the first (parameters are final)."""
        for key in (RESULT_DEVICE, RESULT_HARDWARE):
            value = result.get(key)
            if value is not None and key not in run.data.params:
                self.tracking.client.log_param(run.info.run_id, key, str(value))

    @survives_outages
    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from study.search import ran_full_budget

        run_id = self.run_id(trial)
        if self.tracking.client.get_run(run_id).info.status == "FINISHED":
            return  # already ended (a sync after the study)
        full = ran_full_budget(trial.last_result)
        self.tracking.client.set_tag(run_id, schema.TAG_FULL_BUDGET, schema.flag(full))
        self.set_state(run_id, schema.STATE_COMPLETE if full else schema.STATE_STOPPED)
        if self.log_checkpoints and trial.checkpoint is not None:
            with trial.checkpoint.as_directory() as folder:
                self.tracking.client.log_artifacts(run_id, folder, "checkpoint")
                self.log_students(run_id, Path(folder))
        self.tracking.finish(run_id, "FINISHED")

    def log_students(self, run_id: str, folder: Path) -> None:
        """The final run's students as MLflow models (`student`: the last epoch's, and
        `student_best`: its best validation epoch's), listed under the run's and the
        experiment's Models; loaded back with `mlflow.pyfunc.load_model`."""
        for name, file in (("student", CHECKPOINT_FILE), ("student_best", BEST_CHECKPOINT_FILE)):
            if (folder / file).is_file():
                log_student_model(self.tracking_uri, run_id, folder / file, name)

    @survives_outages
    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self.run_id(trial)
        if self.tracking.client.get_run(run_id).info.status == "FAILED":
            return
        self.tracking.client.set_tag(run_id, schema.TAG_FULL_BUDGET, schema.flag(False))
        self.tracking.client.set_tag(run_id, schema.TAG_FAILURE, failure_reason(trial))
        self.set_state(run_id, schema.STATE_FAILED)
        self.tracking.finish(run_id, "FAILED")

    def set_state(self, run_id: str, state: str) -> None:
        """The `state` tag, and for a trial stopped early its run name says so (MLflow would
        show it as Finished, like one that ran its whole budget)."""
        client = self.tracking.client
        client.set_tag(run_id, schema.TAG_STATE, state)
        name = client.get_run(run_id).info.run_name or ""
        suffix = f" ({schema.STATE_STOPPED})"
        if state == schema.STATE_STOPPED and not name.endswith(suffix):
            client.update_run(run_id, name=name + suffix)

    @survives_outages
    def mark_unfinished(self, status: str = "KILLED") -> int:
        """End the runs of trials still going when the driver stops (a resume sets them
        RUNNING again); returns how many there were."""
        runs = self.tracking.find_runs(
            self.experiment_id, **{schema.TAG_PARENT: self.parent_run_id}
        )
        unfinished = [run for run in runs if run.info.status == "RUNNING"]
        for run in unfinished:
            self.tracking.finish(run.info.run_id, status)
        return len(unfinished)


def log_student_model(tracking_uri: str, run_id: str, checkpoint: Path, name: str) -> None:
    """One checkpoint's student as an MLflow model "from code" (`study/student_model.py`):
    the weights-only checkpoint is its artifact, nothing is pickled."""
    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    spec = load_checkpoint(checkpoint)["data_spec"]
    if spec is None:
        return  # a checkpoint of an older version: it stays an artifact only
    size, channels = spec["image_size"], spec["in_channels"]
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, channels, size, size))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, spec["num_classes"]))]),
    )
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.pyfunc.log_model(
            name=name,
            python_model=str(Path(__file__).with_name("student_model.py")),
            artifacts={"checkpoint": str(checkpoint)},
            signature=signature,
            input_example=np.zeros((1, channels, size, size), np.float32),
            # Loading runs this project's code: its own install, not an inferred list.
            pip_requirements=["gacd-study", "torch", "numpy"],
        )


def dataset_inputs(splits: list[dict[str, Any]]) -> list[DatasetInput]:
    """`gacd.data.describe_splits` as MLflow dataset inputs, each tagged with its context (and,
    in a trial over several seeds, with the seeds that used it: `seed`, e.g. `0,1`)."""
    return [
        DatasetInput(
            Dataset(
                name=split["name"],
                digest=split["digest"],
                source_type="local",
                source=json.dumps({"uri": split["source"]}),
                profile=json.dumps(split["profile"]),
            ),
            tags=[InputTag(MLFLOW_DATASET_CONTEXT, split["context"])] + seeds_tag(split),
        )
        for split in splits
    ]


def seeds_tag(split: dict[str, Any]) -> list[InputTag]:
    seeds = split.get("seeds")
    return [InputTag(schema.TAG_SEED, schema.seed_tag(seeds))] if seeds else []


def evaluation_tags(config: Config) -> dict[str, str]:
    """Final runs with AutoAttack: the version it runs, which names fewer targets than the
    standard 9 on a model with fewer than 10 classes."""
    from gacd.attacks import autoattack_available, autoattack_version
    from gacd.data import class_count

    if not (config.final and config.eval.autoattack and autoattack_available()):
        return {}
    return {schema.TAG_AUTOATTACK: autoattack_version(class_count(config.data))}


def failure_reason(trial: Any) -> str:
    """The last line of the trial's error (the exception and its message), at most 5000 chars.

    Ray writes the error to the trial's driver staging folder first and copies it to the
    study's storage later, so while the study runs the local file is the one that exists
    (`Trial.get_error` reads storage only, and returned nothing in about one run in ten)."""
    text = None
    local = getattr(trial, "error_file", None)
    if local and Path(local).is_file():
        text = Path(local).read_text(errors="replace")
    if not text:
        error = trial.get_error()
        text = str(error) if error is not None else "unknown error"
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else text)[:5000]


def sync_results(runs: TrialRuns, experiment_path: str | Path) -> int:
    """Bring every epoch Ray recorded for a study into MLflow, ending each run as its trial
    ended; epochs already logged are skipped, so it can run any number of times. Returns the
    number of trials whose runs could not be written (0 when MLflow answered throughout)."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(experiment_path))
    frames = analysis.trial_dataframes
    failed = 0
    for trial in analysis.trials:
        runs.outage, runs.outage_since = False, 0.0
        frame = frames.get(trial.trial_id)
        results = [] if frame is None else frame.to_dict("records")
        for result in sorted(results, key=lambda row: row.get(schema.EPOCH, 0)):
            runs.on_trial_result(0, [], trial, result)
        if trial.status == "TERMINATED":
            runs.on_trial_complete(0, [], trial)
        elif trial.status == "ERROR":
            runs.on_trial_error(0, [], trial)
        failed += runs.outage
    return failed
