"""What a finished study prints and leaves on its parent run: the best configuration of a
search, or the ablation's table, and how to browse the runs."""

from __future__ import annotations

import json

from analysis.runs import load_runs
from analysis.tables import mean_std_strings, seed_summary
from gacd import metrics
from study.search import RAY_TRIAL_ID_ATTR, best_full_budget_trial
from study.spec import StudySpec

ABLATION_METRICS = [metrics.accuracy("test", name) for name in metrics.ATTACKS]


def print_summary(spec: StudySpec, paths, tracking, experiment_id: str, parent_run: str) -> None:
    if spec.study.mode == "search":
        summarize_search(spec, paths, tracking, parent_run)
    else:
        summarize_ablation(spec, paths, tracking, parent_run)
    print(f"\nbrowse the runs: {browse_command(paths.tracking_uri)}")


def summarize_search(spec: StudySpec, paths, tracking, parent_run: str) -> None:
    try:
        best = best_full_budget_trial(paths.optuna_url, spec.name)
    except ValueError:
        print("no trial ran its full budget: no best configuration")
        return
    summary = {
        "metric": spec.study.metric,
        "value": best.value,
        "optuna_trial": best.number,
        "ray_trial_id": best.user_attrs.get(RAY_TRIAL_ID_ATTR),
        "params": best.params,
    }
    tracking.client.log_dict(parent_run, summary, "best_config.json")
    print(
        f"\nbest full-budget trial: {spec.study.metric} = {best.value:.4f} (Optuna trial "
        f"{best.number}, Ray trial {summary['ray_trial_id']})"
    )
    print(json.dumps(best.params, indent=2))


def summarize_ablation(spec: StudySpec, paths, tracking, parent_run: str) -> None:
    runs = load_runs(paths.tracking_uri, spec.name, parent_run)
    table = mean_std_strings(seed_summary(runs, ABLATION_METRICS, list(spec.variants())))
    text = table.to_string()
    tracking.client.log_text(parent_run, table.to_csv(), "ablation_table.csv")
    print(f"\n{spec.name}: test-split accuracy, mean ± std over seeds\n{text}")


def browse_command(tracking_uri: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"
