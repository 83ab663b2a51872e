"""Confirm a search's winner on fresh seeds: `python -m study.confirm --study NAME --top 3
--seeds 3`. A search's best trial is one seed's luck as much as a better configuration; this
re-runs the top full-budget trials of a finished search (and its base configuration, as the
reference `full`) over fresh seeds, on the validation split only, and ranks them by mean.

It writes a study file `<storage>/<NAME>_confirm.yaml` (an ablation of the search's trials) and
runs it with `study.run`, so it is logged, resumable and tabulated like any other study.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import optuna
import pandas as pd
import yaml

from analysis.runs import load_study
from analysis.table import ablation_table
from gacd import schema
from study.run import main as run_study
from study.run import study_paths


def best_complete_trials(url: str, name: str, top: int) -> list[optuna.trial.FrozenTrial]:
    """The best `top` COMPLETE (full-budget) trials of a search."""
    study = optuna.load_study(study_name=name, storage=url)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    return sorted(complete, key=lambda trial: trial.value, reverse=maximize)[:top]


def confirm_spec(
    search: dict[str, Any], variants: dict[str, dict[str, Any]], seeds: list[int], name: str
) -> dict[str, Any]:
    """The search's own study (its resolved file), turned into an ablation over `seeds` of
    `variants` (name: the searched values of one of its trials)."""
    spec = json.loads(json.dumps(search))
    # Each variant on each seed as one run: a search's `trial_seeds` do not carry over.
    spec["study"] |= {"name": name, "mode": "ablation", "max_concurrent": None}
    spec["study"].pop("trial_seeds", None)
    (spec["study"].get("sampler") or {}).pop("points_to_evaluate", None)  # the search's own
    spec["study"]["scheduler"]["name"] = "none"
    spec["search"] = {}
    spec["ablation"] = {
        "reference": {},
        "from_study": None,
        "variants": variants,
        "seeds": seeds,
        "test_split": False,
    }
    return spec


def variant_stats(tracking_uri: str, name: str, metric: str) -> pd.DataFrame:
    """Each variant's mean, std and seed count (`n`) of `metric` in an ablation study."""
    study = load_study(tracking_uri, name)
    table = ablation_table(study.runs, [metric], order=study.variants).stats
    return table.xs(metric, level="metric")


def ranking(tracking_uri: str, name: str, metric: str, maximize: bool) -> str:
    means = variant_stats(tracking_uri, name, metric).sort_values("mean", ascending=not maximize)
    lines = [f"ranked by mean {metric} over fresh seeds (validation split):"]
    for rank, (variant, row) in enumerate(means.iterrows(), start=1):
        lines.append(f"  {rank}. {variant:12} {row['mean']:.4f} ± {row['std']:.4f} (n={row['n']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m study.confirm", description=__doc__)
    parser.add_argument("--study", required=True, help="a finished search")
    parser.add_argument(
        "--top", type=int, default=3, help="its best full-budget trials (default: %(default)s)"
    )
    parser.add_argument(
        "--seeds", type=int, default=3, help="fresh seeds per configuration (default: %(default)s)"
    )
    parser.add_argument(
        "--first-seed",
        type=int,
        default=1000,
        help="the first fresh seed, counted up from (default: %(default)s)",
    )
    for option in ("--storage", "--tracking-uri", "--optuna-storage", "--address"):
        parser.add_argument(option, help="as for study.run")
    parser.add_argument("--num-cpus", type=int, help="CPUs the study may use (all by default)")
    parser.add_argument("--num-gpus", type=int, help="GPUs the study may use (all by default)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted confirm")
    args = parser.parse_args(argv)
    paths = study_paths(args.storage, args.tracking_uri, args.optuna_storage)
    saved = paths.experiment(args.study) / schema.SPEC_FILE
    if not saved.is_file():
        print(f"error: no study {args.study!r} in {paths.storage} ({saved})", file=sys.stderr)
        return 2
    search = json.loads(saved.read_text())["resolved"]
    name = f"{args.study}_confirm"
    study_file = paths.storage / f"{name}.yaml"
    if not args.resume:
        try:
            trials = best_complete_trials(paths.optuna_url, args.study, args.top)
        except KeyError:
            print(f"error: no Optuna study {args.study!r} in {paths.optuna_url}", file=sys.stderr)
            return 2
        if not trials:
            print(f"error: study {args.study!r} has no full-budget trial", file=sys.stderr)
            return 2
        seeds = list(range(args.first_seed, args.first_seed + args.seeds))
        variants = {schema.search_run_name(trial.number): trial.params for trial in trials}
        study_file.write_text(yaml.safe_dump(confirm_spec(search, variants, seeds, name)))
    forwarded = [str(study_file), "--storage", str(paths.storage)]
    forwarded += ["--tracking-uri", paths.tracking_uri, "--optuna-storage", paths.optuna_url]
    for option in ("address", "num_cpus", "num_gpus"):
        if getattr(args, option) is not None:
            forwarded += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    code = run_study(forwarded + (["--resume"] if args.resume else []))
    if code == 0:
        metric, direction = search["study"]["metric"], search["study"]["direction"]
        print(ranking(paths.tracking_uri, name, metric, direction == "max"))
    return code


if __name__ == "__main__":
    sys.exit(main())
