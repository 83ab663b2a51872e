"""A comparison's table and report (`study.compare`): every method's winner on the test split,
mean +/- std over seeds with paired tests against the reference, beside the budget each
method got (trials, trial-epochs and trial wall time in each stage) and the methods whose
search or confirmation failed, with why.

`python -m analysis.compare --experiment digits_compare [--format md|latex|csv] [--out DIR]`
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.runs import StudyNotFoundError, default_tracking_uri, load_runs, load_study
from analysis.table import RENDERERS, checkpoint_caption, render_study, significance_note
from gacd import schema

REPORT_FILE = "report.md"
TABLE_FILE = "comparison"  # .md, .csv, .tex
STATE_ARTIFACT = "comparison.json"
STAGES = ("search", "confirm", "final")


def stage_of(name: str, experiment: str) -> str:
    return name.removeprefix(experiment + "-")


def budget_table(tracking_uri: str, experiment: str, state: dict[str, Any]) -> pd.DataFrame:
    """One row per method: its trials, trial-epochs and trial hours in each stage (search,
    confirm, final), what it searched, its winner, or why it has none."""
    runs = load_runs(tracking_uri, experiment)
    methods = list(dict.fromkeys([*state.get("candidates", {}), *state.get("failed", {})]))
    if runs.empty or not methods:
        return pd.DataFrame()
    study = runs[schema.tag_column(schema.TAG_STUDY)].map(lambda n: stage_of(str(n), experiment))
    variant = runs[schema.tag_column(schema.TAG_VARIANT)].astype(str)
    entry_column = schema.tag_column(schema.TAG_ENTRY)
    entry = runs[entry_column] if entry_column in runs else pd.Series(None, index=runs.index)
    owner = entry.where(study == "search", variant.str.split(".").str[0])
    epochs = runs.get(schema.metric_column(schema.EPOCH), pd.Series(0.0, index=runs.index))
    seconds = (runs["end_time"] - runs["start_time"]).fillna(0) / 1000.0
    rows = []
    for method in methods:
        row: dict[str, Any] = {"method": method}
        for stage in STAGES:
            mine = (owner == method) & (study == stage)
            row[f"{stage} trials"] = int(mine.sum())
            row[f"{stage} trial-epochs"] = int(epochs[mine].fillna(0).sum())
            row[f"{stage} trial-hours"] = float(seconds[mine].sum()) / 3600.0
        won = state.get("winners", {}).get(method)
        if won is not None:
            row["winner (confirm mean ± std)"] = winner_text(won)
            row["winner's values"] = json.dumps(won["params"], sort_keys=True)
        else:
            row["winner (confirm mean ± std)"] = state.get("failed", {}).get(method, "-")
            row["winner's values"] = ""
        rows.append(row)
    return pd.DataFrame(rows).set_index("method")


def winner_text(won: dict[str, Any]) -> str:
    """A winner as the budget table shows it: its search trial, its mean (± std) on the
    confirm seeds, and whether ASHA had stopped it early in the search."""
    text = won["name"]
    if won.get("mean") is not None:
        spread = f" ± {won['std']:.3f}" if won["std"] == won["std"] else ", one seed"
        text += f" ({won['mean']:.3f}{spread})"
    if won.get("stopped"):
        text += ", stopped early in the search"
    return text


def final_table(tracking_uri: str, experiment: str, checkpoint: str, fmt: str) -> str:
    study = load_study(tracking_uri, experiment, f"{experiment}-final")
    return render_study(study, None, study.reference, fmt, 10, checkpoint, headers="labels")


def comparison_markdown(
    tracking_uri: str,
    experiment: str,
    state: dict[str, Any],
    checkpoint: str = "last",
    also: tuple[str, ...] = (),
    budget: pd.DataFrame | None = None,
) -> str:
    """The comparison as one page: the final table at `checkpoint` (then at each of `also`),
    the budget each method got (`budget`, read from MLflow when not given), once, and the
    methods whose search failed."""
    lines = [f"# {experiment}: every method tuned alike, compared on fresh seeds", ""]
    reference = state.get("reference", "gacd")
    for shown in (checkpoint, *also):
        try:
            table = final_table(tracking_uri, experiment, shown, "md")
            lines += [
                f"## Test split, each method's winner ({checkpoint_caption(shown)})",
                "",
                "Mean ± std over the final seeds; "
                + significance_note(reference, "text").replace("\\*", "*"),
                "",
                table,
                "",
            ]
        except (StudyNotFoundError, LookupError) as error:
            lines += [f"No final table: {error}.", ""]
            break
    if budget is None:
        budget = budget_table(tracking_uri, experiment, state)
    if not budget.empty:
        lines += [
            "## The budget each method got, and its winner",
            "",
            "Trials, trial-epochs (epochs trained, summed over trials) and trial-hours (run "
            "wall time, summed) in each stage: `search` (each method's own search, the same "
            "number of trials, scheduler and epoch budget), `confirm` (its best trials re-run "
            "on fresh seeds, validation split; the winner has the best mean) and `final`.",
            "",
            budget.to_markdown(floatfmt=".3f"),
            "",
        ]
    for method, reason in state.get("failed", {}).items():
        lines.append(f"- **{method}**: {reason}")
    return "\n".join(lines) + "\n"


def write_comparison(tracking_uri: str, experiment: str, folder: Path, state: dict) -> Path:
    """`report/report.md` (and `.html`) plus the final table as `comparison.md`, `.csv`
    and `.tex` under `folder`; returns the report's path."""
    from analysis.report import write_html

    out = folder / "report"
    out.mkdir(parents=True, exist_ok=True)
    budget = budget_table(tracking_uri, experiment, state)  # one MLflow read for every page
    page = comparison_markdown(tracking_uri, experiment, state, "last", budget=budget)
    (out / f"{TABLE_FILE}.md").write_text(page)
    report = out / REPORT_FILE
    report.write_text(
        comparison_markdown(tracking_uri, experiment, state, "last", ("best",), budget=budget)
    )
    write_html(report, out / "report.html", experiment)
    for fmt, extension in (("csv", "csv"), ("latex", "tex")):
        try:
            text = final_table(tracking_uri, experiment, "both", fmt)
        except (StudyNotFoundError, LookupError):
            continue
        (out / f"{TABLE_FILE}.{extension}").write_text(text)
    if not budget.empty:
        budget.to_csv(out / "budget.csv")
    return report


def comparison_state(tracking_uri: str, experiment: str) -> dict[str, Any]:
    """What the comparison decided, from its MLflow run (logged when it ended)."""
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    comparisons = load_runs(tracking_uri, experiment, role=schema.ROLE_COMPARISON)
    if comparisons.empty:
        raise StudyNotFoundError(
            f"MLflow experiment {experiment!r} in {tracking_uri} holds no comparison"
        )
    run_id = comparisons.iloc[0]["run_id"]
    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/{STATE_ARTIFACT}")
    except Exception as error:  # noqa: BLE001 - a comparison that has not ended
        raise StudyNotFoundError(
            f"comparison {experiment!r} has not ended (its run {run_id} has no "
            f"{STATE_ARTIFACT}): resume it first"
        ) from error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.compare", description=__doc__)
    parser.add_argument("--experiment", required=True, help="the comparison's name")
    parser.add_argument("--tracking-uri", help="MLflow store (default: sqlite:///$PWD/mlflow.db)")
    parser.add_argument(
        "--format",
        choices=sorted(RENDERERS),
        default="md",
        help="md: the whole comparison (table, budgets, failures); latex or csv: the final "
        "table alone (default: %(default)s)",
    )
    parser.add_argument(
        "--checkpoint",
        choices=("last", "best", "both"),
        default="last",
        help="test metrics of the last epoch, of the epoch of best val/pgd_acc, or both "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--out", help="write report.md, comparison.md/.csv/.tex and budget.csv into this folder"
    )
    args = parser.parse_args(argv)
    uri = args.tracking_uri or default_tracking_uri()
    try:
        import mlflow

        mlflow.set_tracking_uri(uri)
        state = comparison_state(uri, args.experiment)
        if args.out:
            print(write_comparison(uri, args.experiment, Path(args.out), state))
        elif args.format == "md":
            print(comparison_markdown(uri, args.experiment, state, args.checkpoint))
        else:
            print(final_table(uri, args.experiment, args.checkpoint, args.format))
    except StudyNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
