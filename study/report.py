"""What a finished study prints and leaves on its parent run: the best configuration of a
search, or the ablation's table, the full report, and how to browse the runs."""

from __future__ import annotations

import json

from analysis.report import write_report
from analysis.runs import load_study
from analysis.table import checkpoint_caption, render_study
from gacd.schema import REFERENCE
from study.search import RAY_TRIAL_ID_ATTR, best_full_budget_trial
from study.spec import StudySpec


def print_summary(spec: StudySpec, paths, tracking, parent_run: str) -> None:
    if spec.study.mode == "search":
        summarize_search(spec, paths, tracking, parent_run)
    study = load_study(paths.tracking_uri, spec.name)
    if spec.study.mode == "ablation":
        # Runs kept off the test split have no best-epoch test metrics to show.
        for checkpoint in ("last", "best") if spec.ablation.test_split else ("last",):
            table = render_study(study, None, REFERENCE, "md", top=10, checkpoint=checkpoint)
            print(
                f"\n{spec.name}: {'test' if spec.ablation.test_split else 'validation'} split "
                f"at {checkpoint_caption(checkpoint)}, mean ± std over seeds (difference to "
                f"{REFERENCE}, paired t-test over shared seeds)\n{table}"
            )
    report = write_report(study, paths.experiment(spec.name) / "report", paths.optuna_url)
    tracking.client.log_artifacts(parent_run, str(report.parent), "report")
    print(f"\nreport: {report} (also on the study's MLflow run, under report/)")
    print(f"browse the runs: {browse_command(paths.tracking_uri)}")


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


def browse_command(tracking_uri: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"
