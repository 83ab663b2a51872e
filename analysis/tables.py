"""Ablation tables: one row per variant, mean +/- std of each metric over seeds."""

from __future__ import annotations

import pandas as pd

VARIANT_COLUMN = "tags.variant"


def seed_summary(
    runs: pd.DataFrame, metric_names: list[str], order: list[str] | None = None
) -> pd.DataFrame:
    """Per variant and metric: mean, sample std (ddof 1) and n, over the finished runs' seeds.

    Columns are a MultiIndex `(metric, mean|std|n)`; rows follow `order` (default: sorted),
    variants with no finished run left out.
    """
    finished = runs[runs["status"] == "FINISHED"]
    present = set(finished[VARIANT_COLUMN])
    order = [name for name in order or sorted(present) if name in present]
    columns = [f"metrics.{name}" for name in metric_names if f"metrics.{name}" in finished]
    grouped = finished.groupby(VARIANT_COLUMN, sort=False)[columns]
    summary = grouped.agg(["mean", "std", "count"]).reindex(order)
    summary.columns = pd.MultiIndex.from_tuples(
        [
            (metric.removeprefix("metrics."), {"count": "n"}.get(stat, stat))
            for metric, stat in summary.columns
        ]
    )
    summary.index.name = "variant"
    return summary


def mean_std_strings(summary: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """`0.812 ± 0.013` per cell (std omitted with one seed), with the seed count as `n`."""
    table = pd.DataFrame(index=summary.index)
    metric_names = list(dict.fromkeys(summary.columns.get_level_values(0)))
    for name in metric_names:
        mean, std = summary[(name, "mean")], summary[(name, "std")]
        table[name] = [
            f"{m:.{digits}f}" + ("" if pd.isna(s) else f" ± {s:.{digits}f}")
            for m, s in zip(mean, std, strict=True)
        ]
    if metric_names:
        table["n"] = summary[(metric_names[0], "n")].astype(int)
    return table
