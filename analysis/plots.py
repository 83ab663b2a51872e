"""A study's pictures, as PNG files drawn by matplotlib (no browser needed):

- `pareto.png`: clean against robust accuracy, the Pareto front drawn through the points no
  other point beats on both (ablation: test split, mean and std over seeds per variant, at the
  last epoch's checkpoint, `pareto_best.png` at the best validation epoch's; search:
  validation split, one point per full-budget trial);
- `curves.png`: per-epoch validation curves (ablation: mean over seeds per variant; search: one
  line per trial, dashed where a scheduler stopped it);
- `params.png` (search): each searched parameter against the study's metric;
- `importance.png` (search): the importances with their intervals, drawn here but written by
  `analysis.importance --out` and `analysis.report` (they compute them from the Optuna study).

Every line or point of its own has a colour of its own (up to 20 distinct, then a continuous
map), legends sit beside the axes rather than over the data, and a searched parameter's axis
is logarithmic exactly where its search space is (`loguniform`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.runs import (  # noqa: E402
    Study,
    add_store_arguments,
    metric_histories,
    run_json,
    run_with_study,
)
from gacd import schema  # noqa: E402

FIGURE_SIZE = (8.0, 5.0)  # inches at DPI: 800 x 500 pixels per panel row
DPI = 100


def colours(count: int) -> list:
    """`count` distinct colours: tab10 / tab20's, then evenly spaced on a continuous map."""
    if count <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(count)]
    if count <= 20:
        return [plt.get_cmap("tab20")(i) for i in range(count)]
    return [plt.get_cmap("turbo")(i) for i in np.linspace(0.05, 0.95, count)]


def legend_beside(axis, **options) -> None:
    """The legend outside the axes on the right, where it covers no data."""
    if axis.get_legend_handles_labels()[0]:
        axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, **options)


def search_distributions(study: Study) -> dict[str, str]:
    """Each searched key's distribution (`loguniform`, `uniform`, `choice`, `int`), from the
    resolved study the parent run holds (`study.json`); empty if it is not there."""
    spec = run_json(study.tracking_uri, study.parent_run_id, schema.STUDY_ARTIFACT) or {}
    return {key: value.get("distribution") for key, value in spec.get("search", {}).items()}


def figure(rows: int = 1, columns: int = 1):
    width, height = FIGURE_SIZE
    fig, axes = plt.subplots(rows, columns, figsize=(width, height * rows), dpi=DPI, squeeze=False)
    return fig, list(axes.flat)


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def pareto_front(points: np.ndarray) -> np.ndarray:
    """Indices of the points [N, 2] that no other point beats or equals on both (maximising)."""
    front = []
    for i, point in enumerate(points):
        dominated = np.any(np.all(points >= point, axis=1) & np.any(points > point, axis=1))
        if not dominated:
            front.append(i)
    return np.array(front, dtype=int)


def accuracy_points(study: Study, checkpoint: str = "last") -> tuple[pd.DataFrame, str, str]:
    """(points with `clean`, `robust`, `clean_std`, `robust_std` per label, x name, y name);
    an ablation's at the last epoch's checkpoint or at the best validation epoch's."""
    runs = study.runs[study.runs["status"] == "FINISHED"]
    if study.mode == "ablation":
        split = (
            "test" if schema.metric_column(schema.accuracy("test", "pgd")) in runs else "val"
        )  # val: study.confirm
        if split == "test" and checkpoint == "best":
            split = "test" + schema.BEST
        clean, robust = f"{split}/clean_acc", f"{split}/pgd_acc"
        grouped = runs.groupby(schema.tag_column(schema.TAG_VARIANT))[
            [schema.metric_column(clean), schema.metric_column(robust)]
        ]
        means, stds = grouped.mean(), grouped.std(ddof=1)
    else:
        clean, robust = schema.VAL_CLEAN_ACC, schema.VAL_PGD_ACC
        runs = runs[
            runs.get(schema.tag_column(schema.TAG_FULL_BUDGET)) == schema.flag(True)
        ].set_index("run_name")
        means = runs[[schema.metric_column(clean), schema.metric_column(robust)]]
        stds = means * np.nan
    points = pd.DataFrame(
        {
            "clean": means[schema.metric_column(clean)],
            "robust": means[schema.metric_column(robust)],
            "clean_std": stds[schema.metric_column(clean)],
            "robust_std": stds[schema.metric_column(robust)],
        }
    ).dropna(subset=["clean", "robust"])
    return points, clean, robust


def plot_pareto(study: Study, path: Path, checkpoint: str = "last") -> Path:
    points, clean, robust = accuracy_points(study, checkpoint)
    fig, (axis,) = figure()
    palette = colours(len(points))
    # Labels alternate above and below their points, in order of robust accuracy, so that
    # neighbours do not print over each other.
    ranked = points["robust"].rank(method="first").to_numpy()
    for (label, row), colour, rank in zip(points.iterrows(), palette, ranked, strict=True):
        axis.errorbar(
            row["clean"],
            row["robust"],
            xerr=0 if np.isnan(row["clean_std"]) else row["clean_std"],
            yerr=0 if np.isnan(row["robust_std"]) else row["robust_std"],
            fmt="o",
            capsize=3,
            color=colour,
        )
        axis.annotate(
            str(label),
            (row["clean"], row["robust"]),
            fontsize=8,
            color=colour,
            xytext=(5, 5 if rank % 2 else -11),
            textcoords="offset points",
        )
    if len(points):
        front = points.iloc[pareto_front(points[["clean", "robust"]].to_numpy())]
        front = front.sort_values("clean")
        axis.plot(
            front["clean"],
            front["robust"],
            drawstyle="steps-post",
            marker="s",
            markerfacecolor="none",
            markersize=12,
            color="black",
            label="Pareto front",
        )
        legend_beside(axis)
    axis.set_xlabel(clean)
    axis.set_ylabel(robust)
    which = f", {checkpoint} checkpoint" if study.mode == "ablation" else ""
    axis.set_title(f"{study.name}: clean against robust accuracy{which}")
    return save(fig, path)


def plot_curves(study: Study, histories: pd.DataFrame, path: Path, metric: str) -> Path:
    runs = study.runs.set_index("run_id")
    curves = histories[histories["metric"] == metric]
    fig, (axis,) = figure()
    if study.mode == "ablation":
        curves = curves.assign(
            variant=runs.loc[curves["run_id"], schema.tag_column(schema.TAG_VARIANT)].to_numpy()
        )
        groups = list(curves.groupby("variant", sort=False))
        for (variant, part), colour in zip(groups, colours(len(groups)), strict=True):
            mean = part.groupby("step")["value"].mean()
            axis.plot(mean.index, mean.to_numpy(), marker=".", label=variant, color=colour)
    else:
        groups = list(curves.groupby("run_id"))
        for (run_id, part), colour in zip(groups, colours(len(groups)), strict=True):
            full = runs.loc[run_id].get(schema.tag_column(schema.TAG_FULL_BUDGET)) == schema.flag(
                True
            )
            axis.plot(
                part["step"],
                part["value"],
                linestyle="-" if full else "--",
                color=colour,
                label=runs.loc[run_id, "run_name"],
            )
    axis.set_xlabel("epoch")
    axis.set_ylabel(metric)
    axis.set_title(f"{study.name}: {metric} per epoch")
    legend_beside(axis, fontsize=7, ncol=1 if len(groups) <= 20 else 2)
    return save(fig, path)


def plot_params(study: Study, path: Path) -> Path:
    """Each searched value (from the runs' `overrides` tags) against the study's metric."""
    return save(params_figure(study), path)


def params_figure(study: Study):
    runs = study.runs[study.runs["status"] == "FINISHED"]
    values = pd.DataFrame(
        runs[schema.tag_column(schema.TAG_OVERRIDES)].map(json.loads).tolist(), index=runs.index
    )
    metric = runs[schema.metric_column(study.metric)]
    full = runs.get(schema.tag_column(schema.TAG_FULL_BUDGET)) == schema.flag(True)
    distributions = search_distributions(study)
    fig, axes = figure(len(values.columns))
    for axis, name in zip(axes, values.columns, strict=True):
        column = pd.to_numeric(values[name], errors="coerce")
        x = column if column.notna().all() else values[name].astype(str)
        axis.scatter(x[full], metric[full], label="full budget")
        axis.scatter(x[~full], metric[~full], marker="x", label="stopped early")
        if distributions.get(name) == "loguniform":
            axis.set_xscale("log")
        axis.set_xlabel(f"{name} ({distributions.get(name) or 'searched'})")
        axis.set_ylabel(f"{study.metric} (last epoch)")
        legend_beside(axis, fontsize=7)
    return fig


def plot_importance(table: pd.DataFrame, path: Path) -> Path:
    """Horizontal bars per evaluator with their intervals, named in each title."""
    evaluators = list(dict.fromkeys(table["evaluator"]))
    fig, axes = figure(len(evaluators))
    for axis, name in zip(axes, evaluators, strict=True):
        part = table[table["evaluator"] == name].sort_values("importance")
        errors = [part["importance"] - part["ci_low"], part["ci_high"] - part["importance"]]
        axis.barh(part["param"], part["importance"], xerr=np.clip(errors, 0, None), capsize=3)
        axis.set_title(
            f"{name} ({part['trials'].iloc[0]} full-budget trials)\n{part['interval'].iloc[0]}"
        )
        axis.set_xlabel("importance (normalised)")
    return save(fig, path)


def has_best_metrics(study: Study) -> bool:
    needed = (schema.accuracy("test", "clean"), schema.accuracy("test", "pgd"))
    return all(schema.metric_column(schema.best(name)) in study.runs for name in needed)


def write_plots(
    study: Study, out: Path, importance: pd.DataFrame | None = None, checkpoint: str = "last"
) -> list[Path]:
    """The study's pictures; an ablation's Pareto plot for the last epoch's checkpoint
    (`pareto.png`), the best validation epoch's (`pareto_best.png`), or both."""
    out.mkdir(parents=True, exist_ok=True)
    histories = metric_histories(study.tracking_uri, study.runs)
    shown = ["last", "best"] if checkpoint == "both" else [checkpoint]
    if study.mode != "ablation" or not has_best_metrics(study):
        shown = ["last"]
    written = [
        plot_pareto(study, out / f"pareto{'_best' if which == 'best' else ''}.png", which)
        for which in shown
    ]
    written.append(plot_curves(study, histories, out / "curves.png", schema.VAL_PGD_ACC))
    if study.mode == "search":
        written.append(plot_params(study, out / "params.png"))
        if importance is not None and not importance.empty:
            written.append(plot_importance(importance, out / "importance.png"))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.plots", description=__doc__)
    add_store_arguments(parser)
    parser.add_argument("--out", required=True, help="folder for the PNG files (made if missing)")
    parser.add_argument(
        "--checkpoint",
        choices=("last", "best", "both"),
        default="last",
        help="an ablation's Pareto plot at the last epoch, the epoch of best val/pgd_acc, or both "
        "(default: %(default)s)",
    )
    args = parser.parse_args(argv)

    def plot(study: Study) -> int:
        written = write_plots(study, Path(args.out), checkpoint=args.checkpoint)
        for path in written:
            print(path)
        return 0

    return run_with_study(args, plot)


if __name__ == "__main__":
    sys.exit(main())
