"""analysis/ on a real MLflow store (SQLite) filled through MLflow's client with known values."""

from __future__ import annotations

import base64
import io
import json
import re
import struct

import numpy as np
import optuna
import pandas as pd
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from scipy import stats

from analysis import export, importance, plots, report, table
from analysis.runs import load_study
from gacd import schema

PGD = {  # variant -> seed -> test/pgd_acc; b lacks seed 2 (its run failed)
    "full": {0: 0.50, 1: 0.60, 2: 0.70},
    "a": {0: 0.55, 1: 0.62, 2: 0.80},
    "b": {0: 0.40, 1: 0.55},
}
CLEAN = {"full": 0.9, "a": 0.8, "b": 0.95}


@pytest.fixture
def store(tmp_path):
    """An ablation study as `study.run` leaves it: a parent run and one child per trial."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("known", artifact_location=(tmp_path / "a").as_uri())
    tags = {"role": "study", "study": "known", "mode": "ablation", "metric": "test/pgd_acc"}
    tags |= {"direction": "max", "variants": json.dumps(["full", "a", "b"])}
    parent = client.create_run(experiment, tags=tags, run_name="known").info.run_id
    for variant, seeds in PGD.items():
        for seed in (0, 1, 2):
            run_tags = {"role": "trial", "mlflow.parentRunId": parent, "variant": variant}
            run_tags["seed"] = str(seed)
            run = client.create_run(experiment, tags=run_tags, run_name=f"{variant}-{seed}")
            run_id = run.info.run_id
            client.log_param(run_id, "reweight.gamma", {"full": 1, "a": 0, "b": 2}[variant])
            history = [
                Metric("val/pgd_acc", 0.1 * step + seed / 100, 0, step) for step in (1, 2, 3)
            ]
            client.log_batch(run_id, metrics=history)
            if seed in seeds:
                client.log_metric(run_id, "test/pgd_acc", seeds[seed], step=3)
                client.log_metric(run_id, "test/clean_acc", CLEAN[variant] + seed / 100, step=3)
                client.set_terminated(run_id, "FINISHED")
            else:
                client.set_terminated(run_id, "FAILED")
    return uri


def test_the_table_holds_the_numbers_computed_by_hand(store):
    study = load_study(store, "known")
    result = table.ablation_table(study.runs, ["test/pgd_acc", "test/clean_acc"], "full")
    for variant, seeds in PGD.items():
        cell = result.cell(variant, "test/pgd_acc")
        values = np.array(list(seeds.values()))
        assert cell["mean"] == pytest.approx(values.mean())
        assert cell["std"] == pytest.approx(values.std(ddof=1))
        assert cell["n"] == len(values)
    a = result.cell("a", "test/pgd_acc")
    full = np.array([0.50, 0.60, 0.70])
    assert a["diff"] == pytest.approx(np.mean(np.array([0.55, 0.62, 0.80]) - full))
    assert a["p_value"] == pytest.approx(stats.ttest_rel([0.55, 0.62, 0.80], full).pvalue)
    # b misses seed 2: its own n, and the paired test uses only the seeds both ran.
    b = result.cell("b", "test/pgd_acc")
    assert (b["n"], b["n_paired"]) == (2, 2)
    assert b["diff"] == pytest.approx(np.mean([0.40 - 0.50, 0.55 - 0.60]))
    assert b["p_value"] == pytest.approx(stats.ttest_rel([0.40, 0.55], [0.50, 0.60]).pvalue)
    assert result.seeds == {"full": 3, "a": 3, "b": 2}
    assert result.cell("a", "test/pgd_acc")["best"]
    assert result.cell("b", "test/clean_acc")["best"]
    assert result.variants == ["full", "a", "b"]


def test_markdown_latex_and_csv_render_the_same_numbers(store):
    study = load_study(store, "known")
    result = table.ablation_table(study.runs, ["test/pgd_acc"], "full", order=study.variants)
    markdown = table.to_markdown(result)
    a = result.cell("a", "test/pgd_acc")
    expected = f"**{a['mean']:.3f} ± {a['std']:.3f} ({a['diff']:+.3f}, p={a['p_value']:.3f})**"
    assert expected in markdown
    assert "| full " in markdown and "0.600 ± 0.100 " in markdown
    latex = table.to_latex(result)
    assert latex.count(r"\begin{tabular}") == 1 and latex.count(r"\end{tabular}") == 1
    assert r"test/pgd\_acc" in latex and r"$\pm$" in latex and r"\textbf{" in latex
    assert r"\toprule" in latex and latex.count(r"\\") == 4  # header and three variants
    assert latex.count("{") == latex.count("}")
    tidy = pd.read_csv(io.StringIO(table.to_csv(result)))
    row = tidy[(tidy.variant == "a") & (tidy.metric == "test/pgd_acc")].iloc[0]
    assert row["mean"] == pytest.approx(a["mean"]) and row["p_value"] == pytest.approx(a["p_value"])


@pytest.mark.parametrize(
    ("metric", "label"),
    [
        ("test/clean_acc", "Clean"),
        ("test/pgd_acc", "PGD-20"),
        ("test_best/cw_acc", "CW-inf (best)"),
        ("val/pgd_acc", "Val. PGD-5"),
        ("transfer/autoattack_acc", "Transfer AutoAttack"),
        ("test/class_corr_diff", "Class-corr. diff."),
        ("test_best/epoch", "Best epoch"),
        ("train/loss", "train/loss"),
    ],
)
def test_headers_a_paper_can_take(metric, label):
    runs = pd.DataFrame({"params.eval.pgd_steps": ["20", "20"], "params.eval.val_steps": ["5"] * 2})
    assert table.column_label(metric, runs) == label
    mixed = runs.assign(**{"params.eval.pgd_steps": ["20", "10"]})
    assert table.column_label("test/pgd_acc", mixed) == "PGD"  # no one step count to name


def test_significance_as_text_marks_or_nothing(store, capsys):
    study = load_study(store, "known")
    result = table.ablation_table(study.runs, ["test/pgd_acc"], "full", order=study.variants)
    a = result.cell("a", "test/pgd_acc")
    plain = f"{a['mean']:.3f} ± {a['std']:.3f}"
    assert a["p_value"] > 0.05  # a's gain is not significant: no mark
    assert f"**{plain}**" in table.to_markdown(result, significance="marks")
    assert f"**{plain}**" in table.to_markdown(result, significance="none")
    assert "p=" not in table.to_markdown(result, significance="marks")
    assert table.significance_mark(0.004) == "**" and table.significance_mark(0.03) == "*"
    assert table.significance_mark(0.2) == "" and table.significance_mark(float("nan")) == ""
    args = ["--experiment", "known", "--tracking-uri", store, "--significance", "marks"]
    assert table.main(args) == 0
    out = capsys.readouterr().out
    assert "p < 0.05" in out and "paired t-test against `full`" in out and "p=" not in out


def test_table_command_writes_each_format_and_refuses_an_unknown_study(store, tmp_path, capsys):
    out = tmp_path / "table.tex"
    args = ["--experiment", "known", "--tracking-uri", store]
    assert table.main([*args, "--format", "latex", "--out", str(out)]) == 0
    assert r"\begin{tabular}" in out.read_text()
    assert table.main([*args, "--metrics", "test/clean_acc"]) == 0
    assert " Clean |" in capsys.readouterr().out
    assert table.main([*args, "--metrics", "test/clean_acc", "--headers", "keys"]) == 0
    assert "test/clean_acc" in capsys.readouterr().out
    assert table.main(["--experiment", "nope", "--tracking-uri", store]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: no MLflow experiment 'nope'") and error.count("\n") == 1


def test_export_round_trips_through_parquet(store, tmp_path):
    path = tmp_path / "runs.parquet"
    assert export.main(["--experiment", "known", "--tracking-uri", store, "--out", str(path)]) == 0
    written = export.tidy_runs(load_study(store, "known"))
    read = pd.read_parquet(path)
    pd.testing.assert_frame_equal(read, written, check_dtype=False)
    assert len(read) == 9 * 3 + 8 * 2  # 9 runs x 3 epochs of val, 8 finished x 2 test metrics
    final = read[read.final & (read.metric == "val/pgd_acc")]
    assert set(final.step) == {3} and final.run_id.nunique() == 9
    assert set(read["params.reweight.gamma"]) == {"0", "1", "2"}


def png_size(path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def test_plots_and_report_are_written(store, tmp_path):
    study = load_study(store, "known")
    pictures = plots.write_plots(study, tmp_path / "plots")
    assert [p.name for p in pictures] == ["pareto.png", "curves.png"]
    for path in pictures:
        assert path.stat().st_size > 5_000 and png_size(path) == (800, 500)
    page = report.write_report(study, tmp_path / "report").read_text()
    assert "![pareto](pareto.png)" in page and "| a " in page
    # the page MLflow shows: one file, its tables as tables, its pictures inside it
    html = (tmp_path / "report" / "report.html").read_text()
    assert "<table>" in html and re.search(r"<td[^>]*>a</td>", html)
    embedded = re.findall(r'<img alt="(\w+)" src="data:image/png;base64,([^"]+)"', html)
    assert [name for name, _ in embedded] == ["pareto", "curves"]
    for name, data in embedded:
        assert base64.b64decode(data) == (tmp_path / "report" / f"{name}.png").read_bytes()
    assert 'src="pareto.png"' not in html and "![" not in html


@pytest.mark.parametrize(
    "teacher_pgd, line",
    [
        (0.6, "**Above the teacher's `test/pgd_acc` (0.600):** a (0.657). A student that passes"),
        (0.9, "No variant's mean `test/pgd_acc` is above the teacher's (0.900)."),
    ],
)
def test_the_report_names_the_variants_more_robust_than_their_teacher(
    store, tmp_path, teacher_pgd, line
):
    """The teacher's own test metrics come from its MLflow run, linked from the study's; a
    variant whose mean passes them (a: 0.657; full's 0.600 only equals 0.6) is named."""
    client = MlflowClient(store)
    teachers = client.create_experiment("gacd-teachers")
    tags = {"role": "teacher"}
    teacher = client.create_run(teachers, tags=tags, run_name="pgd_at-small_cnn").info.run_id
    client.log_metric(teacher, "test/pgd_acc", teacher_pgd)
    for key, value in {"method": "pgd_at", "student.arch": "small_cnn", "optim.epochs": 12}.items():
        client.log_param(teacher, key, value)
    study = load_study(store, "known")
    client.set_tag(study.parent_run_id, schema.TAG_TEACHER_RUN, teacher)
    page = report.write_report(study, tmp_path / "report").read_text()
    section = page.split("## The teacher")[1].split("\n## ")[0]
    assert teacher in section and "pgd_at, small_cnn, 12 epochs" in section
    assert re.search(rf"\| teacher \| +{teacher_pgd:.3f} \|", section)
    assert line in section


def test_pareto_front_keeps_only_undominated_points():
    points = np.array([[0.9, 0.1], [0.8, 0.5], [0.7, 0.4], [0.5, 0.6], [0.5, 0.6]])
    assert pareto_list(points) == [0, 1, 3, 4]


def pareto_list(points):
    return plots.pareto_front(points).tolist()


def test_importance_ranks_the_parameter_that_matters_over_full_budget_trials_only():
    study = optuna.create_study(direction="maximize")
    rng = np.random.default_rng(0)
    space = {
        "x": optuna.distributions.FloatDistribution(0, 1),
        "y": optuna.distributions.FloatDistribution(0, 1),
    }
    for _ in range(30):
        x, y = rng.random(2)
        study.add_trial(
            optuna.trial.create_trial(
                params={"x": x, "y": y}, distributions=space, value=x + 0.01 * y
            )
        )
    for _ in range(5):  # stopped early: must not count
        study.add_trial(
            optuna.trial.create_trial(
                params={"x": 0.0, "y": 1.0},
                distributions=space,
                state=optuna.trial.TrialState.PRUNED,
                intermediate_values={1: 100.0},
            )
        )
    result = importance.importance_table(study, resamples=10)
    assert set(result.evaluator) == {"ped_anova", "fanova"} and set(result.trials) == {30}
    for name, part in result.groupby("evaluator"):
        by_param = part.set_index("param")
        assert by_param.loc["x", "importance"] > by_param.loc["y", "importance"], name
        assert (part.ci_low <= part.importance + 1e-9).all()
        assert (part.importance <= part.ci_high + 1e-9).all()


def test_importance_of_trials_that_all_scored_the_same_is_refused_by_name():
    study = optuna.create_study(direction="maximize", study_name="flat")
    space = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for x in (0.1, 0.5, 0.9, 0.3):
        study.add_trial(optuna.trial.create_trial(params={"x": x}, distributions=space, value=0.16))
    with pytest.raises(ValueError, match="'flat': all 4 full-budget trials scored 0.16"):
        importance.importance_table(study, resamples=5)


def log_best_epoch_metrics(store):
    """What a final run also logs: its best validation epoch's test metrics (here 0.01 above
    the last epoch's PGD accuracy, from epoch 2)."""
    client = MlflowClient(store)
    study = load_study(store, "known")
    for _, run in study.runs[study.runs.status == "FINISHED"].iterrows():
        pgd = run["metrics.test/pgd_acc"]
        client.log_metric(run.run_id, "test_best/pgd_acc", pgd + 0.01, step=3)
        client.log_metric(run.run_id, "test_best/clean_acc", run["metrics.test/clean_acc"], step=3)
        client.log_metric(run.run_id, "test_best/epoch", 2, step=3)
    return load_study(store, "known")


def test_tables_show_the_last_the_best_or_both_checkpoints_and_say_which(store, tmp_path, capsys):
    study = log_best_epoch_metrics(store)
    metrics = ["test/pgd_acc"]
    assert table.for_checkpoint(metrics, "last") == ["test/pgd_acc"]
    assert table.for_checkpoint(metrics, "best") == ["test_best/pgd_acc", "test_best/epoch"]
    both = table.for_checkpoint(["test/pgd_acc", "val/pgd_acc"], "both")
    assert both == ["test/pgd_acc", "test_best/pgd_acc", "val/pgd_acc", "test_best/epoch"]
    best = table.ablation_table(study.runs, table.for_checkpoint(metrics, "best"), "full")
    assert best.cell("full", "test_best/pgd_acc")["mean"] == pytest.approx(0.61)
    assert best.cell("full", "test_best/epoch")["mean"] == 2
    assert not best.stats.xs("test_best/epoch", level="metric")["best"].any()  # not ranked
    args = ["--experiment", "known", "--tracking-uri", store, "--metrics", "test/pgd_acc"]
    assert table.main([*args, "--checkpoint", "best", "--headers", "keys"]) == 0
    out = capsys.readouterr().out
    assert "test_best/pgd_acc" in out and "test/pgd_acc " not in out
    assert table.main([*args, "--checkpoint", "both"]) == 0
    out = capsys.readouterr().out
    assert " PGD (best) |" in out and " PGD |" in out and " Best epoch |" in out
    page = report.write_report(study, tmp_path / "report").read_text()
    assert "last checkpoint" in page and "best checkpoint" in page
    assert "epoch of best `val/pgd_acc`" in page and "0.610 ± 0.100" in page
    assert (tmp_path / "report" / "pareto_best.png").is_file()


def search_store(tmp_path, values, samples, distribution="loguniform"):
    """A search as `study.run` leaves it: full-budget trials with their validation size, and
    the resolved study (its search space) on the parent run."""
    uri = f"sqlite:///{tmp_path / 'search.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("search", artifact_location=(tmp_path / "s").as_uri())
    tags = {"role": "study", "study": "search", "mode": "search", "metric": "val/pgd_acc"}
    parent = client.create_run(experiment, tags=tags | {"direction": "max"}).info.run_id
    space = {"tau": {"distribution": distribution, "low": 0.02, "high": 0.5}, "gamma": {}}
    space["gamma"] = {"distribution": "uniform", "low": 0.0, "high": 3.0}
    client.log_dict(parent, {"search": space}, "study.json")
    for number, value in enumerate(values):
        run_tags = {"role": "trial", "mlflow.parentRunId": parent, "full_budget": "true"}
        # tau spans 0.02 .. 0.5 (25x) on either distribution; gamma 0.1 .. 2.5, also > 10x
        run_tags["overrides"] = json.dumps(
            {"tau": 0.02 * 1.4 ** (number % 10), "gamma": 0.1 + 0.1 * number}
        )
        run_id = client.create_run(experiment, tags=run_tags, run_name=f"trial-{number}").info
        client.log_metric(run_id.run_id, "val/pgd_acc", value, step=4)
        client.log_metric(run_id.run_id, "val/samples", samples, step=4)
        client.log_metric(run_id.run_id, "val/clean_acc", 0.9, step=4)
        client.set_terminated(run_id.run_id, "FINISHED")
    return load_study(uri, "search")


@pytest.mark.parametrize("distribution", ["loguniform", "uniform"])
def test_parameter_axes_follow_the_search_space(tmp_path, distribution):
    """Log-uniform on a log axis, uniform on a linear one, whatever the values' spread."""
    study = search_store(tmp_path, [0.1 + 0.01 * n for n in range(25)], 500, distribution)
    figure = plots.params_figure(study)
    scales = {axis.get_xlabel().split(" ")[0]: axis.get_xscale() for axis in figure.axes}
    assert scales == {"tau": "log" if distribution == "loguniform" else "linear", "gamma": "linear"}
    for axis in figure.axes:  # the legend sits outside the axes
        legend = axis.get_legend()
        assert legend is not None and legend.get_bbox_to_anchor().x0 >= axis.bbox.x1 - 1


def test_trials_get_distinct_colours_beyond_ten(tmp_path):
    assert len(set(plots.colours(25))) == 25 and len(set(plots.colours(15))) == 15
    study = search_store(tmp_path, [0.1 + 0.01 * n for n in range(25)], 500)
    histories = pd.DataFrame(
        [
            {"run_id": run_id, "metric": "val/pgd_acc", "step": step, "value": 0.1 * step}
            for run_id in study.runs["run_id"]
            for step in (1, 2)
        ]
    )
    path = plots.plot_curves(study, histories, tmp_path / "curves.png", "val/pgd_acc")
    assert path.is_file() and path.stat().st_size > 5_000


def test_importance_png_is_written_where_the_help_says(tmp_path, capsys):
    """analysis.plots draws no importance (it has no Optuna study); analysis.importance --out
    writes importance.png beside importance.csv, as both commands' help says."""
    study = search_store(tmp_path, [0.1 + 0.01 * n for n in range(8)], 500)
    args = ["--experiment", "search", "--tracking-uri", study.tracking_uri]
    assert plots.main([*args, "--out", str(tmp_path / "p")]) == 0
    assert not (tmp_path / "p" / "importance.png").exists()
    assert "analysis.importance --out" in plots.__doc__
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna_study = optuna.create_study(study_name="search", storage=storage, direction="maximize")
    for n in range(8):
        optuna_study.add_trial(
            optuna.trial.create_trial(
                params={"tau": 0.02 * 1.4**n, "gamma": 0.1 * n},
                distributions={
                    "tau": optuna.distributions.FloatDistribution(0.02, 0.5, log=True),
                    "gamma": optuna.distributions.FloatDistribution(0.0, 3.0),
                },
                value=0.1 + 0.01 * ((n * 3) % 8),
            )
        )
    out = tmp_path / "q"
    command = ["--study", "search", "--optuna-storage", storage, "--out", str(out)]
    assert importance.main([*command, "--resamples", "4"]) == 0
    assert (out / "importance.png").is_file() and (out / "importance.csv").is_file()


def test_a_search_table_shows_each_trials_standard_error(tmp_path):
    study = search_store(tmp_path, [0.5, 0.6, 0.55], samples=144)
    trials = table.top_trials(study.runs, "val/pgd_acc", True)
    assert list(trials["val/pgd_acc"]) == [0.6, 0.55, 0.5]
    expected = [np.sqrt(p * (1 - p) / 144) for p in (0.6, 0.55, 0.5)]
    assert trials["se"].tolist() == pytest.approx(expected)
    page = report.write_report(study, tmp_path / "report").read_text()
    assert "n = 144 validation images" in page and f"{np.median(expected):.3f}" in page
    assert f"spread (std) of {np.std([0.5, 0.6, 0.55], ddof=1):.3f}" in page


def test_a_validation_only_ablation_reports_no_best_checkpoint(tmp_path):
    """A study kept off the test split (study.confirm) has no best-epoch metrics: its report
    must not show the last epoch's validation table a second time under "best checkpoint"."""
    uri = f"sqlite:///{tmp_path / 'val.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("val", artifact_location=(tmp_path / "v").as_uri())
    tags = {"role": "study", "study": "val", "mode": "ablation", "metric": "val/pgd_acc"}
    tags |= {"direction": "max", "variants": json.dumps(["full"])}
    parent = client.create_run(experiment, tags=tags).info.run_id
    for seed in (0, 1):
        run_tags = {"role": "trial", "mlflow.parentRunId": parent, "variant": "full"}
        run_id = client.create_run(experiment, tags=run_tags | {"seed": str(seed)}).info.run_id
        client.log_metric(run_id, "val/pgd_acc", 0.4 + seed / 10, step=2)
        client.log_metric(run_id, "val/clean_acc", 0.9, step=2)
        client.set_terminated(run_id, "FINISHED")
    page = report.write_report(load_study(uri, "val"), tmp_path / "report").read_text()
    assert "Validation split, last checkpoint" in page and "best checkpoint" not in page


def test_read_only_commands_create_no_store_where_there_is_none(tmp_path, monkeypatch, capsys):
    """A table, an export, a report or an importance asked of a folder without a store fail
    with one line naming the file, and leave no empty database behind."""
    from analysis import importance, report

    monkeypatch.chdir(tmp_path)
    missing = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for command, args in (
        (table.main, ["--experiment", "s"]),
        (table.main, ["--experiment", "s", "--tracking-uri", missing]),
        (export.main, ["--experiment", "s", "--out", str(tmp_path / "s.parquet")]),
        (report.main, ["--experiment", "s", "--out", str(tmp_path / "report")]),
        (importance.main, ["--study", "s"]),
        (importance.main, ["--study", "s", "--optuna-storage", f"sqlite:///{tmp_path}/o.db"]),
    ):
        assert command(args) == 2, args
        error = capsys.readouterr().err
        assert error.startswith("error: no ") and ".db" in error, error
        assert len(error.strip().splitlines()) == 1, error
        assert list(tmp_path.iterdir()) == [], (args, list(tmp_path.iterdir()))
