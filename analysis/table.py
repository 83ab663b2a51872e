"""Ablation tables: one row per variant, mean +/- std of each metric over seeds, the difference
to the reference variant with a paired t-test over the seeds both ran, the best marked.

Rendered as Markdown (pandas' `to_markdown`), LaTeX (pandas' `Styler.to_latex`, headers
escaped) or CSV (one tidy row per variant and metric, the numbers unrounded).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from analysis.runs import (
    Study,
    StudyNotFoundError,
    add_store_arguments,
    run_with_study,
)
from gacd import schema

VARIANT = schema.tag_column(schema.TAG_VARIANT)
SEED = schema.tag_column(schema.TAG_SEED)


def higher_is_better(metric: str) -> bool:
    """Accuracies and similarities go up; losses, times and differences go down."""
    return not metric.startswith(("train/loss", "time/")) and not metric.endswith("_diff")


def ranked(metric: str) -> bool:
    """Whether a column's best value means anything (an epoch number does not)."""
    return metric != schema.BEST_EPOCH


# --- which checkpoint ----------------------------------------------------------------------

# A final run reports the test split for its last epoch (`test/...`) and for its epoch of best
# validation PGD accuracy (`test_best/...`); tables show either, or both side by side.
CHECKPOINTS = ("last", "best", "both")
TESTED_SPLITS = ("test/", "transfer/")


def add_checkpoint_argument(parser: argparse.ArgumentParser, default: str = "last") -> None:
    """`--checkpoint`, as every table command reads it."""
    parser.add_argument(
        "--checkpoint",
        choices=CHECKPOINTS,
        default=default,
        help="test metrics of the last epoch, of the epoch of best val/pgd_acc, or both "
        "(default: %(default)s)",
    )


def checkpoint_caption(checkpoint: str) -> str:
    selection = f"the epoch of best `{schema.SELECTION}` (chosen on validation, never on test)"
    return {
        "last": "the last epoch's checkpoint",
        "best": f"the checkpoint of {selection}",
        "both": f"the last epoch (`test/`) and {selection} (`test_best/`, its epoch "
        f"`{schema.BEST_EPOCH}`)",
    }[checkpoint]


def for_checkpoint(metrics: list[str], checkpoint: str) -> list[str]:
    """Test and transfer metrics of the last epoch, of the best one, or both side by side (the
    best epoch last); other metrics as they are."""
    chosen: list[str] = []
    for metric in metrics:
        tested = metric.startswith(TESTED_SPLITS)
        if checkpoint in ("last", "both") or not tested:
            chosen.append(metric)
        if checkpoint in ("best", "both") and tested:
            chosen.append(schema.best(metric))
    if checkpoint != "last" and any(m.startswith(TESTED_SPLITS) for m in metrics):
        chosen.append(schema.BEST_EPOCH)
    return list(dict.fromkeys(chosen))


@dataclass
class AblationTable:
    """`stats` has one row per (variant, metric): mean, std, n, diff, p_value, n_paired, best."""

    stats: pd.DataFrame
    reference: str
    variants: list[str]
    metrics: list[str]
    seeds: dict[str, int]  # finished seeds per variant

    def cell(self, variant: str, metric: str) -> pd.Series:
        return self.stats.loc[(variant, metric)]


def seed_values(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Finished runs' values of `metric` as a variant x seed table (NaN where missing)."""
    finished = runs[runs["status"] == "FINISHED"]
    column = schema.metric_column(metric)
    if column not in finished:
        return pd.DataFrame()
    values = finished[[VARIANT, SEED, column]].dropna()
    return values.pivot_table(index=VARIANT, columns=SEED, values=column, aggfunc="mean")


def paired_test(variant: pd.Series, reference: pd.Series) -> tuple[float, float, int]:
    """Mean difference and two-sided paired t-test p-value over the seeds both have."""
    shared = variant.dropna().index.intersection(reference.dropna().index)
    if len(shared) == 0:
        return np.nan, np.nan, 0
    differences = variant[shared] - reference[shared]
    p_value = np.nan
    if len(shared) >= 2 and differences.std(ddof=1) > 0:
        p_value = float(stats.ttest_rel(variant[shared], reference[shared]).pvalue)
    return float(differences.mean()), p_value, len(shared)


def ablation_table(
    runs: pd.DataFrame,
    metrics: list[str],
    reference: str = schema.REFERENCE,
    order: list[str] | None = None,
) -> AblationTable:
    finished = runs[runs["status"] == "FINISHED"]
    present = list(dict.fromkeys(finished[VARIANT])) if not finished.empty else []
    default = [reference] + sorted(v for v in present if v != reference)
    variants = [v for v in (order or default) if v in present]
    variants += [v for v in sorted(present) if v not in variants]
    rows = []
    for metric in metrics:
        table = seed_values(runs, metric)
        if table.empty:
            continue
        for variant in variants:
            rows.append(metric_row(table, variant, metric, reference))
    frame = pd.DataFrame(rows).set_index(["variant", "metric"]) if rows else pd.DataFrame()
    kept = list(dict.fromkeys(frame.index.get_level_values("metric"))) if rows else []
    if rows:
        mark_best(frame)
    seeds = finished.groupby(VARIANT)[SEED].nunique().to_dict() if present else {}
    return AblationTable(frame, reference, variants, kept, seeds)


def metric_row(table: pd.DataFrame, variant: str, metric: str, reference: str) -> dict:
    values = table.loc[variant] if variant in table.index else pd.Series(dtype=float)
    row = {
        "variant": variant,
        "metric": metric,
        "mean": values.mean(),
        "std": values.std(ddof=1),
        "n": int(values.notna().sum()),
        "diff": np.nan,
        "p_value": np.nan,
        "n_paired": 0,
    }
    if variant != reference and reference in table.index:
        row["diff"], row["p_value"], row["n_paired"] = paired_test(values, table.loc[reference])
    return row


def mark_best(frame: pd.DataFrame) -> None:
    frame["best"] = False
    for metric in frame.index.get_level_values("metric").unique():
        if not ranked(metric):
            continue
        means = frame.xs(metric, level="metric")["mean"]
        if means.notna().any():
            best = means.idxmax() if higher_is_better(metric) else means.idxmin()
            frame.loc[(best, metric), "best"] = True


# --- rendering ------------------------------------------------------------------------------

ATTACK_LABELS = {"clean": "Clean", "fgsm": "FGSM", "cw": "CW-inf", "autoattack": "AutoAttack"}
STRUCTURE_LABELS = {
    schema.CKA_CLEAN: "CKA (clean)",
    schema.CKA_ADVERSARIAL: "CKA (adversarial)",
    schema.CLASS_CORR_DIFF: "Class-corr. diff.",
}
FAMILY_LABELS = {"test": "", "val": "Val. ", "transfer": "Transfer "}
HEADERS = ("labels", "keys")
SIGNIFICANCE = ("text", "marks", "none")


def steps_of(runs: pd.DataFrame, key: str) -> str | None:
    """The one value of a logged parameter over the runs (e.g. `eval.pgd_steps`), if one."""
    column = schema.param_column(key)
    values = set(runs[column].dropna()) if column in runs else set()
    return values.pop() if len(values) == 1 else None


def column_label(metric: str, runs: pd.DataFrame) -> str:
    """A header a paper can take: `test/pgd_acc` -> `PGD-20`, `test_best/cw_acc` ->
    `CW-inf (best)`, `transfer/clean_acc` -> `Transfer Clean`; unknown names stay as they are."""
    if metric == schema.BEST_EPOCH:
        return "Best epoch"
    family, _, name = metric.partition("/")
    best = family.endswith(schema.BEST)
    family = family.removesuffix(schema.BEST)
    if family not in FAMILY_LABELS:
        return metric
    if name.endswith("_acc") and name.removesuffix("_acc") in ATTACK_LABELS:
        label = ATTACK_LABELS[name.removesuffix("_acc")]
    elif name == "pgd_acc":
        steps = steps_of(runs, "eval.val_steps" if family == "val" else "eval.pgd_steps")
        label = f"PGD-{steps}" if steps else "PGD"
    elif name in STRUCTURE_LABELS:
        label = STRUCTURE_LABELS[name]
    else:
        return metric
    return FAMILY_LABELS[family] + label + (" (best)" if best else "")


def significance_mark(p_value: float) -> str:
    if np.isnan(p_value):
        return ""
    return "**" if p_value < 0.01 else "*" if p_value < 0.05 else ""


def significance_note(reference: str, style: str) -> str:
    """What the cells' brackets or marks mean, for under the table."""
    test = f"two-sided paired t-test against `{reference}` over the seeds both ran"
    if style == "marks":
        return f"\\* p < 0.05, \\*\\* p < 0.01: {test}."
    return f"(difference, p): mean difference to `{reference}` and the {test}."


def cell_text(
    row: pd.Series, is_reference: bool, digits: int, pm: str, significance: str = "text"
) -> str:
    """`mean ± std`, then against the reference: `(diff, p=...)` (`text`), a `*`/`**` mark
    for p < 0.05 / 0.01 (`marks`), or nothing (`none`)."""
    if row["n"] == 0:
        return "-"
    text = f"{row['mean']:.{digits}f}"
    if row["n"] > 1:
        text += f" {pm} {row['std']:.{digits}f}"
    if is_reference or np.isnan(row["diff"]):
        return text
    if significance == "text":
        p_value = "n/a" if np.isnan(row["p_value"]) else f"{row['p_value']:.3f}"
        text += f" ({row['diff']:+.{digits}f}, p={p_value})"
    elif significance == "marks":
        text += significance_mark(row["p_value"])
    return text


def display_frame(
    table: AblationTable, digits: int, pm: str, bold, significance: str = "text", labels=None
) -> pd.DataFrame:
    """Strings: one row per variant, one column per metric (headed by `labels[metric]` when
    given), then the seed count `n`."""
    frame = pd.DataFrame(index=pd.Index(table.variants, name="variant"))
    for metric in table.metrics:
        column = []
        for variant in table.variants:
            row = table.cell(variant, metric)
            text = cell_text(row, variant == table.reference, digits, pm, significance)
            column.append(bold(text) if row["best"] else text)
        frame[(labels or {}).get(metric, metric)] = column
    frame["n"] = [table.seeds.get(variant, 0) for variant in table.variants]
    return frame


def to_markdown(
    table: AblationTable, digits: int = 3, significance: str = "text", labels=None
) -> str:
    frame = display_frame(table, digits, "±", lambda text: f"**{text}**", significance, labels)
    return frame.to_markdown(colalign=["left"] + ["right"] * len(frame.columns))


def to_latex(table: AblationTable, digits: int = 3, significance: str = "text", labels=None) -> str:
    """A booktabs tabular; metric names and variants escaped for LaTeX."""
    frame = display_frame(
        table, digits, r"$\pm$", lambda text: rf"\textbf{{{text}}}", significance, labels
    )
    styler = frame.style.format_index(escape="latex", axis=0).format_index(escape="latex", axis=1)
    styler = styler.format(lambda value: str(value).replace("%", r"\%"))
    styler = styler.hide(axis="index", names=True)  # one header row, not a second for "variant"
    return styler.to_latex(hrules=True, column_format="l" + "r" * len(frame.columns))


def to_csv(table: AblationTable, digits: int = 3, significance: str = "text", labels=None) -> str:
    """Tidy: one row per variant and metric (its key), unrounded."""
    return table.stats.reset_index().to_csv(index=False)


RENDERERS = {"md": to_markdown, "latex": to_latex, "csv": to_csv}


# --- a search -------------------------------------------------------------------------------


STANDARD_ERROR = "se"


def standard_error(accuracy: pd.Series, samples: pd.Series) -> pd.Series:
    """Binomial standard error `sqrt(p (1 - p) / n)` of accuracies measured on n images."""
    return np.sqrt(accuracy * (1 - accuracy) / samples)


def full_budget_trials(runs: pd.DataFrame) -> pd.DataFrame:
    if runs.empty:
        return runs
    return runs[
        (runs["status"] == "FINISHED")
        & (runs.get(schema.tag_column(schema.TAG_FULL_BUDGET)) == schema.flag(True))
    ]


def top_trials(runs: pd.DataFrame, metric: str, maximize: bool, top: int = 10) -> pd.DataFrame:
    """The best `top` trials that ran their full budget, with the values they were given; an
    accuracy on validation has its standard error beside it (`se`, from `val/samples`)."""
    column = schema.metric_column(metric)
    full = full_budget_trials(runs)
    if full.empty or column not in full:
        return pd.DataFrame()
    best_first = full.sort_values(column, ascending=not maximize).head(top)
    overrides = pd.DataFrame(
        best_first[schema.tag_column(schema.TAG_OVERRIDES)].map(json.loads).tolist(),
        index=best_first.index,
    )
    trials = best_first[["run_name", column]].rename(columns={column: metric})
    entry = schema.tag_column(schema.TAG_ENTRY)
    if entry in best_first:  # a comparison's searches: each trial's method entry
        trials.insert(1, "method", best_first[entry])
    samples = schema.metric_column(schema.VAL_SAMPLES)
    if metric.startswith("val/") and metric.endswith("_acc") and samples in best_first:
        trials[STANDARD_ERROR] = standard_error(best_first[column], best_first[samples])
    table = pd.concat([trials, overrides], axis=1)
    table.insert(0, "rank", range(1, len(table) + 1))
    return table.set_index("rank")


# --- command line ---------------------------------------------------------------------------


def render_study(
    study: Study,
    metrics: list[str] | None,
    reference: str,
    fmt: str,
    top: int,
    checkpoint: str = "last",
    headers: str = "keys",
    significance: str = "text",
) -> str:
    """The ablation's table (for `checkpoint`: last, best or both), or a search's best
    full-budget trials, in `fmt`; headed by metric keys or by `labels` (`PGD-20`); an
    ablation's differences to the reference as text, marks or not at all (`significance`)."""
    if study.mode in ("search", "compare"):  # a comparison's searches: its first stage
        table = top_trials(study.runs, study.metric, study.maximize, top)
        if table.empty:
            raise StudyNotFoundError(f"study {study.name!r}: no trial ran its full budget")
        if headers == "labels":
            table = table.rename(columns=lambda name: column_label(name, study.runs))
        if fmt == "latex":
            styler = table.style.format_index(escape="latex", axis=1)
            return styler.format(precision=4).to_latex(hrules=True)
        # Searched values to 4 significant digits (a log-uniform lr of 0.0123456789...).
        return table.to_markdown(floatfmt=".4g") if fmt == "md" else table.to_csv()
    chosen = for_checkpoint(metrics or default_metrics(study.runs), checkpoint)
    table = ablation_table(study.runs, chosen, reference, order=study.variants)
    if table.stats.empty:
        raise StudyNotFoundError(f"study {study.name!r}: no finished run has {chosen}")
    labels = {m: column_label(m, study.runs) for m in chosen} if headers == "labels" else None
    text = RENDERERS[fmt](table, significance=significance, labels=labels)
    # What the marks mean, under a Markdown table (brackets say it themselves).
    note = significance_note(reference, significance) if fmt == "md" else ""
    return text + (f"\n\n{note}" if note and significance == "marks" else "")


def default_metrics(runs: pd.DataFrame) -> list[str]:
    """The last epoch's test accuracies in attack order, then its structural and transfer
    metrics, if logged (`for_checkpoint` gives the best epoch's)."""
    logged = schema.metric_columns(runs.columns)
    order = [schema.accuracy("test", name) for name in schema.ATTACKS]
    chosen = [name for name in order if name in logged]
    chosen += sorted(n for n in logged if n.startswith(TESTED_SPLITS) and n not in chosen)
    # Runs kept off the test split (study.confirm) are compared on validation.
    return chosen or [name for name in (schema.VAL_CLEAN_ACC, schema.VAL_PGD_ACC) if name in logged]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.table",
        description="An ablation's table (mean ± std over seeds, paired tests against the "
        "reference, best marked) or a search's best full-budget trials.",
    )
    add_store_arguments(parser)
    parser.add_argument(
        "--metrics",
        nargs="+",
        help="metric keys, e.g. test/pgd_acc transfer/clean_acc (default: every test accuracy, "
        "then the structure and transfer metrics logged)",
    )
    add_checkpoint_argument(parser)
    parser.add_argument(
        "--reference",
        help="the variant others are compared to (default: the study's reference, full)",
    )
    parser.add_argument(
        "--format",
        choices=sorted(RENDERERS),
        default="md",
        help="Markdown, LaTeX (booktabs) or tidy CSV (one row per variant and metric, "
        "unrounded, metric keys) (default: %(default)s)",
    )
    parser.add_argument(
        "--headers",
        choices=HEADERS,
        default="labels",
        help="column headers a paper can take (PGD-20, CW-inf (best)) or the metric keys "
        "(test/pgd_acc) (default: %(default)s)",
    )
    parser.add_argument(
        "--significance",
        choices=SIGNIFICANCE,
        default="text",
        help="an ablation's comparison with the reference in each cell: (difference, p=...), "
        "a mark (* p<0.05, ** p<0.01), or none (default: %(default)s)",
    )
    parser.add_argument(
        "--top", type=int, default=10, help="trials shown for a search (default: %(default)s)"
    )
    parser.add_argument("--out", help="write to this file instead of printing (default: print)")
    args = parser.parse_args(argv)

    def tabulate(study: Study) -> int:
        text = render_study(
            study,
            args.metrics,
            args.reference or study.reference,
            args.format,
            args.top,
            args.checkpoint,
            args.headers,
            args.significance,
        )
        if args.out:
            Path(args.out).write_text(text + "\n")
        else:
            print(text)
        return 0

    return run_with_study(args, tabulate)


if __name__ == "__main__":
    sys.exit(main())
