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
import re
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.runs import (
    Study,
    StudyNotFoundError,
    default_tracking_uri,
    load_runs,
    load_study,
)
from analysis.table import RENDERERS, checkpoint_caption, render_study, significance_note
from gacd import schema

REPORT_FILE = "report.md"
TABLE_FILE = "comparison"  # .md, .csv, .tex
STATE_ARTIFACT = "comparison.json"
STAGES = ("search", "confirm", "final")
# Where the searches started from each method's defaults: those defaults, as confirmed.
DEFAULTS_COLUMN = "defaults (confirm mean ± std)"


def stage_of(name: str, experiment: str) -> str:
    """A stage's name from its study's (`NAME-confirm-2`, a round seeds added on `--resume`
    ran, is `confirm`)."""
    return re.sub(r"-\d+$", "", name.removeprefix(experiment + "-"))


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
    seed_column = schema.tag_column(schema.TAG_SEED)
    if seed_column in runs:  # a trial over several training seeds trains each of them
        epochs = epochs * runs[seed_column].map(schema.seeds_in_tag)
    seconds = (runs["end_time"] - runs["start_time"]).fillna(0) / 1000.0
    rows = []
    confirmed_defaults = any("defaults_confirmed" in w for w in state.get("winners", {}).values())
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
        if confirmed_defaults:
            confirmed = (won or {}).get("defaults_confirmed")
            row[DEFAULTS_COLUMN] = winner_text(confirmed) if confirmed else "-"
        rows.append(row)
    return pd.DataFrame(rows).set_index("method")


def winner_text(won: dict[str, Any]) -> str:
    """A winner (or its method's defaults) as the budget table shows it: its search trial, its
    mean (± std) on the confirm seeds, and whether ASHA had stopped it early in the search."""
    text = won["name"] + (", the defaults" if won.get("defaults") else "")
    if won.get("mean") is not None:
        spread = f" ± {won['std']:.3f}" if won["std"] == won["std"] else ", one seed"
        text += f" ({won['mean']:.3f}{spread})"
    if won.get("stopped"):
        text += ", stopped early in the search"
    return text


def final_study(tracking_uri: str, experiment: str, state: dict[str, Any]) -> Study:
    """The final stage as one study: from every final round, the runs of each method's current
    winner (a round that ran a winner the confirm seeds added on `--resume` replaced counts
    in the budget, not in the table)."""
    winners = state.get("winners", {})
    rounds = state.get("final_rounds") or [{"stage": "final", "winners": winners}]
    variant = schema.tag_column(schema.TAG_VARIANT)
    studies, parts = [], []
    for round_ in rounds:
        try:
            study = load_study(tracking_uri, experiment, f"{experiment}-{round_['stage']}")
        except StudyNotFoundError:
            continue  # a round not started yet
        current = [
            entry
            for entry, won in round_["winners"].items()
            if winners.get(entry, {}).get("name") == won["name"]
        ]
        studies.append(study)
        if not study.runs.empty:
            parts.append(study.runs[study.runs[variant].isin(current)])
    if not studies:
        raise StudyNotFoundError(f"comparison {experiment!r} has no final stage yet")
    reference = state.get("reference", studies[0].reference)
    first = studies[0]
    return Study(
        tracking_uri,
        f"{experiment}-final",
        "ablation",
        first.metric,
        first.direction,
        first.parent_run_id,
        pd.concat(parts, ignore_index=True) if parts else first.runs.iloc[0:0],
        [reference, *(entry for entry in winners if entry != reference)],
        reference,
    )


def final_table(
    tracking_uri: str, experiment: str, state: dict[str, Any], checkpoint: str, fmt: str
) -> str:
    study = final_study(tracking_uri, experiment, state)
    return render_study(study, None, study.reference, fmt, 10, checkpoint, headers="labels")


def rounds_text(state: dict[str, Any]) -> list[str]:
    """What seeds added on `--resume` ran, and the winners they changed (nothing when none
    were added)."""
    growth = state.get("growth") or []
    if not growth:
        return []
    lines = ["## Seeds added on resume", ""]
    for number, grew in enumerate(growth, start=1):
        added = "; ".join(
            f"{schema.COMPARE_SEED_LISTS[key]} seeds {seeds}"
            for key, seeds in grew.items()
            if key in schema.COMPARE_SEED_LISTS
        )
        changed = grew.get("winners_changed")
        if changed:
            added += "; winners changed: " + ", ".join(
                f"{entry} {old} -> {new}" for entry, (old, new) in changed.items()
            )
        elif "confirm_seeds" in grew and changed is not None:
            added += "; no winner changed"
        lines.append(f"{number}. {added}")
    stages = [r["stage"] for r in state.get("confirm_rounds", [])]
    stages += [
        f"{r['stage']} ({', '.join(r['winners'])} on {r['seeds']})"
        for r in state.get("final_rounds", [])
    ]
    lines += ["", "Rounds: " + "; ".join(stages) + ".", ""]
    return lines


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
            table = final_table(tracking_uri, experiment, state, shown, "md")
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
            "Trials, trial-epochs (epochs trained, summed over trials and, for trials over "
            "several training seeds, over their seeds) and trial-hours (run "
            "wall time, summed) in each stage: `search` (each method's own search, the same "
            "number of trials, scheduler and epoch budget), `confirm` (its best trials re-run "
            "on fresh seeds, validation split; the winner has the best mean) and `final`."
            + (
                f" `{DEFAULTS_COLUMN}`: each search started from its method's defaults, "
                "which were confirmed beside its best trials, so a winner other than the "
                "defaults beat them on the confirm seeds."
                if DEFAULTS_COLUMN in budget
                else ""
            ),
            "",
            budget.to_markdown(floatfmt=".3f"),
            "",
        ]
    lines += rounds_text(state)
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
            text = final_table(tracking_uri, experiment, state, "both", fmt)
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
            print(final_table(uri, args.experiment, state, args.checkpoint, args.format))
    except StudyNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
