"""A study's runs from MLflow as a pandas table, through MLflow's client (any tracking URI)."""

from __future__ import annotations

import pandas as pd
from mlflow.tracking import MlflowClient

PAGE_SIZE = 5000


def load_runs(
    tracking_uri: str, experiment: str, parent_run_id: str | None = None, role: str = "trial"
) -> pd.DataFrame:
    """One row per run: `run_id`, `status`, `run_name`, `tags.*`, `params.*`, `metrics.*`
    (each metric's last value), as `mlflow.search_runs` names them."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise LookupError(f"no MLflow experiment {experiment!r} in {tracking_uri}")
    clauses = [f"tags.`role` = '{role}'"]
    if parent_run_id is not None:
        clauses.append(f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    rows, token = [], None
    while True:
        page = client.search_runs(
            [found.experiment_id],
            filter_string=" and ".join(clauses),
            max_results=PAGE_SIZE,
            page_token=token,
        )
        rows += [run_row(run) for run in page]
        token = page.token
        if not token:
            break
    return pd.DataFrame(rows)


def run_row(run) -> dict[str, object]:
    row: dict[str, object] = {
        "run_id": run.info.run_id,
        "status": run.info.status,
        "run_name": run.info.run_name,
    }
    row |= {f"tags.{key}": value for key, value in run.data.tags.items()}
    row |= {f"params.{key}": value for key, value in run.data.params.items()}
    row |= {f"metrics.{key}": value for key, value in run.data.metrics.items()}
    return row
