"""A comparison's table and report (`study.compare`): every method's winner on the test split,
mean +/- std over seeds with paired tests against the reference, beside the budget each
method got (trials, trial-epochs and the hours its epochs took, in each stage) and the methods
whose search or confirmation failed, with why. Several comparisons of the same methods (another
sampler seed: `study.run --sampler-seed`) read together: each one's winners side by side, the
spread over comparisons, and how often each method beat the reference.

`python -m analysis.compare --experiment digits_compare [--format md|latex|csv] [--out DIR]`
`python -m analysis.compare --experiment digits_compare digits_compare_sampler1 [...]`
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from analysis.report import teacher_section, write_html
from analysis.runs import (
    Study,
    StudyNotFoundError,
    default_tracking_uri,
    load_runs,
    load_study,
    metric_histories,
    require_store,
    run_json,
)
from analysis.table import (
    RENDERERS,
    ablation_table,
    add_checkpoint_argument,
    checkpoint_caption,
    column_label,
    default_metrics,
    for_checkpoint,
    higher_is_better,
    ranked,
    render_study,
    significance_mark,
    significance_note,
)
from gacd import schema
from gacd.config import flatten

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
    seconds = trained_seconds(tracking_uri, runs)
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


def trained_seconds(tracking_uri: str, runs: pd.DataFrame) -> pd.Series:
    """Each run's time spent training and evaluating: its epochs' `time/epoch_s`, summed (each
    epoch is logged once: one re-run after a restore from an older checkpoint counts its first
    computation, and the part of an epoch an interruption cut short counts nothing). A run's
    span in MLflow (end minus start) would also count the time a study stood between an
    interruption and its `--resume`; it is the fallback for runs that log no epoch time."""
    span = (runs["end_time"] - runs["start_time"]).fillna(0) / 1000.0
    column = schema.metric_column(schema.EPOCH_SECONDS)
    if column not in runs:
        return span
    history = metric_histories(tracking_uri, runs[["run_id", column]])
    summed = history.groupby("run_id")["value"].sum()
    return runs["run_id"].map(summed).astype(float).fillna(span)


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


def final_table(study: Study, checkpoint: str, fmt: str) -> str:
    """The final stage's table (`final_study`) at `checkpoint`, in `fmt`."""
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
    study: Study | None = None,
    teacher: list[str] | None = None,
) -> str:
    """The comparison as one page: the final table at `checkpoint` (then at each of `also`),
    the teacher's own metrics (`teacher`: `analysis.report.teacher_section`'s lines, read from
    MLflow when not given), the budget each method got (`budget`, likewise), once, and the
    methods whose search failed. `study`: its final stage, read from MLflow when not given.
    The shared keys not searched alike are those the run recorded in `state` as it ran
    (`study.compare.uneven_searches`; a state from before that was recorded names none)."""
    alike = len(set((state.get("trials") or {}).values())) <= 1
    tuned = "every method tuned alike" if alike else "every method tuned, its own number of trials"
    lines = [f"# {experiment}: {tuned}, compared on fresh seeds", ""]
    reference = state.get("reference", "gacd")
    for shown in (checkpoint, *also):
        try:
            if study is None:
                study = final_study(tracking_uri, experiment, state)
            table = final_table(study, shown, "md")
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
    else:  # where the digits come from (a CPU's instruction set moves them)
        lines += [f"Final runs' hardware: {final_hardware(study.runs)}.", ""]
        lines += teacher_section(study) if teacher is None else teacher
    if budget is None:
        budget = budget_table(tracking_uri, experiment, state)
    if not budget.empty:
        lines += [
            "## The budget each method got, and its winner",
            "",
            "Trials, trial-epochs (epochs trained, summed over trials and, for trials over "
            "several training seeds, over their seeds) and trial-hours (the time its epochs "
            "took to train and evaluate, summed; a run interrupted and resumed counts none of "
            "the time between) in each stage: `search` (each method's own search, "
            + (
                "the same number of trials, scheduler and epoch budget"
                if alike
                else "the same scheduler and epoch budget, its own number of trials"
            )
            + "), `confirm` (its best trials re-run "
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
    uneven = state.get("uneven") or []
    lines += [f"**Not searched alike:** {note}." for note in uneven] + ([""] if uneven else [])
    lines += rounds_text(state)
    for method, reason in state.get("failed", {}).items():
        lines.append(f"- **{method}**: {reason}")
    return "\n".join(lines) + "\n"


def write_comparison(tracking_uri: str, experiment: str, folder: Path, state: dict) -> Path:
    """`report/report.md` (and `.html`) plus the final table as `comparison.md`, `.csv`
    and `.tex` under `folder`; returns the report's path."""
    out = folder / "report"
    out.mkdir(parents=True, exist_ok=True)
    # One MLflow read of the budget, the final stage and the teacher for every page.
    budget = budget_table(tracking_uri, experiment, state)
    try:
        study: Study | None = final_study(tracking_uri, experiment, state)
    except StudyNotFoundError:
        study = None  # each page says why it has no table
    teacher = teacher_section(study) if study is not None else []
    page = comparison_markdown(
        tracking_uri, experiment, state, "last", budget=budget, study=study, teacher=teacher
    )
    (out / f"{TABLE_FILE}.md").write_text(page)
    report = out / REPORT_FILE
    report.write_text(
        comparison_markdown(
            tracking_uri,
            experiment,
            state,
            "last",
            ("best",),
            budget=budget,
            study=study,
            teacher=teacher,
        )
    )
    write_html(report, out / "report.html", experiment)
    for fmt, extension in (("csv", "csv"), ("latex", "tex")):
        if study is None:
            break
        try:
            text = final_table(study, "both", fmt)
        except LookupError:  # no finished run has the metrics
            continue
        (out / f"{TABLE_FILE}.{extension}").write_text(text)
    if not budget.empty:
        budget.to_csv(out / "budget.csv")
    return report


def comparison_state(
    tracking_uri: str, experiment: str, run_id: str | None = None
) -> dict[str, Any]:
    """What the comparison decided, from its MLflow run (`run_id`, found when not given;
    logged when it ended)."""
    run_id = run_id or comparison_run(tracking_uri, experiment)
    state = run_json(tracking_uri, run_id, STATE_ARTIFACT)
    if state is None:
        raise StudyNotFoundError(
            f"comparison {experiment!r} has not ended (its run {run_id} has no "
            f"{STATE_ARTIFACT}): resume it first"
        )
    return state


def comparison_run(tracking_uri: str, experiment: str) -> str:
    """The id of the comparison's own MLflow run (its stages' study runs are nested in it)."""
    comparisons = load_runs(tracking_uri, experiment, role=schema.ROLE_COMPARISON)
    if comparisons.empty:
        raise StudyNotFoundError(
            f"MLflow experiment {experiment!r} in {tracking_uri} holds no comparison"
        )
    return str(comparisons.iloc[0]["run_id"])


# --- several comparisons of the same methods ------------------------------------------------

REPLICATED_FILE = "replicated"  # .md, .csv, .tex
SIGNIFICANT = 0.05  # a comparison's paired test counts as significant below this p


@dataclass
class Replicated:
    """Several comparisons of the same methods against the same reference, read together."""

    experiments: list[str]
    reference: str
    metrics: list[str]
    labels: dict[str, str]  # metric -> a paper's header (PGD-20)
    cells: pd.DataFrame  # one row per (metric, method, comparison): mean, std, n, diff, p_value
    summary: pd.DataFrame  # one row per (metric, method): over the comparisons
    winners: pd.DataFrame  # method x comparison: the winner's searched values
    seeds: dict[str, list[int]]  # comparison -> its final seeds
    differences: pd.DataFrame  # dotted study key x comparison, where their studies differ


def replicated(
    tracking_uri: str,
    experiments: list[str],
    metrics: list[str] | None = None,
    checkpoint: str = "last",
) -> Replicated:
    """Each comparison's final table (the cells `analysis.compare` shows for it alone) and,
    per method, what holds over all of them. Comparisons must share their reference."""
    if len(set(experiments)) != len(experiments):
        raise StudyNotFoundError(f"--experiment: each comparison once, got {experiments}")
    run_ids = {name: comparison_run(tracking_uri, name) for name in experiments}
    states = {name: comparison_state(tracking_uri, name, run_ids[name]) for name in experiments}
    references = {name: state.get("reference", schema.REFERENCE) for name, state in states.items()}
    if len(set(references.values())) > 1:
        raise StudyNotFoundError(
            "comparisons read together must share their reference; these have "
            + ", ".join(f"{name}: {ref}" for name, ref in references.items())
        )
    reference = references[experiments[0]]
    studies = {name: final_study(tracking_uri, name, states[name]) for name in experiments}
    first = studies[experiments[0]].runs
    if metrics is None:  # every accuracy the first comparison's finals logged, test then transfer
        metrics = [m for m in default_metrics(first) if m.endswith("_acc")]
    chosen = [m for m in for_checkpoint(metrics, checkpoint) if ranked(m)]
    seed_column = schema.tag_column(schema.TAG_SEED)
    rows = []
    for name, study in studies.items():
        table = ablation_table(study.runs, chosen, reference, order=study.variants)
        missing = [m for m in chosen if m not in table.metrics]
        if missing:
            logged = sorted(schema.metric_columns(study.runs.columns))
            raise StudyNotFoundError(
                f"comparison {name!r}: no final run logged {', '.join(missing)} (its finals "
                f"logged {', '.join(logged) or 'nothing'}); choose others with --metrics"
            )
        for metric in chosen:
            for method in table.variants:
                cell = table.cell(method, metric)
                rows.append(
                    {"metric": metric, "method": method, "comparison": name}
                    | {key: cell[key] for key in ("mean", "std", "n", "diff", "p_value")}
                )
    cells = pd.DataFrame(rows)
    summary = pd.concat(
        [over_comparisons(cells[cells["metric"] == m], reference, m) for m in chosen],
        ignore_index=True,
    )
    winners = pd.DataFrame(
        {
            name: {method: "failed" for method in states[name].get("failed", {})}
            | {
                method: params_text(won.get("params", {}))
                + (" (defaults)" if won.get("defaults") else "")
                for method, won in states[name].get("winners", {}).items()
            }
            for name in experiments
        }
    )
    winners = winners.reindex(list(dict.fromkeys([*cells["method"], *winners.index]))).fillna("-")
    seeds = {
        name: sorted(int(s) for s in study.runs[seed_column].dropna().unique())
        if seed_column in study.runs
        else []
        for name, study in studies.items()
    }
    labels = {m: column_label(m, first) for m in chosen}
    differences = study_differences(tracking_uri, run_ids)
    machines = {name: final_hardware(study.runs) for name, study in studies.items()}
    if len(set(machines.values())) > 1:  # a CPU's kernels move a table's digits, search and all
        differences.loc[HARDWARE_ROW] = [machines[name] for name in experiments]
    return Replicated(
        experiments, reference, chosen, labels, cells, summary, winners, seeds, differences
    )


HARDWARE_ROW = "hardware (final runs)"


def final_hardware(runs: pd.DataFrame) -> str:
    """The machines a comparison's final runs ran on (their `hardware` parameter)."""
    column = schema.param_column("hardware")
    found = sorted(set(runs[column].dropna())) if column in runs else []
    return "; ".join(found) or "not recorded"


def study_differences(tracking_uri: str, run_ids: dict[str, str]) -> pd.DataFrame:
    """The resolved study keys (`study.json` on each comparison's run, `run_ids`: comparison
    -> run) whose values differ between the comparisons, their names aside: what was varied
    (`study.sampler.seed`), and anything else that was (a budget, other seeds) that a reader
    should know of."""
    experiments = list(run_ids)
    flat = {}
    for name, run_id in run_ids.items():
        spec = run_json(tracking_uri, run_id, schema.STUDY_ARTIFACT)
        flat[name] = {
            key: json.dumps(value, sort_keys=True) if isinstance(value, list | dict) else value
            for key, value in flatten(spec or {}).items()
        }
        flat[name][schema.STUDY_ARTIFACT] = "recorded" if spec else "not recorded"
    keys = sorted({key for values in flat.values() for key in values} - {"study.name"})
    rows = {
        key: [flat[name].get(key, "-") for name in experiments]
        for key in keys
        if len({repr(flat[name].get(key, "-")) for name in experiments}) > 1
        or (key == schema.STUDY_ARTIFACT and flat[experiments[0]][key] == "not recorded")
    }
    return pd.DataFrame.from_dict(rows, orient="index", columns=experiments)


def over_comparisons(cells: pd.DataFrame, reference: str, metric: str) -> pd.DataFrame:
    """One row per method: the mean and std of its per-comparison means (the spread a new
    search, confirmation and set of final seeds gives), in how many comparisons it was ahead
    of the reference or behind it (and significantly so over that comparison's seeds), and a
    one-sample t-test of its per-comparison differences to the reference, whose unit is a
    whole comparison, its search included."""
    sign = 1.0 if higher_is_better(metric) else -1.0
    rows = []
    for method, mine in cells.groupby("method", sort=False):
        means = mine["mean"].dropna()
        row: dict[str, Any] = {
            "metric": metric,
            "method": method,
            "comparisons": int(means.size),
            "mean": means.mean(),
            "std": means.std(ddof=1) if means.size > 1 else np.nan,
        }
        if method != reference:
            diffs = mine["diff"].dropna()
            ahead, behind = sign * mine["diff"] > 0, sign * mine["diff"] < 0
            significant = mine["p_value"] < SIGNIFICANT
            p_value = np.nan
            if diffs.size >= 2 and diffs.std(ddof=1) > 0:
                p_value = float(scipy_stats.ttest_1samp(diffs, 0.0).pvalue)
            row |= {
                "ahead": int(ahead.sum()),
                "ahead_significant": int((ahead & significant).sum()),
                "behind": int(behind.sum()),
                "behind_significant": int((behind & significant).sum()),
                "diff": diffs.mean() if diffs.size else np.nan,
                "p_value": p_value,
            }
        rows.append(row)
    return pd.DataFrame(rows)


def params_text(params: dict[str, Any]) -> str:
    """A winner's searched values, short: `optim.lr` 0.18345 -> `lr 0.183`."""
    parts = []
    for key, value in sorted(params.items()):
        shown = f"{value:.3g}" if isinstance(value, float) else str(value)
        parts.append(f"{key.rsplit('.', 1)[-1]} {shown}")
    return ", ".join(parts) or "-"


def replicated_frame(rep: Replicated, metric: str, pm: str) -> pd.DataFrame:
    """Strings for one metric: a row per method (the reference, then best mean first), a
    column per comparison (its winner's mean; * / ** where that comparison's paired test
    against the reference gave p < 0.05 / 0.01), then the columns over comparisons."""
    summary = rep.summary[rep.summary["metric"] == metric].set_index("method")
    others = summary.drop(index=rep.reference, errors="ignore")
    others = others.sort_values("mean", ascending=not higher_is_better(metric))
    methods = [m for m in (rep.reference, *others.index) if m in summary.index]
    cells = rep.cells[rep.cells["metric"] == metric].set_index(["method", "comparison"])
    frame = pd.DataFrame(index=pd.Index(methods, name="method"))
    for name in rep.experiments:
        column = []
        for method in methods:
            cell = cells.loc[(method, name)] if (method, name) in cells.index else None
            if cell is None or cell["n"] == 0:
                column.append("-")
                continue
            mark = "" if method == rep.reference else significance_mark(cell["p_value"])
            column.append(f"{cell['mean']:.3f}{mark}")
        frame[name] = column
    spread, versus, overall = [], [], []
    for method in methods:
        row = summary.loc[method]
        spread.append(
            f"{row['mean']:.3f}" + (f" {pm} {row['std']:.3f}" if row["comparisons"] > 1 else "")
        )
        if method == rep.reference:
            versus.append("")
            overall.append("")
            continue
        ahead, behind = int(row["ahead"]), int(row["behind"])
        count = int(row["comparisons"])  # those it has a winner in
        text = f"ahead in {ahead} of {count} ({int(row['ahead_significant'])} significant)"
        if behind:
            text += f", behind in {behind} ({int(row['behind_significant'])})"
        versus.append(text)
        p_value = "n/a" if np.isnan(row["p_value"]) else f"{row['p_value']:.3f}"
        overall.append("-" if np.isnan(row["diff"]) else f"{row['diff']:+.3f}, p={p_value}")
    frame[f"mean {pm} std over comparisons"] = spread
    frame[f"each comparison vs {rep.reference}"] = versus
    frame[f"over comparisons vs {rep.reference}"] = overall
    return frame


def replicated_markdown(rep: Replicated, checkpoint: str = "last") -> str:
    """Every metric's table, the winners' values, and what the columns mean."""
    seeds = "; ".join(f"`{name}` {rep.seeds[name]}" for name in rep.experiments)
    lines = [
        f"# {len(rep.experiments)} comparisons read together: {', '.join(rep.experiments)}",
        "",
        f"Each comparison searched, confirmed and chose its own winners; these are their "
        f"finals on the test split ({checkpoint_caption(checkpoint)}), final seeds {seeds}. "
        f"A comparison's column is its winner's mean over its seeds, with \\* (p < 0.05) or "
        f"\\*\\* (p < 0.01) where that comparison's paired t-test against `{rep.reference}` "
        "separated them; its cells are those `analysis.compare` shows for it alone. "
        "`mean ± std over comparisons`: the spread of those means, which counts each search's "
        "luck. `each comparison`: in how many the method was ahead of (behind) the reference, "
        "and significantly so. `over comparisons`: the mean difference and a one-sample t-test "
        "over the comparisons (its unit is a whole comparison, so it needs several).",
        "",
        "## What differs between them",
        "",
    ]
    if rep.differences.empty:
        lines += ["Nothing but their names: the same study, run again.", ""]
    else:
        lines += [rep.differences.rename_axis("study key").astype(str).to_markdown(), ""]
    for metric in rep.metrics:
        lines += [
            f"## {rep.labels[metric]} (`{metric}`)",
            "",
            replicated_frame(rep, metric, "±").to_markdown(
                colalign=["left"] + ["right"] * (len(rep.experiments) + 1) + ["left"] * 2,
                disable_numparse=True,  # "0.980" stays as written, not re-formatted "0.98"
            ),
            "",
        ]
    lines += [
        "## Each comparison's winners",
        "",
        rep.winners.rename_axis("method").to_markdown(),
        "",
    ]
    return "\n".join(lines)


def replicated_latex(rep: Replicated) -> str:
    """One booktabs tabular per metric, headers escaped."""
    parts = []
    for metric in rep.metrics:
        frame = replicated_frame(rep, metric, r"$\pm$")
        styler = frame.style.format_index(escape="latex", axis=0).format_index(
            escape="latex", axis=1
        )
        styler = styler.hide(axis="index", names=True)
        parts.append(f"% {rep.labels[metric]} ({metric})\n" + styler.to_latex(hrules=True))
    return "\n".join(parts)


def replicated_csv(rep: Replicated) -> str:
    """Tidy and unrounded: each comparison's cells, then the rows over comparisons
    (`comparison` empty)."""
    return pd.concat([rep.cells, rep.summary], ignore_index=True).to_csv(index=False)


REPLICATED_RENDERERS = {
    "md": replicated_markdown,
    "latex": lambda rep, checkpoint="last": replicated_latex(rep),
    "csv": lambda rep, checkpoint="last": replicated_csv(rep),
}


def write_replicated(rep: Replicated, folder: Path, checkpoint: str = "last") -> Path:
    """`replicated.md`, `.csv` and `.tex` under `folder`; returns the Markdown's path."""
    folder.mkdir(parents=True, exist_ok=True)
    for fmt, extension in (("md", "md"), ("csv", "csv"), ("latex", "tex")):
        path = folder / f"{REPLICATED_FILE}.{extension}"
        path.write_text(REPLICATED_RENDERERS[fmt](rep, checkpoint))
    return folder / f"{REPLICATED_FILE}.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.compare", description=__doc__)
    parser.add_argument(
        "--experiment",
        required=True,
        nargs="+",
        metavar="NAME",
        help="the comparison's name; several (the same methods compared again, e.g. with "
        "another --sampler-seed) are read together",
    )
    parser.add_argument("--tracking-uri", help="MLflow store (default: sqlite:///$PWD/mlflow.db)")
    parser.add_argument(
        "--format",
        choices=sorted(RENDERERS),
        default="md",
        help="md: the whole comparison (table, budgets, failures); latex or csv: the final "
        "table alone; for several comparisons, each format holds every metric's table "
        "(default: %(default)s)",
    )
    add_checkpoint_argument(parser)
    parser.add_argument(
        "--metrics",
        nargs="+",
        help="several comparisons: the metric keys to read together, e.g. test/pgd_acc "
        "transfer/pgd_acc (default: every test and transfer accuracy their finals logged)",
    )
    parser.add_argument(
        "--out",
        help="write report.md, comparison.md/.csv/.tex and budget.csv into this folder "
        "(several comparisons: replicated.md/.csv/.tex)",
    )
    args = parser.parse_args(argv)
    uri = args.tracking_uri or default_tracking_uri()
    try:
        require_store(uri)
        if len(args.experiment) > 1:
            rep = replicated(uri, args.experiment, args.metrics, args.checkpoint)
            if args.out:
                print(write_replicated(rep, Path(args.out), args.checkpoint))
            else:
                print(REPLICATED_RENDERERS[args.format](rep, args.checkpoint))
            return 0
        if args.metrics:
            parser.error("--metrics: only for several comparisons read together")
        (experiment,) = args.experiment
        state = comparison_state(uri, experiment)
        if args.out:
            print(write_comparison(uri, experiment, Path(args.out), state))
        elif args.format == "md":
            print(comparison_markdown(uri, experiment, state, args.checkpoint))
        else:
            print(final_table(final_study(uri, experiment, state), args.checkpoint, args.format))
    except StudyNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
