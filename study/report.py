"""What a finished study prints and leaves on its parent run: the best configuration of a
search, or the ablation's table, the full report, and how to browse the runs."""

from __future__ import annotations

import json
import time

import pandas as pd
from mlflow.entities import Metric

from analysis.report import write_report
from analysis.runs import Study, load_study
from analysis.table import ablation_table, checkpoint_caption, render_study, top_trials
from gacd import schema
from gacd.schema import tag_column
from study.search import RAY_TRIAL_ID_ATTR, best_full_budget_trial
from study.spec import StudySpec


def print_summary(spec: StudySpec, paths, tracking, parent_run: str) -> None:
    if spec.study.mode == "search":
        summarize_search(spec, paths, tracking, parent_run)
    study = load_study(paths.tracking_uri, spec.study.experiment_name, spec.name)
    if spec.study.mode == "compare":
        # A comparison's searches: its own report (study.compare) covers them.
        log_study_metrics(study, tracking, parent_run)
        return
    if spec.study.mode == "ablation":
        # Runs kept off the test split have no best-epoch test metrics to show.
        for checkpoint in ("last", "best") if spec.ablation.test_split else ("last",):
            table = render_study(study, None, study.reference, "md", top=10, checkpoint=checkpoint)
            print(
                f"\n{spec.name}: {'test' if spec.ablation.test_split else 'validation'} split "
                f"at {checkpoint_caption(checkpoint)}, mean ± std over seeds (difference to "
                f"{study.reference}, paired t-test over shared seeds)\n{table}"
            )
        checkpoint = "both" if spec.ablation.test_split else "last"
        for fmt, extension in (("csv", "csv"), ("latex", "tex")):
            text = render_study(study, None, study.reference, fmt, top=10, checkpoint=checkpoint)
            tracking.client.log_text(parent_run, text, f"ablation_table.{extension}")
    log_study_metrics(study, tracking, parent_run)
    report = write_report(study, paths.experiment(spec.name) / "report", paths.optuna_url)
    tracking.client.log_artifacts(parent_run, str(report.parent), "report")
    print(f"\nreport: {report} (also on the study's MLflow run, under report/)")
    if spec.study.experiment is None:  # a comparison's stage: the comparison says it once
        experiment = tracking.experiment_id(spec.name)
        print(f"browse the runs: {browse_command(paths.tracking_uri, experiment)}")


def study_result(study: Study) -> tuple[float | None, str | None]:
    """The study's best value of its metric and what holds it: a search's best full-budget
    trial, or an ablation's best variant by its mean over seeds."""
    if study.mode in ("search", "compare"):
        trials = top_trials(study.runs, study.metric, study.maximize, top=1)
        if trials.empty:
            return None, None
        return float(trials.iloc[0][study.metric]), str(trials.iloc[0]["run_name"])
    table = ablation_table(study.runs, [study.metric], study.reference, study.variants)
    if table.stats.empty:
        return None, None
    means = table.stats.xs(study.metric, level="metric")["mean"].dropna()
    if means.empty:
        return None, None
    best = means.idxmax() if study.maximize else means.idxmin()
    return float(means[best]), str(best)


def log_study_metrics(study: Study, tracking, parent_run: str) -> None:
    """The parent run's own metrics, so that its collapsed row says how the study went: the
    best value (`study/best_value`, tagged with what holds it) and the trials by state."""
    states = study.runs.get(tag_column(schema.TAG_STATE), pd.Series(dtype=str))
    metrics = {
        schema.trials_metric(state): float((states == state).sum())
        for state in (schema.STATE_COMPLETE, schema.STATE_STOPPED, schema.STATE_FAILED)
    }
    value, holder = study_result(study)
    if value is not None:
        metrics[schema.STUDY_BEST_VALUE] = value
        tracking.client.set_tag(parent_run, schema.TAG_BEST, holder)
    now = int(time.time() * 1000)
    tracking.client.log_batch(
        parent_run, metrics=[Metric(key, value, now, 0) for key, value in metrics.items()]
    )


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


# MLflow 3's UI opens in its GenAI mode unless the page asks for model training.
MODEL_TRAINING_VIEW = "?workflowType=machine_learning"


def browse_command(tracking_uri: str, experiment_id: str) -> str:
    """How to open the study's runs table: the server's page, or `mlflow ui` and its page."""
    page = f"#/experiments/{experiment_id}{MODEL_TRAINING_VIEW}"
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri.rstrip('/')}/{page}"
    return (
        f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000, then "
        f"open http://127.0.0.1:5000/{page}"
    )
