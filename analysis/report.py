"""A study in one Markdown page: its table, its pictures and (for a search) the importance of
its parameters; `--log` also stores the page and pictures on the study's MLflow run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from analysis.plots import has_best_metrics, write_plots
from analysis.runs import (
    Study,
    StudyNotFoundError,
    add_store_arguments,
    require_store,
    run_with_study,
)
from analysis.table import (
    STANDARD_ERROR,
    add_checkpoint_argument,
    checkpoint_caption,
    full_budget_trials,
    render_study,
    top_trials,
)
from gacd import schema

REPORT_FILE = "report.md"
HTML_REPORT_FILE = "report.html"
PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; max-width: 80em; color: #222; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
code { background: #f4f4f4; padding: 0 0.2em; }
img { max-width: 100%; margin: 0.5em 0; }
"""


def search_importance(study: Study, optuna_url: str | None) -> tuple[pd.DataFrame | None, str]:
    """Importance of a search's parameters, or None and why not (its Optuna study is not at
    hand, has too few full-budget trials, or they all scored the same)."""
    if study.mode != "search" or optuna_url is None:
        return None, "it needs the search's Optuna storage"
    import optuna

    from analysis.importance import importance_table

    try:
        require_store(optuna_url, "Optuna storage")
        optuna_study = optuna.load_study(study_name=study.name, storage=optuna_url)
        return importance_table(optuna_study, resamples=30), ""
    except StudyNotFoundError as error:
        return None, str(error)
    except KeyError:
        return None, f"no Optuna study {study.name!r} in the storage"
    except ValueError as error:
        return None, str(error)


def ablation_section(study: Study, checkpoint: str) -> list[str]:
    """The ablation's table for one checkpoint; an empty list when its runs have no such
    metrics (runs of a version without best-epoch metrics, or kept off the test split)."""
    if checkpoint == "best" and not has_best_metrics(study):
        return []  # it would show the last epoch's validation table again, as "best"
    try:
        table = render_study(
            study, None, study.reference, "md", top=10, checkpoint=checkpoint, headers="labels"
        )
    except LookupError:
        return []
    tested = any(name.startswith("test") for name in schema.metric_columns(study.runs.columns))
    split = "Test" if tested else "Validation"
    return [
        f"## {split} split, {checkpoint} checkpoint, mean ± std over seeds",
        "",
        f"Each run evaluated at {checkpoint_caption(checkpoint)}. Each cell: mean ± sample "
        "std over the seeds that finished; in brackets the mean difference to "
        f"`{study.reference}` over the seeds both ran and the two-sided paired t-test's "
        "p-value; the best mean per column in bold; `n` the variant's finished seeds.",
        "",
        table,
        "",
    ]


def teacher_section(study: Study) -> list[str]:
    """The teacher's own test metrics (its run in MLflow, linked from the study's run), so
    that the students' rows can be read against the model they distil."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(study.tracking_uri)
    teacher_run = client.get_run(study.parent_run_id).data.tags.get(schema.TAG_TEACHER_RUN)
    if teacher_run is None:
        return []
    run = client.get_run(teacher_run)
    shown = {
        name: value
        for name, value in sorted(run.data.metrics.items())
        if name.split("/")[0] in ("test", "test" + schema.BEST)
    }
    if not shown:
        return []
    params = run.data.params
    model = f"{params.get('method')}, {params.get('student.arch')}"
    width = params.get("student.width")
    model += f" width {float(width):g}" if width not in (None, "None") else ""
    table = pd.DataFrame([shown], index=["teacher"]).to_markdown(floatfmt=".3f")
    return [
        "## The teacher",
        "",
        f"{model}, {params.get('optim.epochs')} epochs (MLflow run `{teacher_run}`); its test "
        "metrics, measured as the students' are:",
        "",
        table,
        "",
        *against_teacher(study, shown),
    ]


def against_teacher(study: Study, teacher: dict[str, float]) -> list[str]:
    """Which variants' mean passes the teacher's own value of the study's metric on the test
    split (`val/pgd_acc` or `test/pgd_acc` -> `test/pgd_acc`, the last epoch's): a student
    that passes its teacher learnt that from the labels, not from the model it distils, and a
    distilled student's gap to such a method is read against a teacher weaker than it."""
    split, _, rest = study.metric.partition("/")
    if split not in ("val", "test"):
        return []
    name = "test/" + rest
    column = schema.metric_column(name)
    variant = schema.tag_column(schema.TAG_VARIANT)
    if name not in teacher or study.runs.empty or not {column, variant} <= set(study.runs):
        return []
    means = study.runs.groupby(variant)[column].mean().dropna()
    level = teacher[name]
    passing = means[means > level] if study.maximize else means[means < level]
    word = "above" if study.maximize else "below"
    if passing.empty:
        return [f"No variant's mean `{name}` is {word} the teacher's ({level:.3f}).", ""]
    named = ", ".join(
        f"{v} ({m:.3f})" for v, m in passing.sort_values(ascending=not study.maximize).items()
    )
    return [
        f"**{word.capitalize()} the teacher's `{name}` ({level:.3f}):** {named}. A student "
        "that passes its teacher learnt that from the labels, not from the model it distils: "
        "a distilled method's gap to these rows is partly its teacher's.",
        "",
    ]


def search_noise(study: Study) -> list[str]:
    """How far apart the trials are against how precisely each was measured."""
    trials = top_trials(study.runs, study.metric, study.maximize, top=10_000)
    if trials.empty or STANDARD_ERROR not in trials:
        return []
    samples = full_budget_trials(study.runs)[schema.metric_column(schema.VAL_SAMPLES)].median()
    spread = trials[study.metric].std(ddof=1)
    return [
        f"`{STANDARD_ERROR}`: the binomial standard error `sqrt(p (1 - p) / n)` of each value, "
        f"measured on n = {samples:.0f} validation images. Median standard error "
        f"{trials[STANDARD_ERROR].median():.3f} against a spread (std) of "
        f"{spread:.3f} across the {len(trials)} full-budget trials"
        + (
            ": trials closer than about two standard errors are not told apart."
            if len(trials) > 1
            else "."
        ),
        "",
    ]


def write_report(
    study: Study, out: Path, optuna_url: str | None = None, checkpoint: str = "both"
) -> Path:
    """`report.md` and its pictures in `out`; an ablation's tables for the last epoch's
    checkpoint, the best validation epoch's, or both."""
    out.mkdir(parents=True, exist_ok=True)
    importance, missing = search_importance(study, optuna_url)
    pictures = write_plots(study, out, importance, checkpoint)
    finished = (study.runs["status"] == "FINISHED").sum() if not study.runs.empty else 0
    lines = [
        f"# {study.name}",
        "",
        f"{'An' if study.mode == 'ablation' else 'A'} {study.mode} study: "
        f"{len(study.runs)} trials ({finished} finished), "
        f"metric `{study.metric}` ({study.direction}); MLflow run `{study.parent_run_id}` "
        f"in `{study.tracking_uri}`.",
        "",
    ]
    if study.mode == "ablation":
        lines += teacher_section(study)
        for shown in ("last", "best") if checkpoint == "both" else (checkpoint,):
            lines += ablation_section(study, shown)
    else:
        lines += [
            "## Best full-budget trials (validation split)",
            "",
            render_study(study, None, study.reference, "md", top=10, headers="labels"),
            "",
            *search_noise(study),
        ]
        if importance is None:
            lines += [
                "",
                f"Parameter importance: not computed ({missing}; see "
                "`python -m analysis.importance`).",
            ]
        else:
            lines += [
                "",
                "## Parameter importance",
                "",
                f"Over the {importance['trials'].iloc[0]} full-budget trials, normalised, with "
                "95% symmetric subsampling intervals (up to 30 subsets of about half the trials, "
                "drawn without replacement; column `interval`); PED-ANOVA and fANOVA can disagree.",
                "",
                importance.to_markdown(index=False, floatfmt=".3f"),
            ]
    lines += ["", "## Pictures", ""]
    lines += [f"![{path.stem}]({path.name})" for path in pictures]
    report = out / REPORT_FILE
    report.write_text("\n".join(lines) + "\n")
    write_html(report, out / HTML_REPORT_FILE, study.name)
    return report


def write_html(markdown_file: Path, html_file: Path, title: str) -> Path:
    """The Markdown report as one HTML page with its pictures embedded (data URIs): MLflow's
    artifact view renders HTML but resolves no relative image in Markdown."""
    import base64
    import html

    import markdown

    body = markdown.markdown(markdown_file.read_text(), extensions=["tables"])
    for picture in sorted(markdown_file.parent.glob("*.png")):
        encoded = base64.b64encode(picture.read_bytes()).decode("ascii")
        body = body.replace(f'src="{picture.name}"', f'src="data:image/png;base64,{encoded}"')
    page = (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}'
        f"</title><style>{PAGE_STYLE}</style></head><body>\n{body}\n</body></html>\n"
    )
    html_file.write_text(page)
    return html_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__)
    add_store_arguments(parser)
    parser.add_argument("--out", required=True, help="folder for report.md and its pictures")
    parser.add_argument(
        "--optuna-storage", help="a search's Optuna database, for importance (optional)"
    )
    parser.add_argument(
        "--log", action="store_true", help="also log the report to the study's MLflow run"
    )
    add_checkpoint_argument(parser, default="both")
    args = parser.parse_args(argv)

    def report(study: Study) -> int:
        page = write_report(study, Path(args.out), args.optuna_storage, args.checkpoint)
        if args.log:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(study.tracking_uri)
            client.log_artifacts(study.parent_run_id, str(page.parent), "report")
        print(page)
        return 0

    return run_with_study(args, report)


if __name__ == "__main__":
    sys.exit(main())
