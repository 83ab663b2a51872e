"""Which searched hyperparameters matter: Optuna's importance over full-budget trials, with
bootstrap intervals, by PED-ANOVA (Optuna 5's default) and fANOVA. The two can disagree
(REFERENCE.md, pitfall 12), so every table names its evaluator.

Only COMPLETE trials count: a study's trials that ASHA stopped early are PRUNED in Optuna
(`study.search.StudySearch`), so these are exactly the trials that ran their full budget.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

EVALUATORS = {
    "ped_anova": lambda seed: optuna.importance.PedAnovaImportanceEvaluator(),
    "fanova": lambda seed: optuna.importance.FanovaImportanceEvaluator(seed=seed),
}
MIN_TRIALS = 4


def complete_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def importances(
    trials: list[optuna.trial.FrozenTrial], direction: optuna.study.StudyDirection, evaluator
) -> dict[str, float]:
    """Normalised importances of the trials' parameters, computed on a study of those trials."""
    study = optuna.create_study(direction=direction)
    study.add_trials(trials)
    return optuna.importance.get_param_importances(study, evaluator=evaluator)


def varies(trials: list[optuna.trial.FrozenTrial]) -> bool:
    return len({trial.value for trial in trials}) > 1


def importance_table(
    study: optuna.Study,
    evaluators: tuple[str, ...] = ("ped_anova", "fanova"),
    bootstrap: int = 100,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per (evaluator, parameter): importance on all full-budget trials and the
    2.5/97.5 percentiles of its bootstrap distribution (trials resampled with replacement)."""
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
    rng = np.random.default_rng(seed)
    rows = []
    for name in evaluators:
        point = importances(trials, study.direction, EVALUATORS[name](seed))
        samples: dict[str, list[float]] = {param: [] for param in point}
        for _ in range(bootstrap):
            resampled = [trials[i] for i in rng.integers(0, len(trials), len(trials))]
            if not varies(resampled):  # a resample of equal scores explains nothing: skipped
                continue
            for param, value in importances(
                resampled, study.direction, EVALUATORS[name](seed)
            ).items():
                samples[param].append(value)
        for param, value in point.items():
            drawn = samples[param] or [np.nan]
            rows.append(
                {
                    "evaluator": name,
                    "param": param,
                    "importance": value,
                    "ci_low": float(np.nanpercentile(drawn, 2.5)),
                    "ci_high": float(np.nanpercentile(drawn, 97.5)),
                    "trials": len(trials),
                }
            )
    return pd.DataFrame(rows)


def plot_importance(table: pd.DataFrame, path: Path) -> Path:
    """Horizontal bars per evaluator with their bootstrap intervals."""
    from analysis.plots import figure, save

    evaluators = list(dict.fromkeys(table["evaluator"]))
    fig, axes = figure(len(evaluators))
    for axis, name in zip(axes, evaluators, strict=True):
        part = table[table["evaluator"] == name].sort_values("importance")
        errors = [part["importance"] - part["ci_low"], part["ci_high"] - part["importance"]]
        axis.barh(part["param"], part["importance"], xerr=np.clip(errors, 0, None), capsize=3)
        axis.set_title(f"{name} ({part['trials'].iloc[0]} full-budget trials, 95% bootstrap)")
        axis.set_xlabel("importance (normalised)")
    return save(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.importance",
        description="Parameter importance of a search (PED-ANOVA and fANOVA) over its "
        "full-budget trials, with bootstrap intervals.",
    )
    parser.add_argument("--study", required=True, help="the search's name")
    parser.add_argument(
        "--optuna-storage", help="Optuna's database (default: sqlite:///$PWD/optuna.db)"
    )
    parser.add_argument(
        "--evaluator", nargs="+", choices=sorted(EVALUATORS), default=["ped_anova", "fanova"]
    )
    parser.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples")
    parser.add_argument("--out", help="folder for importance.csv and importance.png")
    args = parser.parse_args(argv)
    storage = args.optuna_storage or f"sqlite:///{Path('optuna.db').resolve()}"
    try:
        study = optuna.load_study(study_name=args.study, storage=storage)
        table = importance_table(study, tuple(args.evaluator), args.bootstrap)
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
