"""Every name that crosses a boundary between the method, the study and the analysis: metric
names and their families, MLflow tag names and values, run names, the ablation's reference
variant and the file a study saves. Import them from here; never retype them.

Metrics are `split/name` (`val/pgd_acc`, `test/autoattack_acc`, `train/loss/contrastive`); a
metric of a family not listed in `FAMILIES` is refused where it is produced
(`check_metric_names`), so it can never be dropped silently on its way to MLflow.
"""

from __future__ import annotations

from collections.abc import Iterable

# --- metrics ----------------------------------------------------------------------------------


EPOCH = "epoch"
LR = "lr"
EPOCH_SECONDS = "time/epoch_s"
TRAIN_LOSS_PREFIX = "train/loss"  # train/loss, train/loss/ce, train/loss/contrastive, ...

ATTACKS = ("clean", "fgsm", "pgd", "cw", "autoattack")


def accuracy(split: str, attack: str) -> str:
    """`val/pgd_acc`, `test/autoattack_acc`, ..."""
    return f"{split}/{attack}_acc"


def train_loss(term: str) -> str:
    return TRAIN_LOSS_PREFIX if term == "loss" else f"{TRAIN_LOSS_PREFIX}/{term}"


VAL_PREFIX = "val/"
VAL_CLEAN_ACC = accuracy("val", "clean")
VAL_PGD_ACC = accuracy("val", "pgd")
# How many validation images each epoch's accuracies were measured on (their standard error).
VAL_SAMPLES = "val/samples"

# Final runs report their test split twice: for the last epoch (`test/...`, `transfer/...`) and
# for the epoch with the best `SELECTION` on validation (`test_best/...`, `transfer_best/...`,
# and that epoch as `test_best/epoch`). Robust overfitting (Rice et al. 2020) makes the last
# epoch of adversarial training a poor choice; the best is never chosen on test.
SELECTION = VAL_PGD_ACC
BEST = "_best"


def best(name: str) -> str:
    """`test/pgd_acc` -> `test_best/pgd_acc`, `transfer/cw_acc` -> `transfer_best/cw_acc`."""
    split, _, rest = name.partition("/")
    return f"{split}{BEST}/{rest}"


BEST_EPOCH = best("test/epoch")


def structure(split: str, name: str) -> str:
    """`test/cka_clean`, `test/cka_adversarial`, `test/class_corr_diff`."""
    return f"{split}/{name}"


CKA_CLEAN = "cka_clean"
CKA_ADVERSARIAL = "cka_adversarial"
CLASS_CORR_DIFF = "class_corr_diff"
TEST_CKA_CLEAN = structure("test", CKA_CLEAN)
TEST_CKA_ADVERSARIAL = structure("test", CKA_ADVERSARIAL)
TEST_CLASS_CORR_DIFF = structure("test", CLASS_CORR_DIFF)

# Transfer across tasks: the frozen student with a linear probe, on the target's test split.
TRANSFER = "transfer"
TRANSFER_CLEAN_ACC = accuracy(TRANSFER, "clean")
TRANSFER_PGD_ACC = accuracy(TRANSFER, "pgd")

# A trial over several training seeds (`study.trial_seeds`) reports each metric's mean over
# them, and each seed's own validation metrics as `seeds/SEED/val/pgd_acc`.
SEEDS = "seeds"


def per_seed(seed: int, name: str) -> str:
    """`seeds/1/val/pgd_acc`: one training seed's `name` in a trial over several."""
    return f"{SEEDS}/{seed}/{name}"


# Every family a metric may belong to (the part before the first `/`), and the names without one.
SPLITS = ("train", "val", "test", "transfer", "time")
# The study's parent run: its result (`study/best_value`) and its trials by how they ended.
STUDY = "study"
STUDY_BEST_VALUE = f"{STUDY}/best_value"
FAMILIES = SPLITS + tuple(split + BEST for split in ("test", "transfer")) + (STUDY, SEEDS)


def trials_metric(state: str) -> str:
    """`study/trials_complete`, `study/trials_stopped_early`, `study/trials_failed`."""
    return f"{STUDY}/trials_{state.replace(' ', '_')}"


UNPREFIXED = (EPOCH, LR)


class UnknownMetricError(ValueError):
    """A metric whose family `gacd.schema` does not know; the message names it."""


def is_metric(name: str) -> bool:
    """Whether `name` is one of this project's metrics (not a key of Ray's bookkeeping)."""
    return name in UNPREFIXED or ("/" in name and name.split("/")[0] in FAMILIES)


def check_metric_names(names: Iterable[str]) -> None:
    """Refuse a metric of an unknown family where it is produced (a report, a history)."""
    unknown = sorted(name for name in names if not is_metric(name))
    if unknown:
        raise UnknownMetricError(
            f"metrics {unknown}: not of a known family ({', '.join(FAMILIES)}) nor one of "
            f"{', '.join(UNPREFIXED)}; add the family to gacd/schema.py"
        )


# --- MLflow tags ------------------------------------------------------------------------------

# Tags every analysis reads; `mlflow.*` ones are MLflow's own (the UI shows them).
TAG_ROLE = "role"  # one of the ROLE_* values
ROLE_STUDY, ROLE_TRIAL, ROLE_TEACHER = "study", "trial", "teacher"
ROLE_COMPARISON = "comparison"  # a comparison's run: its stages' study runs are nested under it
TAG_STUDY = "study"
TAG_MODE = "mode"  # search | ablation
TAG_BUDGET = "budget"  # the study file's budget applied (`--budget`), when one was
TAG_METRIC = "metric"
TAG_DIRECTION = "direction"  # max | min
TAG_VARIANT = "variant"
TAG_REFERENCE = "reference"  # on an ablation's run: the variant the others are compared with
TAG_ENTRY = "compare_entry"  # a comparison's search trial: its method entry
TAG_VARIANTS = "variants"  # on the study's run: the ablation's variants in file order (JSON)
TAG_SEED = "seed"  # a trial over several training seeds: them all, "0,1,2" (`seed_tag`)
TAG_RAY_TRIAL = "ray_trial_id"
TAG_OPTUNA_TRIAL = "optuna_trial_number"
# "true" on a search's trial of `study.sampler.points_to_evaluate` (run first, its full budget).
TAG_POINT_TO_EVALUATE = "point_to_evaluate"
TAG_CONFIG_HASH = "config_hash"
# A comparison's seed lists (`compare.<key>`), which a resume may grow, and the stage each seeds
# (its command-line flag: `--confirm-seeds`, `--final-seeds`).
COMPARE_SEED_LISTS = {"confirm_seeds": "confirm", "seeds": "final"}
TAG_OVERRIDES = "overrides"  # JSON: the variant's overrides, or the searched values
TAG_FULL_BUDGET = "full_budget"  # "true" | "false"
TAG_FAILURE = "failure"
# How a trial ended, as the runs table shows it (MLflow has no status for "stopped early").
TAG_STATE = "state"
STATE_COMPLETE, STATE_STOPPED, STATE_FAILED = "complete", "stopped early", "failed"
TAG_AUTOATTACK = "autoattack"  # final runs: the version AutoAttack ran (targets it aimed at)
TAG_TEACHER_RUN = "teacher_run_id"
TAG_BEST = "best"  # on the study's run: the trial or variant holding `study/best_value`
TAG_TEACHER_CHECKPOINT = "teacher_checkpoint"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
# What MLflow's UI shows as a run's Source and User.
TAG_SOURCE_NAME = "mlflow.source.name"
TAG_SOURCE_TYPE = "mlflow.source.type"
TAG_USER = "mlflow.user"
TAG_PARENT = "mlflow.parentRunId"


def seed_tag(seeds: list[int]) -> str:
    """The seed tag (and `seed` parameter) of a run trained on `seeds`: "3", or "0,1,2"."""
    return ",".join(str(seed) for seed in seeds)


def seeds_in_tag(tag: object) -> int:
    """How many training seeds a run's seed tag names (1 where it has none)."""
    return len(str(tag).split(",")) if isinstance(tag, str) and tag else 1


def flag(value: bool) -> str:
    """A boolean as a tag holds it."""
    return str(value).lower()


# The columns of a table of runs (`mlflow.search_runs`' naming): one per tag, param, metric.
TAG_PREFIX, PARAM_PREFIX, METRIC_PREFIX = "tags.", "params.", "metrics."


def tag_column(tag: str) -> str:
    return TAG_PREFIX + tag


def param_column(name: str) -> str:
    return PARAM_PREFIX + name


def metric_column(name: str) -> str:
    return METRIC_PREFIX + name


def metric_columns(columns: Iterable[str]) -> list[str]:
    """The metric names among a table's columns, in their order."""
    return [c.removeprefix(METRIC_PREFIX) for c in columns if c.startswith(METRIC_PREFIX)]


# --- runs and studies -------------------------------------------------------------------------

# The ablation variant every other variant is compared with, and a search trial's variant.
REFERENCE = "full"
SEARCH_VARIANT = "search"
# What a study saves in its Ray folder: the study file as it started and as resolved.
SPEC_FILE = "gacd_study.json"
# What a study's MLflow run holds: the resolved study (`StudySpec.to_dict()`).
STUDY_ARTIFACT = "study.json"


def search_run_name(optuna_number: int) -> str:
    """`trial-007`: a search trial's run, by its Optuna number."""
    return f"trial-{optuna_number:03d}"


def ablation_run_name(variant: str, seed: int) -> str:
    """`full-seed1`: an ablation trial's run."""
    return f"{variant}-seed{seed}"
