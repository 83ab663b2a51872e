"""Which searched hyperparameters matter: Optuna's importance over full-budget trials, with
subsampling intervals, by PED-ANOVA (Optuna 5's default) and fANOVA. The two can disagree
(REFERENCE.md, pitfall 12), so every table names its evaluator and its interval.

Only COMPLETE trials count: a study's trials that ASHA stopped early are PRUNED in Optuna
(`study.search.StudySearch`), so these are exactly the trials that ran their full budget.

The intervals are symmetric subsampling intervals (Politis & Romano 1994; Politis, Romano &
Wolf 1999, "Subsampling"): the importance is recomputed on subsets of m = n/2 of the n trials,
drawn WITHOUT replacement, and the 95% quantile c of |theta_m - theta_n| gives
[theta_n - s c, theta_n + s c], clipped to [0, 1], with s = sqrt(m / (n - m)). Subsampling's
usual s = sqrt(m / n) assumes m/n -> 0; at m = n/2 a subset shares half its trials with the full
set, so theta_m - theta_n understates theta_m's spread by sqrt(1 - m/n), and s restores it
(for a mean exactly; it is the delete-d jackknife's scaling, Shao & Wu 1989).

Why not the bootstrap: resampling WITH replacement duplicates trials, and these estimators
(fANOVA's random forest especially) treat a duplicated trial as stronger evidence, so the
bootstrap distribution is shifted and its percentiles could exclude the estimate itself
(fANOVA 0.083 with [0.094, 0.371] in a real report). Why symmetric: an equal-tailed interval
inherits any shift between theta_m and theta_n and, on 10 trials of 2x + y, excluded the
estimate for half of the fANOVA importances tried; the symmetric one contains it by
construction.

What no interval here sees: on a few dozen trials fANOVA's forest leans toward the dominant
parameter (on 2x + y + noise with 35 trials it gives x 0.89 +- 0.04 over data sets, the true
share being 0.8), and subsets of the same trials lean the same way. The intervals describe how
much the estimate moves with the trials, not that bias.
"""

from __future__ import annotations

import argparse
import math
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

from analysis.plots import plot_importance
from analysis.runs import StudyNotFoundError, require_store

EVALUATORS = {
    "ped_anova": lambda seed: optuna.importance.PedAnovaImportanceEvaluator(),
    "fanova": lambda seed: optuna.importance.FanovaImportanceEvaluator(seed=seed),
}
MIN_TRIALS = 4
LEVEL = 0.95


def complete_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def importances(
    trials: list[optuna.trial.FrozenTrial], direction: optuna.study.StudyDirection, evaluator
) -> dict[str, float]:
    """Normalised importances of the trials' parameters, computed on a study of those trials."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in memory"
    try:
        study = optuna.create_study(direction=direction)
    finally:
        optuna.logging.set_verbosity(verbosity)
    study.add_trials(trials)
    return optuna.importance.get_param_importances(study, evaluator=evaluator)


def varies(trials: list[optuna.trial.FrozenTrial]) -> bool:
    return len({trial.value for trial in trials}) > 1


def subset_size(n: int) -> int:
    """m = n/2 (rounded down), at least MIN_TRIALS, but at most n - 1: a subset of all n trials
    would be the full set again and say nothing about variability."""
    return min(max(n // 2, MIN_TRIALS), n - 1)


def subsets(n: int, m: int, resamples: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """`resamples` subsets of m of range(n), each drawn without replacement; all of them, once
    each, when there are no more than `resamples`."""
    if math.comb(n, m) <= resamples:
        return list(combinations(range(n), m))
    return [tuple(rng.choice(n, size=m, replace=False)) for _ in range(resamples)]


def interval_name(n: int) -> str:
    return f"{LEVEL:.0%} symmetric subsampling, m={subset_size(n)} of {n}"


def subsampling_interval(estimate: float, drawn: list[float], n: int) -> tuple[float, float]:
    """The symmetric subsampling interval around `estimate` from the subsets' estimates `drawn`
    (module docstring); (nan, nan) without any."""
    if not drawn:
        return float("nan"), float("nan")
    m = subset_size(n)
    half = math.sqrt(m / (n - m)) * float(np.quantile(np.abs(np.subtract(drawn, estimate)), LEVEL))
    return max(0.0, estimate - half), min(1.0, estimate + half)


def importance_table(
    study: optuna.Study,
    evaluators: tuple[str, ...] = ("ped_anova", "fanova"),
    resamples: int = 100,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per (evaluator, parameter): importance on all full-budget trials and its
    symmetric subsampling interval from `resamples` subsets of half the trials drawn without
    replacement (module docstring), named in the column `interval`; `subsets` counts those
    used (a subset whose trials all scored the same explains nothing and is skipped)."""
    trials = complete_trials(study)
    if len(trials) < MIN_TRIALS:
        raise ValueError(
            f"study {study.study_name!r} has {len(trials)} full-budget trials; importance "
            f"needs at least {MIN_TRIALS}"
        )
    if not varies(trials):
        raise ValueError(
            f"study {study.study_name!r}: all {len(trials)} full-budget trials scored "
            f"{trials[0].value}; importance is undefined without differences to explain"
        )
    n = len(trials)
    drawn_subsets = subsets(n, subset_size(n), resamples, np.random.default_rng(seed))
    rows = []
    for name in evaluators:
        point = importances(trials, study.direction, EVALUATORS[name](seed))
        samples: dict[str, list[float]] = {param: [] for param in point}
        for subset in drawn_subsets:
            chosen = [trials[i] for i in subset]
            if not varies(chosen):  # a subset of equal scores explains nothing: skipped
                continue
            for param, value in importances(
                chosen, study.direction, EVALUATORS[name](seed)
            ).items():
                samples[param].append(value)
        for param, value in point.items():
            low, high = subsampling_interval(value, samples[param], n)
            rows.append(
                {
                    "evaluator": name,
                    "param": param,
                    "importance": value,
                    "ci_low": low,
                    "ci_high": high,
                    "interval": interval_name(n),
                    "subsets": len(samples[param]),
                    "trials": n,
                }
            )
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.importance",
        description="Parameter importance of a search (PED-ANOVA and fANOVA) over its "
        "full-budget trials, with 95% symmetric subsampling intervals (subsets of half the "
        "trials, drawn without replacement).",
    )
    parser.add_argument("--study", required=True, help="the search's name")
    parser.add_argument(
        "--optuna-storage", help="Optuna's database (default: sqlite:///$PWD/optuna.db)"
    )
    parser.add_argument(
        "--evaluator",
        nargs="+",
        choices=sorted(EVALUATORS),
        default=["ped_anova", "fanova"],
        help="Optuna's importance evaluators to run (default: %(default)s)",
    )
    parser.add_argument(
        "--resamples",
        type=int,
        default=100,
        help="subsets of half the trials for the intervals (all of them if there are fewer) "
        "(default: %(default)s)",
    )
    parser.add_argument("--out", help="folder for importance.csv and importance.png")
    args = parser.parse_args(argv)
    storage = args.optuna_storage or f"sqlite:///{Path('optuna.db').resolve()}"
    try:
        require_store(storage, "Optuna storage")
        study = optuna.load_study(study_name=args.study, storage=storage)
        table = importance_table(study, tuple(args.evaluator), args.resamples)
    except StudyNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (KeyError, ValueError) as error:
        print(f"error: {str(error).strip(chr(34))} ({storage})", file=sys.stderr)
        return 2
    print(table.to_markdown(index=False, floatfmt=".3f"))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "importance.csv", index=False)
        plot_importance(table, out / "importance.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
