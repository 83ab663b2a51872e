"""The search side of a study: Optuna's distributions and sampler, Ray's searcher and scheduler.

Ray's `OptunaSearch` tells Optuna every trial as COMPLETE with its last value, including trials
a scheduler stopped after a few epochs (REFERENCE.md, pitfall 3). `StudySearch` tells those
PRUNED instead, so Optuna's best trial, its importance and the ablation's `from_study` only ever
see trials that ran the full budget; a trial that raised is told FAIL.

Ray hands a searcher every result of a trial through `on_trial_result` except the last, which
goes only to `on_trial_complete`. `StudySearch` reports the study metric of every result,
the last included, as an Optuna intermediate value at step = the result's epoch (not Ray's
`training_iteration`, which a restored trial may renumber), once: an epoch Optuna already holds
(a retried trial re-reporting from an older checkpoint, a resumed study) is skipped. So Optuna's
intermediate values are the epochs Ray and MLflow hold, a COMPLETE trial's value is its last
epoch's, and so is a PRUNED one's (Optuna takes it from the last intermediate value).
"""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import optuna
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from gacd import schema
from study.spec import (
    ENTRY_KEY,
    EPOCHS_TOTAL,
    OPTUNA_NUMBER_KEY,
    POINT_KEY,
    DistributionSpec,
    StudySpec,
)

# Optuna user attributes that link an Optuna trial to its Ray trial (and so its MLflow run).
RAY_TRIAL_ID_ATTR = "ray_trial_id"
FULL_BUDGET_ATTR = "full_budget"
# Set on the trials of `study.sampler.points_to_evaluate` (run first, not the sampler's).
ENQUEUED_ATTR = "enqueued"


def optuna_distribution(spec: DistributionSpec) -> optuna.distributions.BaseDistribution:
    if spec.distribution == "choice":
        return optuna.distributions.CategoricalDistribution(spec.values)
    if spec.distribution == "int":
        return optuna.distributions.IntDistribution(
            int(spec.low), int(spec.high), step=spec.step or 1
        )
    return optuna.distributions.FloatDistribution(
        spec.low, spec.high, log=spec.distribution == "loguniform"
    )


def search_space(
    spec: StudySpec, entry: str | None = None
) -> dict[str, optuna.distributions.BaseDistribution]:
    return {key: optuna_distribution(value) for key, value in spec.search_space_of(entry).items()}


def sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    settings = spec.study.sampler
    if settings.name == "random":
        return optuna.samplers.RandomSampler(seed=settings.seed)
    return optuna.samplers.TPESampler(
        seed=settings.seed,
        multivariate=settings.multivariate,
        n_startup_trials=settings.n_startup_trials,
    )


def ran_full_budget(result: dict[str, Any] | None) -> bool:
    return bool(result) and result.get(schema.EPOCH) == result.get(EPOCHS_TOTAL)


class StudySearch(OptunaSearch):
    """`OptunaSearch` that links Optuna and Ray trials, reports every epoch (the last one
    included) once at step = epoch, and prunes early-stopped trials. `first_points`: searched
    values the study runs before its sampler proposes anything, enqueued in Optuna once."""

    def __init__(self, *args: Any, first_points: list[dict[str, Any]] | None = None, **kwargs):
        self.first_points = first_points or []  # set first: OptunaSearch sets the study up
        super().__init__(*args, **kwargs)

    def _setup_study(self, mode: str | list) -> None:
        super()._setup_study(mode)
        # Named after the study's metric (optuna-dashboard shows "Objective 0" otherwise).
        if self._ot_study is not None and isinstance(self.metric, str):
            self._ot_study.set_metric_names([self.metric])
        for point in self.first_points:
            enqueue_once(self._ot_study, point)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        params = super().suggest(trial_id)
        if params is None:
            return None
        optuna_trial = self._ot_trials[trial_id]
        optuna_trial.set_user_attr(RAY_TRIAL_ID_ATTR, trial_id)
        params = {**params, OPTUNA_NUMBER_KEY: optuna_trial.number}
        if optuna_trial.user_attrs.get(ENQUEUED_ATTR):  # as enqueued, read when asked for
            params[POINT_KEY] = True  # StudyASHA runs it to its full budget
        return params

    def report_epoch(self, trial_id: str, result: dict[str, Any] | None) -> None:
        """The result's study metric as the Optuna trial's intermediate value at its epoch,
        unless Optuna already holds that epoch (nor warns then)."""
        if not result or isinstance(self.metric, list) or trial_id in self._completed_trials:
            return
        optuna_trial = self._ot_trials.get(trial_id)
        value, epoch = result.get(self.metric), result.get(schema.EPOCH)
        if optuna_trial is None or value is None or epoch is None:
            return
        stored = self._ot_study._storage.get_trial(optuna_trial._trial_id)
        if int(epoch) in stored.intermediate_values:
            return
        # Trial.report skips (and warns about) steps in its cached copy of the trial, which a
        # restored searcher may hold out of step with the storage: keep the two in step.
        optuna_trial._cached_frozen_trial.intermediate_values.pop(int(epoch), None)
        optuna_trial.report(value, int(epoch))

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if trial_id in self._completed_trials:
            super().on_trial_result(trial_id, result)  # Ray's warning about a finished trial
            return
        self.report_epoch(trial_id, result)

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        # Ray's last result of a trial comes only here, never through on_trial_result.
        self.report_epoch(trial_id, result)
        optuna_trial = self._ot_trials.get(trial_id)
        full = ran_full_budget(result) and not error
        if optuna_trial is not None and trial_id not in self._completed_trials:
            optuna_trial.set_user_attr(FULL_BUDGET_ATTR, full)
        # No value: Optuna records FAIL after an error, PRUNED after an early stop.
        super().on_trial_complete(trial_id, result if full else None, error)


def enqueue_once(study: optuna.Study, params: dict[str, Any]) -> bool:
    """Enqueue a point to evaluate unless the study holds it already, waiting, running or
    told (a study started again before Ray saved its state: `--resume` with nothing to
    restore). One a killed driver left running was failed by `fail_orphaned_trials`: it is
    enqueued again, so the point is still evaluated. Returns whether it was enqueued."""
    for trial in study.get_trials(deepcopy=False):
        held = trial.system_attrs.get("fixed_params", trial.params)
        if trial.state != optuna.trial.TrialState.FAIL and held == params:
            return False
    study.enqueue_trial(params, user_attrs={ENQUEUED_ATTR: True})
    return True


def searcher(
    spec: StudySpec, storage: optuna.storages.BaseStorage, entry: str | None = None
) -> StudySearch:
    """Seeded Optuna sampler over the study's space (or one comparison entry's), its trials
    kept in `storage`; the study's points to evaluate enqueued first."""
    return StudySearch(
        space=search_space(spec, entry),
        metric=spec.study.metric,
        mode=spec.study.direction,
        sampler=sampler(spec),
        study_name=spec.optuna_study_name(entry),
        storage=storage,
        first_points=spec.points_to_evaluate(entry),
    )


class CompareSearch(Searcher):
    """A comparison's searches as one Ray searcher: one `StudySearch` (its own Optuna study,
    `<study>.<entry>`, its own seeded sampler) per method entry, each given exactly its
    `trials[entry]` trials, proposed in turn so that every method's search advances at the
    same pace on the cluster (the same share of its trials; with equal trials, one each in
    turn). Each proposal carries its entry (`ENTRY_KEY`)."""

    def __init__(self, searchers: dict[str, StudySearch], trials: dict[str, int], metric, mode):
        super().__init__(metric=metric, mode=mode)
        self.searchers = searchers
        self.trials = trials
        self.proposed = dict.fromkeys(searchers, 0)
        self.entry_of: dict[str, str] = {}

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # each entry's searcher has its space, metric and mode

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        open_entries = [e for e, n in self.proposed.items() if n < self.trials[e]]
        if not open_entries:
            return Searcher.FINISHED
        # the least advanced first, by the share of its own trials proposed
        entry = min(open_entries, key=lambda e: self.proposed[e] / self.trials[e])
        params = self.searchers[entry].suggest(trial_id)
        if params is None or params == Searcher.FINISHED:
            return params
        self.proposed[entry] += 1
        self.entry_of[trial_id] = entry
        return {**params, ENTRY_KEY: entry}

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if trial_id in self.entry_of:
            self.searchers[self.entry_of[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        if trial_id in self.entry_of:
            self.searchers[self.entry_of[trial_id]].on_trial_complete(trial_id, result, error)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__dict__.copy(), file)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as file:
            state = pickle.load(file)
        if "trials_per_entry" in state:  # saved before each entry could have its own count
            state["trials"] = dict.fromkeys(state["searchers"], state.pop("trials_per_entry"))
        self.__dict__.update(state)


def compare_searcher(spec: StudySpec, storage: optuna.storages.BaseStorage) -> CompareSearch:
    assert spec.compare is not None
    searchers = {entry: searcher(spec, storage, entry) for entry in spec.compare.methods}
    return CompareSearch(searchers, spec.trials_by_entry(), spec.study.metric, spec.study.direction)


class PerEntryScheduler(FIFOScheduler):
    """One ASHA per method entry of a comparison: a trial is stopped early only against the
    trials of its own method (methods learn at different speeds; one ASHA across them would
    stop the slow starters, not the poor configurations). Trials run first in, first out."""

    def __init__(self, schedulers: dict[str, TrialScheduler]) -> None:
        super().__init__()
        self.schedulers = schedulers

    def of(self, trial: Any) -> TrialScheduler:
        return self.schedulers[trial.config[ENTRY_KEY]]

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return all(s.set_search_properties(metric, mode, **spec) for s in self.schedulers.values())

    def on_trial_add(self, tune_controller, trial) -> None:
        self.of(trial).on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial) -> None:
        self.of(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        return self.of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self.of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self.of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "\n".join(f"{e}: {s.debug_string()}" for e, s in self.schedulers.items())


class StudyASHA(ASHAScheduler):
    """ASHA that never stops a point to evaluate (`study.sampler.points_to_evaluate`): its
    epochs are recorded at the rungs like any trial's, so they still set the cutoffs the others
    are stopped by, but a configuration the study asked to measure is measured to the end (a
    slow starter such as a paper's defaults would otherwise be cut at the first rung)."""

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        spared = trial.config.get(POINT_KEY) and not ran_full_budget(result)
        if action == TrialScheduler.STOP and spared:
            self._num_stopped -= 1
            return TrialScheduler.CONTINUE
        return action


def scheduler(spec: StudySpec, epochs: int) -> TrialScheduler:
    """ASHA on epochs (metric and mode come from the TuneConfig), or first-in-first-out; in a
    comparison, one of them per method entry."""
    if spec.study.mode == "compare":
        assert spec.compare is not None
        one = StudySpec(study=dataclasses.replace(spec.study, mode="search"))
        return PerEntryScheduler({entry: scheduler(one, epochs) for entry in spec.compare.methods})
    if spec.scheduler == "asha":
        settings = spec.study.scheduler
        return StudyASHA(
            time_attr=schema.EPOCH,
            max_t=epochs,
            grace_period=settings.grace_period,
            reduction_factor=settings.reduction_factor,
        )
    return FIFOScheduler()


def optuna_storage(url: str) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(url)


def study_exists(url: str, name: str) -> bool:
    return name in optuna.study.get_all_study_names(url)


def best_full_budget_trial(url: str, name: str) -> optuna.trial.FrozenTrial:
    """The best COMPLETE trial of a search: those are exactly the full-budget ones."""
    study = optuna.load_study(study_name=name, storage=url)
    return study.best_trial


def fail_orphaned_trials(url: str, name: str, known_trial_ids: set[str]) -> int:
    """Optuna trials a killed driver asked for after Ray last saved its experiment state: no
    Ray trial will ever tell them, so a resume marks them FAIL. Returns how many."""
    study = optuna.load_study(study_name=name, storage=url)
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    orphans = [t for t in running if t.user_attrs.get(RAY_TRIAL_ID_ATTR) not in known_trial_ids]
    for trial in orphans:
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    return len(orphans)
