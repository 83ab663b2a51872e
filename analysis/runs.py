"""A study's runs from MLflow as pandas tables, through MLflow's client (any tracking URI).

Column names follow `mlflow.search_runs`: `run_id`, `status`, `run_name`, `tags.<name>`,
`params.<name>`, `metrics.<name>` (a metric's last value).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.tracking import MlflowClient

from gacd import schema

PAGE_SIZE = 5000


class StudyNotFoundError(LookupError):
    """No such experiment or study run in the store; the message names the store."""


def default_tracking_uri() -> str:
    return f"sqlite:///{Path('mlflow.db').resolve()}"


def store_exists(uri: str) -> bool:
    """Whether a store is there to read: a SQLite URI's database file exists (opening one that
    does not would create an empty store: MLflow's and Optuna's clients both do); a server's
    URI is taken as there."""
    return not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///")).is_file()


def require_store(uri: str, what: str = "MLflow store") -> None:
    """Refuse a store that is not there (`store_exists`), for a command that only reads."""
    if not store_exists(uri):
        path = uri.removeprefix("sqlite:///")
        raise StudyNotFoundError(f"no {what} at {path} (from {uri}): nothing to read")


def load_runs(
    tracking_uri: str,
    experiment: str,
    parent_run_id: str | None = None,
    role: str = schema.ROLE_TRIAL,
) -> pd.DataFrame:
    """One row per run of `role` (trial, study, teacher) in `experiment`, optionally only the
    children of `parent_run_id`."""
    require_store(tracking_uri)
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise StudyNotFoundError(f"no MLflow experiment {experiment!r} in {tracking_uri}")
    clauses = [f"tags.`{schema.TAG_ROLE}` = '{role}'"]
    if parent_run_id is not None:
        clauses.append(f"tags.`{schema.TAG_PARENT}` = '{parent_run_id}'")
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


def run_json(tracking_uri: str, run_id: str, name: str) -> Any:
    """A JSON artifact of a run (`study.json`, `comparison.json`), or None if it has none."""
    import os
    import tempfile

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = MlflowClient(tracking_uri).download_artifacts(run_id, name, folder)
        except Exception:  # noqa: BLE001 - MLflow raises several kinds for a missing artifact
            return None
        return json.loads(Path(path).read_text())


def run_row(run) -> dict[str, object]:
    row: dict[str, object] = {
        "run_id": run.info.run_id,
        "status": run.info.status,
        "run_name": run.info.run_name,
        "start_time": run.info.start_time,
        "end_time": run.info.end_time,
    }
    row |= {schema.tag_column(key): value for key, value in run.data.tags.items()}
    row |= {schema.param_column(key): value for key, value in run.data.params.items()}
    row |= {schema.metric_column(key): value for key, value in run.data.metrics.items()}
    return row


@dataclass
class Study:
    """A study as the analysis sees it: its parent run's tags and its trials' runs."""

    tracking_uri: str
    name: str
    mode: str  # search | ablation
    metric: str
    direction: str  # max | min
    parent_run_id: str
    runs: pd.DataFrame
    variants: list[str]  # an ablation's variants in the order its file gave them
    reference: str = schema.REFERENCE  # the variant an ablation compares the others with

    @property
    def maximize(self) -> bool:
        return self.direction == "max"


def load_study(tracking_uri: str, experiment: str, study: str | None = None) -> Study:
    """A study of `experiment`, with the runs of its trials: `study` by name, or the
    experiment's own (a comparison's experiment holds its stages, `NAME-search`, ...)."""
    parents = load_runs(tracking_uri, experiment, role=schema.ROLE_STUDY)
    if parents.empty:
        raise StudyNotFoundError(
            f"MLflow experiment {experiment!r} in {tracking_uri} holds no study run"
        )
    names = parents[schema.tag_column(schema.TAG_STUDY)]
    if study is not None:
        chosen = parents[names == study]
    elif len(parents) > 1:
        chosen = parents[names == experiment]
        if chosen.empty:
            raise StudyNotFoundError(
                f"MLflow experiment {experiment!r} holds the studies "
                f"{', '.join(sorted(names))}: name one with --study"
            )
    else:
        chosen = parents
    if chosen.empty:
        raise StudyNotFoundError(
            f"MLflow experiment {experiment!r} in {tracking_uri} holds no study {study!r} "
            f"(it holds {', '.join(sorted(names))})"
        )
    parent = chosen.iloc[0]

    def tag(name: str, default: str) -> str:
        value = parent.get(schema.tag_column(name))  # NaN where another study set it
        return value if isinstance(value, str) else default

    runs = load_runs(tracking_uri, experiment, parent_run_id=parent["run_id"])
    return Study(
        tracking_uri,
        tag(schema.TAG_STUDY, experiment),
        tag(schema.TAG_MODE, "ablation"),
        tag(schema.TAG_METRIC, schema.VAL_PGD_ACC),
        tag(schema.TAG_DIRECTION, "max"),
        parent["run_id"],
        runs,
        json.loads(tag(schema.TAG_VARIANTS, "[]")),
        tag(schema.TAG_REFERENCE, schema.REFERENCE),
    )


def metric_histories(tracking_uri: str, runs: pd.DataFrame) -> pd.DataFrame:
    """Every logged value of every metric of `runs`, long: run_id, metric, step, value,
    timestamp."""
    client = MlflowClient(tracking_uri)
    rows = []
    for run_id in runs["run_id"]:
        names = schema.metric_columns(runs.columns)
        row = runs.loc[runs["run_id"] == run_id].iloc[0]
        for name in names:
            if pd.isna(row[schema.metric_column(name)]):
                continue
            rows += [
                {
                    "run_id": run_id,
                    "metric": name,
                    "step": entry.step,
                    "value": entry.value,
                    "timestamp": entry.timestamp,
                }
                for entry in client.get_metric_history(run_id, name)
            ]
    return pd.DataFrame(rows, columns=["run_id", "metric", "step", "value", "timestamp"])


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", required=True, help="the study's name (its experiment)")
    parser.add_argument(
        "--study",
        help="a study of the experiment other than its own: a comparison's stage, e.g. "
        "NAME-final (default: the experiment's own study)",
    )
    parser.add_argument("--tracking-uri", help="MLflow store (default: sqlite:///$PWD/mlflow.db)")


def run_with_study(args: argparse.Namespace, action: Callable[[Study], int]) -> int:
    """A command's body on the study `--experiment` names; a missing study is one line and
    exit status 2."""
    try:
        uri = args.tracking_uri or default_tracking_uri()
        return action(load_study(uri, args.experiment, getattr(args, "study", None)))
    except StudyNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
