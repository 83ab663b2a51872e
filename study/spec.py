"""A study file: what to train, what to vary, and how to schedule it; validated once, at the edge.

A study file (YAML) has these sections (see the README for the full format):

- `study`: name, `mode: search | ablation`, the metric and its direction, samples, scheduler,
  sampler, concurrency and retries.
- `resources`: CPUs and GPUs per trial (fractions allowed).
- `teacher`: a checkpoint (with its architecture when it is a plain state dict), or `train:` a
  `gacd` config that trains one, once, cached by the hash of its resolved config.
- `base`: overrides of the `gacd` defaults shared by every trial.
- `search` (mode `search`): dotted config keys to distributions.
- `ablation` (mode `ablation`): a reference (overrides, or `from_study: NAME`, the best
  full-budget configuration of a finished search), named variants as overrides, and seeds.
- `compare` (mode `compare`): methods, each with its own overrides and search space, searched
  alike (`study.num_samples` trials each, one scheduler, one epoch budget), their best trials
  confirmed on fresh seeds, the winners run on the test split (`study.compare`).

`read_study_file` turns the file into a `StudySpec`, and every trial's `gacd` config is built
from it by `StudySpec.trial_config`, so a file that passes `--dry-run` cannot fail later on its
config.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gacd import schema
from gacd.config import (
    Config,
    ConfigError,
    ConfigFileError,
    TeacherConfig,
    build_dataclass,
    flatten,
    nest_dotted,
    read_yaml_file,
    require,
    set_dotted,
)
from gacd.methods import METHODS
from gacd.schema import REFERENCE

# `study.sampler.points_to_evaluate`: the base configuration's value of every searched key.
DEFAULTS_POINT = "defaults"
# The variant an ablation compares every other variant with.
# Keys a trial's Ray config may carry besides searched parameters.
VARIANT_KEY = "variant"
SEED_KEY = "seed"
OPTUNA_NUMBER_KEY = "optuna_trial_number"
# A compare search's trial: the entry of `compare.methods` it belongs to.
ENTRY_KEY = "compare_entry"
# In a trial's Ray config: it is one of `study.sampler.points_to_evaluate` (ASHA never stops it).
POINT_KEY = "point_to_evaluate"
# Reported with every epoch, so a scheduler's early stop can be told from a full run.
EPOCHS_TOTAL = "epochs_total"
# The device a trial ran on, in its results (the config may say only `auto`).
RESULT_DEVICE = "device"
RESULT_HARDWARE = "hardware"  # `gacd.runtime.hardware`: logged as the run's parameter
# The splits a trial used (JSON: `gacd.data.describe_splits`), for MLflow's run inputs.
RESULT_DATASETS = "datasets"
# A data-parallel trial's Ray Train workers' placement group (hex id), for the driver to free.
RESULT_WORKER_GROUP = "worker_placement_group"

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class SchedulerSpec:
    # None: `asha` for a search, `none` for an ablation (every variant runs its full budget).
    name: Literal["asha", "none"] | None = None
    grace_period: int = 1
    reduction_factor: float = 2.0


@dataclass
class SamplerSpec:
    name: Literal["tpe", "random"] = "tpe"
    seed: int = 0
    multivariate: bool = True
    # Random proposals before TPE models the results.
    n_startup_trials: int = 5
    # Configurations the search runs first, before the sampler proposes any (Ray Tune's
    # `points_to_evaluate`, enqueued in Optuna): `defaults`, the base configuration's value of
    # every searched key (in a comparison, each method's own), or a mapping of searched keys to
    # values (a key left out is sampled). They count among `study.num_samples` and run their
    # full budget: ASHA records them at its rungs but never stops them. None: none (a study
    # saved before this key existed resumes unchanged).
    points_to_evaluate: list[Any] | None = None


@dataclass
class StudySection:
    name: str | None = None
    mode: Literal["search", "ablation", "compare"] = "search"
    metric: str = schema.VAL_PGD_ACC
    direction: Literal["max", "min"] = "max"
    num_samples: int = 8
    max_concurrent: int | None = None
    # Times a trial is restarted from its last checkpoint after its process dies.
    max_failures: int = 2
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    # The entry of the file's `budgets` applied (`--budget` chooses another; None: the file
    # as written).
    budget: str | None = None
    # The MLflow experiment the study logs to (None: the study's name). A comparison's stages
    # share the comparison's experiment.
    experiment: str | None = None
    # A search's trial trained on each of these seeds side by side, reporting each epoch's mean
    # over them (`gacd.train.fit_seeds`): a less noisy objective for the sampler and the
    # scheduler, at that many times the cost. None: one run on `base.seed`.
    trial_seeds: list[int] | None = None

    @property
    def experiment_name(self) -> str:
        return self.experiment or self.name or ""


@dataclass
class ResourcesSpec:
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    # The teacher's data-parallel workers (Ray Train) at most: null, every GPU the study may
    # use (one CPU each on a CPU cluster, for the CPUs its trials will share).
    teacher_workers: int | None = None
    # Data-parallel workers of one trial (a Ray Train run the trial drives, `gacd.parallel`):
    # null, one per GPU when `gpus_per_trial` is 2 or more, else 1. On CPUs, the trial's CPUs
    # are shared.
    workers_per_trial: int | None = None

    @property
    def trial_workers(self) -> int:
        if self.workers_per_trial is not None:
            return self.workers_per_trial
        return int(self.gpus_per_trial) if self.gpus_per_trial >= 2 else 1


@dataclass
class TeacherSpec(TeacherConfig):
    """The trials' `teacher` section (gacd's own: a checkpoint and, for a plain state dict,
    its architecture) plus `train`: the `gacd` config of a teacher to train first. A field
    left unset keeps what `base` says, so `normalize` has no default of its own here."""

    normalize: bool | None = None  # type: ignore[assignment]
    train: dict[str, Any] | None = None


@dataclass
class AblationSpec:
    reference: dict[str, Any] = field(default_factory=dict)
    from_study: str | None = None
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # Evaluate every run on the test split after its last epoch. `false` keeps an ablation on
    # the validation split: `study.confirm` re-ranks a search's best trials that way.
    test_split: bool = True
    # The reference's name (its runs `full-seed0`, ...); a comparison names it by its method.
    reference_name: str = REFERENCE


@dataclass
class DistributionSpec:
    distribution: Literal["uniform", "loguniform", "int", "choice"] | None = None
    low: float | None = None
    high: float | None = None
    step: int | None = None
    values: list[Any] | None = None


@dataclass
class MethodEntry:
    """One method of a comparison: its `method` (default: the entry's name), the overrides it
    always runs with, the dotted keys its search varies, and its search's trials
    (`num_samples`; None: `study.num_samples`, as every other method's)."""

    method: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    search: dict[str, DistributionSpec] = field(default_factory=dict)
    # More trials for a larger space (GACD's five keys against TRADES' two): equal trial counts are
    # not equal search. The comparison says so wherever it reports (`study.compare`).
    num_samples: int | None = None


@dataclass
class CompareSpec:
    """Every method searched with the same budget (`study.num_samples` trials each, unless an
    entry sets its own `num_samples`), its `top`
    full-budget trials re-run on `confirm_seeds` (validation split), the one with the best
    mean run on `seeds` (test split) and compared with `reference`'s."""

    reference: str = "gacd"
    methods: dict[str, MethodEntry] = field(default_factory=dict)
    top: int = 2
    confirm_seeds: list[int] = field(default_factory=lambda: [1000, 1001])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])

    def entry_method(self, entry: str) -> str:
        return self.methods[entry].method or entry


@dataclass
class StudySpec:
    study: StudySection = field(default_factory=StudySection)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    teacher: TeacherSpec | None = None
    base: dict[str, Any] = field(default_factory=dict)
    search: dict[str, DistributionSpec] = field(default_factory=dict)
    ablation: AblationSpec | None = None
    compare: CompareSpec | None = None

    @property
    def name(self) -> str:
        assert self.study.name is not None
        return self.study.name

    @property
    def scheduler(self) -> str:
        return self.study.scheduler.name or ("none" if self.study.mode == "ablation" else "asha")

    @property
    def searches(self) -> bool:
        """Trials proposed by Optuna (a search, or a comparison's searches), not a grid."""
        return self.study.mode in ("search", "compare")

    @property
    def starts_from_defaults(self) -> bool:
        """Its search (each method's, in a comparison) runs the base configuration first."""
        return DEFAULTS_POINT in (self.study.sampler.points_to_evaluate or [])

    @property
    def confirms(self) -> bool:
        """A comparison with a confirm stage: `compare.top` above 1, or searches that start from
        each method's defaults, whose winner is then chosen between its defaults and its best
        on the confirm seeds."""
        assert self.compare is not None
        return self.compare.top > 1 or self.starts_from_defaults

    @property
    def reference(self) -> str:
        assert self.ablation is not None
        return self.ablation.reference_name

    def variants(self) -> dict[str, dict[str, Any]]:
        """The ablation's variants by name, the reference first."""
        assert self.ablation is not None
        return {self.reference: {}, **self.ablation.variants}

    def search_space_of(self, entry: str | None = None) -> dict[str, DistributionSpec]:
        """What a search varies: the study's `search`, or one comparison entry's."""
        if entry is None:
            return self.search
        assert self.compare is not None
        return self.compare.methods[entry].search

    def trials_of(self, entry: str | None = None) -> int:
        """The trials of a search, or of one method's search in a comparison."""
        own = None
        if entry is not None:
            assert self.compare is not None
            own = self.compare.methods[entry].num_samples
        return self.study.num_samples if own is None else own

    def trials_by_entry(self) -> dict[str, int]:
        """A comparison's methods and the trials each one's search has."""
        assert self.compare is not None
        return {entry: self.trials_of(entry) for entry in self.compare.methods}

    def optuna_study_name(self, entry: str | None = None) -> str:
        """The Optuna study of a search, or of one method of a comparison's searches."""
        return self.name if entry is None else f"{self.name}.{entry}"

    def trial_values(self, ray_config: dict[str, Any]) -> dict[str, Any]:
        """Nested overrides of the `gacd` defaults for one trial, in order of precedence:
        base, teacher, reference and variant (ablation), searched values, seed and split."""
        values = copy.deepcopy(nest_dotted(self.base))
        for key, value in self.teacher_overrides().items():
            set_dotted(values, f"teacher.{key}", value)
        if self.study.mode == "ablation":
            assert self.ablation is not None
            layers = [self.ablation.reference, self.variants()[ray_config[VARIANT_KEY]]]
            for layer in layers:
                for key, value in layer.items():
                    set_dotted(values, key, copy.deepcopy(value))
            values["seed"] = ray_config[SEED_KEY]
        entry = ray_config.get(ENTRY_KEY) if self.study.mode == "compare" else None
        if entry is not None:
            assert self.compare is not None
            set_dotted(values, "method", self.compare.entry_method(entry))
            for key, value in self.compare.methods[entry].overrides.items():
                set_dotted(values, key, copy.deepcopy(value))
        for key in self.search_space_of(entry):
            if key in ray_config:
                set_dotted(values, key, ray_config[key])
        # Select on validation, report on test: only ablation runs ever see the test split.
        values["final"] = self.study.mode == "ablation" and self.ablation.test_split
        return values

    def trial_config(self, ray_config: dict[str, Any]) -> Config:
        return Config.from_dict(self.trial_values(ray_config))

    def points_to_evaluate(self, entry: str | None = None) -> list[dict[str, Any]]:
        """The searched values of the configurations a search (or one comparison entry's)
        runs first, as its sampler holds them (`study.sampler.points_to_evaluate`)."""
        points = self.study.sampler.points_to_evaluate or []
        return [
            resolve_point(self, point, entry, f"study.sampler.points_to_evaluate[{i}]")
            for i, point in enumerate(points)
        ]

    def trial_configs(self, ray_config: dict[str, Any]) -> list[Config]:
        """The trial's config on each of `study.trial_seeds` (or alone, on its own seed)."""
        config = self.trial_config(ray_config)
        seeds = self.study.trial_seeds
        return [dataclasses.replace(config, seed=seed) for seed in seeds or [config.seed]]

    def trial_seeds(self, ray_config: dict[str, Any]) -> list[int]:
        """The seeds a trial trains on."""
        return self.study.trial_seeds or [self.trial_config(ray_config).seed]

    def trial_label(self, ray_config: dict[str, Any], trial_id: str) -> str:
        """`full-seed1` in an ablation, `trial-007` (the Optuna number) in a search,
        `trades.trial-007` in a comparison's searches."""
        if self.study.mode == "ablation":
            return schema.ablation_run_name(ray_config[VARIANT_KEY], ray_config[SEED_KEY])
        number = ray_config.get(OPTUNA_NUMBER_KEY)
        if not isinstance(number, int):
            return trial_id
        entry = ray_config.get(ENTRY_KEY)
        name = schema.search_run_name(number)
        return f"{entry}.{name}" if entry else name

    def teacher_overrides(self) -> dict[str, Any]:
        if self.teacher is None:
            return {}
        names = [item.name for item in dataclasses.fields(TeacherConfig)]
        return {
            name: getattr(self.teacher, name)
            for name in names
            if getattr(self.teacher, name) is not None
        }

    def teacher_training_config(self) -> Config | None:
        """The teacher's own `gacd` config; it inherits `base`'s data, seed, device and
        evaluation settings (so it is evaluated as its students are), nothing else."""
        if self.teacher is None or self.teacher.train is None:
            return None
        base = nest_dotted(self.base)
        values: dict[str, Any] = {"final": True}
        for key in ("data", "seed", "device", "eval"):
            if key in base:
                values[key] = copy.deepcopy(base[key])
        for key, value in nest_dotted(self.teacher.train).items():
            set_dotted(values, key, value)
        return Config.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class StudyError(RuntimeError):
    """A study that cannot run as asked (exists, missing, nothing to resume); one line."""


# --- loading --------------------------------------------------------------------------------


def read_study_file(
    path: str | Path,
    name: str | None = None,
    num_samples: int | None = None,
    max_concurrent: int | None = None,
    teacher_cache: Path | None = None,
    budget: str | None = None,
    compare_seeds: dict[str, list[int]] | None = None,
    sampler_seed: int | None = None,
) -> StudySpec:
    """Read, validate and resolve a study file; errors name the file and the dotted key.

    `budget` names an entry of the file's `budgets` section (default: its `study.budget`),
    or several joined by `+` (applied in turn, a later one's keys over an earlier's), whose
    dotted keys replace the file's values before anything else is read;
    `compare_seeds` (`confirm_seeds`, `seeds`: the command line's `--confirm-seeds` and
    `--final-seeds`) replace a comparison's seed lists after the budget. `sampler_seed`
    (`--sampler-seed`) replaces a search's or comparison's `study.sampler.seed` and, unless
    `name` is given, names the study `<name>_sampler<seed>`: the same study run again with
    other proposals, beside the first in the same stores.

    Relative paths in it (data folders, teacher checkpoints) are taken from the current
    directory and made absolute here, since every trial runs in a directory of its own.
    """
    raw = read_yaml_file(path)
    if not isinstance(raw, dict):
        raise ConfigFileError(str(path), f"expected a mapping of study sections, got {raw!r}")
    try:
        raw = apply_budget(raw, budget)
        for key, seeds in (compare_seeds or {}).items():
            require(
                (raw.get("study") or {}).get("mode") == "compare",
                f"compare.{key}",
                "a comparison (study.mode: compare): only a comparison has confirm and final seeds",
            )
            raw["compare"] = {**(raw.get("compare") or {}), key: list(seeds)}
        if sampler_seed is not None:
            study = raw.get("study") if isinstance(raw.get("study"), dict) else {}
            require(
                study.get("mode", "search") in ("search", "compare"),
                "study.sampler.seed",
                "a search or a comparison (an ablation proposes nothing: --sampler-seed "
                "changes nothing in it)",
            )
            set_dotted(raw, "study.sampler.seed", sampler_seed)
            if name is None and isinstance(study.get("name"), str):
                name = f"{study['name']}_sampler{sampler_seed}"
        spec = spec_from_dict(raw, name, num_samples, max_concurrent, teacher_cache)
    except ConfigError as error:
        raise ConfigFileError(str(path), str(error)) from error
    return spec


# The sections a budget may change: what to train and how long, not what is searched or
# compared (`search` and `ablation.variants` are keyed by dotted config keys themselves).
BUDGET_SECTIONS = (
    "study",
    "resources",
    "teacher",
    "base",
    "ablation.seeds",
    "compare.top",
    "compare.confirm_seeds",
    "compare.seeds",
)
# ... and one method's search trials (a larger budget may give a larger space more trials).
BUDGET_ENTRY_TRIALS = re.compile(r"compare\.methods\.([^.]+)\.num_samples")


def apply_budget(raw: dict[str, Any], budget: str | None) -> dict[str, Any]:
    """The study file with its `budgets[budget]` applied and the `budgets` section removed;
    `study.budget` records the name (None: no budget applied)."""
    raw = copy.deepcopy(raw)
    budgets = raw.pop("budgets", None) or {}
    require(
        isinstance(budgets, dict) and all(isinstance(v, dict) for v in budgets.values()),
        "budgets",
        "a mapping of budget names to mappings of dotted keys (base.optim.epochs: 30)",
        budgets,
    )
    compare = raw.get("compare")
    methods = compare.get("methods") if isinstance(compare, dict) else None
    for name, changes in budgets.items():  # every budget's keys, whichever is applied
        for key in changes:
            entry = BUDGET_ENTRY_TRIALS.fullmatch(str(key))
            require(
                entry is not None
                or any(
                    str(key) == part or str(key).startswith(part + ".") for part in BUDGET_SECTIONS
                ),
                f"budgets.{name}.{key}",
                f"a dotted key under {', '.join(BUDGET_SECTIONS)}, or "
                "compare.methods.ENTRY.num_samples",
            )
            if entry is not None:
                require(
                    isinstance(methods, dict) and entry[1] in methods,
                    f"budgets.{name}.{key}",
                    "an entry of compare.methods ("
                    + (", ".join(methods) if isinstance(methods, dict) else "this file has none")
                    + ")",
                    entry[1],
                )
    study = raw.get("study")
    if budget is None and isinstance(study, dict):
        budget = study.get("budget")
    if budget is None:
        return raw
    names = str(budget).split("+")  # `cpu+from_defaults`: each applied in turn
    for name in names:
        require(
            name in budgets,
            "budget",
            f"one of this file's budgets ({', '.join(budgets) or 'it has none'}), or several "
            "joined by '+'",
            name,
        )
    for section in ("base", "teacher"):
        if isinstance(raw.get(section), dict):
            raw[section] = nest_dotted(raw[section])
    for name in names:
        for key, value in budgets[name].items():
            set_dotted(raw, str(key), value)
    set_dotted(raw, "study.budget", budget)
    return raw


def spec_from_dict(
    raw: dict[str, Any],
    name: str | None = None,
    num_samples: int | None = None,
    max_concurrent: int | None = None,
    teacher_cache: Path | None = None,
) -> StudySpec:
    spec: StudySpec = build_dataclass(StudySpec, raw, prefix="")
    if name is not None:
        spec.study.name = name
    if num_samples is not None:
        spec.study.num_samples = num_samples
    if max_concurrent is not None:
        spec.study.max_concurrent = max_concurrent
    make_paths_absolute(spec)
    validate_sections(spec)
    validate_teacher(spec, teacher_cache)
    validate_trials(spec)
    validate_points(spec)
    return spec


def make_paths_absolute(spec: StudySpec) -> None:
    spec.base = nest_dotted(spec.base)
    configs = [spec.base]
    if spec.teacher is not None and spec.teacher.train is not None:
        spec.teacher.train = nest_dotted(spec.teacher.train)
        configs.append(spec.teacher.train)
    for values in configs:
        transfer = values.get("transfer")
        parts = [values.get("data"), values.get("teacher")]
        parts.append(transfer.get("data") if isinstance(transfer, dict) else None)
        for part, name in zip(parts, ("data_dir", "checkpoint", "data_dir"), strict=True):
            if isinstance(part, dict) and isinstance(part.get(name), str):
                part[name] = absolute(part[name])
    if spec.teacher is not None and spec.teacher.checkpoint is not None:
        spec.teacher.checkpoint = absolute(spec.teacher.checkpoint)


def absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def validate_sections(spec: StudySpec) -> None:
    study = spec.study
    require(study.name is not None, "study.name", "a name for the study (or --name)")
    require(
        bool(NAME_PATTERN.match(study.name or "")),
        "study.name",
        "letters, digits, '_', '-' and '.', starting with a letter or digit",
        study.name,
    )
    require(study.num_samples >= 1, "study.num_samples", "an integer >= 1", study.num_samples)
    if study.max_concurrent is not None:
        require(
            study.max_concurrent >= 1,
            "study.max_concurrent",
            "an integer >= 1",
            study.max_concurrent,
        )
    require(study.max_failures >= 0, "study.max_failures", "an integer >= 0", study.max_failures)
    scheduler = study.scheduler
    require(
        scheduler.grace_period >= 1,
        "study.scheduler.grace_period",
        "an integer >= 1 (epochs)",
        scheduler.grace_period,
    )
    require(
        scheduler.reduction_factor > 1,
        "study.scheduler.reduction_factor",
        "a number > 1",
        scheduler.reduction_factor,
    )
    require(
        study.sampler.n_startup_trials >= 0,
        "study.sampler.n_startup_trials",
        "an integer >= 0",
        study.sampler.n_startup_trials,
    )
    resources = spec.resources
    require(
        resources.cpus_per_trial > 0,
        "resources.cpus_per_trial",
        "a number > 0",
        resources.cpus_per_trial,
    )
    gpus = resources.gpus_per_trial
    require(
        gpus >= 0 and (gpus <= 1 or float(gpus).is_integer()),
        "resources.gpus_per_trial",
        "a number >= 0: a share of one GPU (0.25 packs four trials on a card) or whole GPUs",
        gpus,
    )
    for name, unset in (
        ("teacher_workers", "every GPU, or every CPU of the trials"),
        ("workers_per_trial", "one per GPU of the trial"),
    ):
        count = getattr(resources, name)
        require(
            count is None
            or (isinstance(count, int) and not isinstance(count, bool) and count >= 1),
            f"resources.{name}",
            f"an integer >= 1 (or null: {unset})",
            count,
        )
    workers = resources.workers_per_trial
    if workers is not None and gpus > 0:
        require(
            float(gpus).is_integer() and workers <= gpus,
            "resources.workers_per_trial",
            f"at most one worker per whole GPU of the trial ({gpus:g})",
            workers,
        )
    if study.trial_seeds is not None:
        validate_trial_seeds(spec)
    validate_mode(spec)
    validate_metric(spec)


def validate_trial_seeds(spec: StudySpec) -> None:
    seeds = spec.study.trial_seeds  # a list of integers: `build_dataclass` checked its type
    validate_seeds(seeds, "study.trial_seeds")
    require(
        spec.searches,
        "study.trial_seeds",
        "no trial seeds in an ablation (its runs are one seed each: ablation.seeds)",
        seeds,
    )
    require(
        "seed" not in nest_dotted(spec.base),
        "base.seed",
        "no seed beside study.trial_seeds (a trial's seeds are the trial seeds)",
        nest_dotted(spec.base).get("seed"),
    )


def validate_points(spec: StudySpec) -> None:
    """`study.sampler.points_to_evaluate`: only in a search, no more than its trials, each
    inside the search space (or each comparison entry's)."""
    points = spec.study.sampler.points_to_evaluate
    if not points:
        return
    key = "study.sampler.points_to_evaluate"
    require(spec.searches, key, "none in an ablation (its runs are its variants)", points)
    entries = list(spec.compare.methods) if spec.compare is not None else [None]
    fewest = min(spec.trials_of(entry) for entry in entries)
    require(
        len(points) <= fewest,
        key,
        f"at most study.num_samples ({spec.study.num_samples}) points"
        if fewest == spec.study.num_samples
        else f"at most as many points as the fewest trials a method's search has ({fewest})",
        len(points),
    )
    for entry in entries:
        spec.points_to_evaluate(entry)


def resolve_point(spec: StudySpec, point: Any, entry: str | None, where: str) -> dict[str, Any]:
    """One point to evaluate as the sampler's values of its keys: `defaults` (the base
    configuration's value of every searched key) or a mapping of searched keys to values,
    each of which must lie inside its distribution."""
    space = spec.search_space_of(entry)
    first = {ENTRY_KEY: entry} if entry is not None else {}
    section = f"compare.methods.{entry}.search" if entry is not None else "search"
    if point == DEFAULTS_POINT:
        base = check_trial(spec, first, "base")
        wanted = {key: dotted_value(base, key) for key in space}
        labels = {key: f"{where} (defaults): the base value of {key}" for key in space}
    else:
        require(
            entry is None,
            where,
            f"'{DEFAULTS_POINT}' (in a comparison each method starts from its own base "
            "configuration)",
            point,
        )
        require(
            isinstance(point, dict) and bool(point),
            where,
            f"'{DEFAULTS_POINT}' or a mapping of searched keys to values",
            point,
        )
        labels = {key: f"{where}.{key}" for key in point}
        wanted = {}
        for key, value in point.items():
            require(key in space, labels[key], f"one of the searched keys ({', '.join(space)})")
            wanted[key] = dotted_value(check_trial(spec, {**first, key: value}, where), key)
    params = {}
    for key, value in wanted.items():
        found, param = param_for(spec, first, key, space[key], value, section)
        require(
            found,
            labels[key],
            f"a value inside {section}.{key} ({describe_distribution(space[key])})",
            value,
        )
        params[key] = param
    return params


def param_for(
    spec: StudySpec,
    first: dict[str, Any],
    key: str,
    distribution: DistributionSpec,
    value: Any,
    section: str,
) -> tuple[bool, Any]:
    """(found, the value of `distribution` that sets config key `key` to `value`). A choice's
    values are compared by the config they make (`'8/255'` sets 0.0314...)."""
    if distribution.distribution == "choice":
        for choice in distribution_values(key, distribution, section):
            if dotted_value(spec.trial_config({**first, key: choice}), key) == value:
                return True, choice
        return False, None
    low, high = distribution.low, distribution.high
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        return False, None
    if distribution.distribution == "int":
        step = distribution.step or 1
        inside = float(value).is_integer() and (int(value) - int(low)) % step == 0
        return inside, int(value) if inside else None
    return True, float(value)


def describe_distribution(distribution: DistributionSpec) -> str:
    if distribution.distribution == "choice":
        return f"one of {distribution.values}"
    words = f"{distribution.distribution} {distribution.low:g} to {distribution.high:g}"
    return words + (f" in steps of {distribution.step}" if distribution.step else "")


def dotted_value(config: Config, key: str) -> Any:
    """The value of a dotted key (`gacd.tau`) in a built config."""
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def validate_mode(spec: StudySpec) -> None:
    mode = spec.study.mode
    if mode != "compare":
        require(spec.compare is None, "compare", f"no compare section in a {mode} (mode: {mode})")
    if mode == "compare":
        validate_compare(spec)
        return
    if spec.study.mode == "search":
        require(
            bool(spec.search),
            "search",
            "at least one dotted config key with a distribution (mode: search)",
        )
        require(spec.ablation is None, "ablation", "no ablation section in a search (mode: search)")
        return
    require(spec.ablation is not None, "ablation", "an ablation section (mode: ablation)")
    require(not spec.search, "search", "no search section in an ablation (mode: ablation)")
    require(
        spec.scheduler == "none",
        "study.scheduler.name",
        "none in an ablation (every variant runs its full budget)",
        spec.scheduler,
    )
    ablation = spec.ablation
    assert ablation is not None
    require(
        bool(NAME_PATTERN.match(ablation.reference_name)),
        "ablation.reference_name",
        "a name of letters, digits, '_', '-' and '.'",
        ablation.reference_name,
    )
    reference = ablation.reference_name
    require(
        reference not in ablation.variants,
        f"ablation.variants.{reference}",
        f"another name ('{reference}' is the reference itself)",
    )
    validate_seeds(ablation.seeds, "ablation.seeds")
    for variant in ablation.variants:
        require(
            bool(NAME_PATTERN.match(variant)),
            f"ablation.variants.{variant}",
            "a name of letters, digits, '_', '-' and '.'",
            variant,
        )
    if ablation.from_study is not None:
        require(
            bool(NAME_PATTERN.match(ablation.from_study)),
            "ablation.from_study",
            "the name of a finished search study",
            ablation.from_study,
        )


def validate_seeds(seeds: list[int], key: str) -> None:
    require(bool(seeds), key, "a non-empty list of integer seeds", seeds)
    require(len(set(seeds)) == len(seeds), key, "distinct seeds", seeds)


def validate_compare(spec: StudySpec) -> None:
    compare = spec.compare
    require(compare is not None, "compare", "a compare section (mode: compare)")
    assert compare is not None
    require(not spec.search, "search", "no search section in a comparison (each method has one)")
    require(spec.ablation is None, "ablation", "no ablation section in a comparison")
    require(
        bool(compare.methods),
        "compare.methods",
        "a mapping of method entries (gacd: {search: ...}, trades: {search: ...})",
    )
    for entry, settings in compare.methods.items():
        where = f"compare.methods.{entry}"
        require(
            bool(NAME_PATTERN.match(entry)) and "." not in entry,
            where,
            "a name of letters, digits, '_' and '-'",
            entry,
        )
        method = compare.entry_method(entry)
        require(
            method in METHODS.names(),
            f"{where}.method" if settings.method else where,
            f"one of the methods {', '.join(METHODS.names())} (or method: NAME)",
            method,
        )
        require(
            bool(settings.search),
            f"{where}.search",
            "at least one dotted config key with a distribution (what this method tunes)",
        )
        require(
            "method" not in settings.overrides and "seed" not in settings.overrides,
            f"{where}.overrides",
            "no method or seed (the entry's method is `method`; seeds are the comparison's)",
        )
        require(
            settings.num_samples is None or settings.num_samples >= 1,
            f"{where}.num_samples",
            "an integer >= 1 (this method's trials; left out: study.num_samples)",
            settings.num_samples,
        )
    require(
        compare.reference in compare.methods,
        "compare.reference",
        f"one of the entries of compare.methods ({', '.join(compare.methods)})",
        compare.reference,
    )
    require(compare.top >= 1, "compare.top", "an integer >= 1", compare.top)
    validate_seeds(compare.confirm_seeds, "compare.confirm_seeds")
    validate_seeds(compare.seeds, "compare.seeds")


SEARCH_METRICS = (schema.VAL_CLEAN_ACC, schema.VAL_PGD_ACC, schema.TRAIN_LOSS_PREFIX)


def validate_metric(spec: StudySpec) -> None:
    metric = spec.study.metric
    if spec.searches or not spec.ablation.test_split:
        # Searches select on validation only; the test split is for final runs.
        require(
            metric in SEARCH_METRICS, "study.metric", f"one of {', '.join(SEARCH_METRICS)}", metric
        )
        return
    tested = [schema.accuracy("test", name) for name in schema.ATTACKS]
    moved = [schema.accuracy("transfer", name) for name in schema.ATTACKS]
    moved += [schema.best(name) for name in moved]
    transfers = (spec.base.get("transfer") or {}).get("data") is not None
    if metric in moved:
        # An ablation of what transfers ranks its variants by the probe's accuracy.
        require(transfers, "study.metric", f"base.transfer.data set, for {metric}", metric)
        return
    known = SEARCH_METRICS + tuple(tested) + tuple(schema.best(name) for name in tested)
    if transfers:
        known += tuple(moved)
    require(metric in known, "study.metric", f"one of {', '.join(known)}", metric)


def validate_teacher(spec: StudySpec, teacher_cache: Path | None) -> None:
    teacher = spec.teacher
    if teacher is None:
        return
    if teacher.train is None:
        require(
            teacher.checkpoint is not None,
            "teacher",
            "either checkpoint: PATH or train: a gacd config of the teacher",
        )
        return
    try:
        config = spec.teacher_training_config()
    except ConfigError as error:
        raise error.under(teacher_key_owner(spec, error.key)) from error
    assert config is not None
    require(
        not METHODS.get(config.method).uses_teacher,
        "teacher.train.method",
        "a method that needs no teacher (pgd_at, trades, natural)",
        config.method,
    )
    # Trials point at the cached checkpoint; it is trained (once) before they start.
    cache = teacher_cache or Path("ray_results/teachers").resolve()
    path = str(teacher_checkpoint_path(cache, config))
    require(
        teacher.checkpoint in (None, path),
        "teacher.checkpoint",
        "no checkpoint beside teacher.train (the trained teacher is the checkpoint)",
        teacher.checkpoint,
    )
    teacher.checkpoint = path


def teacher_key_owner(spec: StudySpec, key: str) -> str:
    """Where the user wrote the key a teacher config refused: `teacher.train`, or `base` for
    what the teacher inherits from it (data, seed, device, eval) and does not set itself."""
    assert spec.teacher is not None and spec.teacher.train is not None
    written = flatten(nest_dotted(spec.teacher.train))
    dotted = key.split("[")[0]
    if any(name == dotted or dotted.startswith(name + ".") for name in written):
        return "teacher.train"
    inherited = ("data", "seed", "device", "eval")
    return "base" if dotted.split(".")[0] in inherited else "teacher.train"


def teacher_checkpoint_path(cache: Path, config: Config) -> Path:
    """Cached by what determines the teacher's weights: not how it is evaluated afterwards."""
    return cache / config_hash(config, ignore=("eval", "final")) / "checkpoint.pt"


def config_hash(config: Config, ignore: tuple[str, ...] = ()) -> str:
    """A short hash of what determines a run's result: not where its data lie, nor its device
    and the speed switches that only change how it is computed, nor the dotted keys in
    `ignore`."""
    values = flatten(config.to_dict())
    for key in ("device", "memory_format", "compile", "data.data_dir", *ignore):
        for name in [name for name in values if name == key or name.startswith(key + ".")]:
            values.pop(name)
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# --- every trial's config is valid --------------------------------------------------------


def validate_trials(spec: StudySpec) -> None:
    """Build the config of every variant and of each end of every searched range."""
    if spec.study.mode == "search":
        validate_search(spec, None, "search", {})
        return
    if spec.study.mode == "compare":
        assert spec.compare is not None
        for entry in spec.compare.methods:
            validate_search(spec, entry, f"compare.methods.{entry}.search", {ENTRY_KEY: entry})
        return
    assert spec.ablation is not None
    seed = spec.ablation.seeds[0]
    check_trial(spec, {VARIANT_KEY: spec.reference, SEED_KEY: seed}, "ablation.reference")
    for variant in spec.ablation.variants:
        check_trial(spec, {VARIANT_KEY: variant, SEED_KEY: seed}, f"ablation.variants.{variant}")


def validate_search(spec: StudySpec, entry: str | None, where: str, first: dict[str, Any]) -> None:
    """A search's (or one comparison entry's) base config and each end of its ranges."""
    space = spec.search_space_of(entry)
    pin_evaluation_budget(spec, space, first)
    owner = where.removesuffix(".search") if entry else "base"
    base = check_trial(spec, first, owner)
    for key, distribution in space.items():
        for value in distribution_values(key, distribution, where):
            check_trial(spec, {**first, key: value}, f"{where}.{key}")
    check_scheduler_budget(spec, space, first, where)
    # A searched value nothing reads is a search that cannot find anything.
    if base.method == "gacd" and "negatives.source" not in space:
        for key in ("negatives.count", "negatives.momentum", "negatives.class_aware"):
            require(
                key not in space or base.negatives.source == "memory_bank",
                f"{where}.{key}",
                "negatives.source: memory_bank in base (in-batch negatives are the "
                "batch's other samples; only a memory bank reads this)",
                base.negatives.source,
            )


def check_trial(spec: StudySpec, ray_config: dict[str, Any], where: str) -> Config:
    try:
        return spec.trial_config(ray_config)
    except ConfigError as error:
        if ".search." in where or where.startswith("search."):
            raise ConfigError(
                where, f"values valid for config key '{error.key}' ({error.expected})", error.got
            ) from error
        raise error.under(where) from error


def pin_evaluation_budget(
    spec: StudySpec, space: dict[str, DistributionSpec], first: dict[str, Any]
) -> None:
    """Searching the training epsilon must not move the budget trials are compared at (in a
    comparison, every method is evaluated at the same one)."""
    base = nest_dotted(spec.base)
    if "attack.epsilon" in space and base.get("eval", {}).get("epsilon") is None:
        epsilon = check_trial(spec, first, "base").attack.epsilon
        set_dotted(spec.base, "eval.epsilon", epsilon)


def check_scheduler_budget(
    spec: StudySpec, space: dict[str, DistributionSpec], first: dict[str, Any], where: str
) -> None:
    if spec.scheduler != "asha":
        return
    require(
        "optim.epochs" not in space,
        f"{where}.optim.epochs",
        "not searched under ASHA (it schedules on epochs); use scheduler name: none",
    )
    epochs = check_trial(spec, first, "base").optim.epochs
    require(
        spec.study.scheduler.grace_period <= epochs,
        "study.scheduler.grace_period",
        f"at most base.optim.epochs ({epochs})",
        spec.study.scheduler.grace_period,
    )


def distribution_values(key: str, spec: DistributionSpec, section: str = "search") -> list[Any]:
    """The values a distribution can take at its ends (and every choice); validates it."""
    where = f"{section}.{key}"
    kind = spec.distribution
    require(kind is not None, f"{where}.distribution", "one of uniform, loguniform, int, choice")
    if kind == "choice":
        require(
            spec.values is not None and len(spec.values) > 0,
            f"{where}.values",
            "a non-empty list of choices",
            spec.values,
        )
        for name in ("low", "high", "step"):
            require(getattr(spec, name) is None, f"{where}.{name}", "nothing for a choice")
        for i, value in enumerate(spec.values or []):
            require(
                value is None or isinstance(value, bool | int | float | str),
                f"{where}.values[{i}]",
                "a number, string, boolean or null",
                value,
            )
        return list(spec.values or [])
    require(spec.values is None, f"{where}.values", f"nothing for {kind} (use low and high)")
    require(spec.low is not None, f"{where}.low", f"a number ({kind})")
    require(spec.high is not None, f"{where}.high", f"a number ({kind})")
    low, high = spec.low, spec.high
    require(low < high, f"{where}.low", f"less than high ({high})", low)
    if kind == "loguniform":
        require(low > 0, f"{where}.low", "a number > 0 (loguniform)", low)
    if kind == "int":
        for name, value in (("low", low), ("high", high)):
            require(float(value).is_integer(), f"{where}.{name}", "an integer (int)", value)
        if spec.step is not None:
            require(spec.step >= 1, f"{where}.step", "an integer >= 1", spec.step)
        return [int(low), int(high)]
    require(spec.step is None, f"{where}.step", f"nothing for {kind}")
    return [low, high]
