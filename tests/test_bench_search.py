"""`python -m bench.search`: its bookkeeping (trial-epochs, incumbents) on real Optuna trials,
and the whole benchmark on a tiny budget through real `study.run` studies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from scipy import stats

from analysis.runs import load_runs
from bench import search
from gacd import schema
from study.search import ENQUEUED_ATTR
from study.spec import read_study_file

State = optuna.trial.TrialState
DIST = {"tau": optuna.distributions.FloatDistribution(0.01, 1.0)}


def trial(state: State, tau: float, epochs: int, value: float | None = None):
    return optuna.trial.create_trial(
        state=state,
        params={"tau": tau},
        distributions=DIST,
        value=value if state == State.COMPLETE else None,
        intermediate_values={epoch: 0.1 * epoch for epoch in range(1, epochs + 1)},
    )


def test_the_curve_counts_every_epoch_and_only_full_budget_trials_lead():
    study = optuna.create_study(direction="maximize")
    study.add_trial(trial(State.PRUNED, 0.1, 3))  # stopped early: costs 3, never leads
    study.add_trial(trial(State.COMPLETE, 0.2, 12, value=0.50))
    study.add_trial(trial(State.FAIL, 0.3, 1))
    study.add_trial(trial(State.COMPLETE, 0.4, 12, value=0.40))  # worse: 0.2 stays
    study.add_trial(trial(State.COMPLETE, 0.5, 12, value=0.60))
    points = search.curve(study.trials, maximize=True)
    assert [p.trial_epochs for p in points] == [3, 15, 16, 28, 40]
    assert [p.params and p.params["tau"] for p in points] == [None, 0.2, 0.2, 0.2, 0.5]
    assert search.incumbent_at(points, 10) is None
    assert search.incumbent_at(points, 27).params == {"tau": 0.2}
    assert search.incumbent_at(points, 40).value == 0.60
    minimised = search.curve(study.trials, maximize=False)
    assert minimised[-1].params == {"tau": 0.4}
    # the leaders a selection re-runs: the best full-budget trials so far, best first
    ranked = search.curve(study.trials, maximize=True, top=2)
    assert [[leader["params"]["tau"] for leader in p.leaders] for p in ranked] == [
        [],
        [0.2],
        [0.2],
        [0.2, 0.4],
        [0.5, 0.2],
    ]
    assert ranked[-1].leaders[0]["value"] == ranked[-1].value == 0.60


def test_the_selection_chooses_the_best_mean_among_candidates_that_ran():
    assert search.chosen([0.40, 0.45, 0.42], maximize=True) == 1
    assert search.chosen([0.40, 0.45, 0.42], maximize=False) == 0
    assert search.chosen([0.40, None, float("nan")], maximize=False) == 0  # failed: not chosen
    assert search.chosen([None, 0.30, 0.30], maximize=True) == 1  # of equals, the first
    assert search.chosen([None, float("nan")], maximize=True) == 0  # none ran: the search's best


def test_the_noise_compares_configurations_spread_with_seeds_spread():
    nan = float("nan")
    result = {  # (mean, std, seeds) per configuration, as rerun returns them
        "fresh": {"a": (0.5, 0.1, 2), "b": (0.3, 0.05, 2), "c": (0.1, nan, 1), "full": (0.2, 0, 2)},
        # d ran on the selection seeds only; e's selection runs all failed (a NaN mean)
        "selection": {"a": (0.6, 0, 2), "b": (0.2, 0, 2), "c": (0.3, 0, 2), "full": (0.25, 0, 2)}
        | {"d": (0.9, 0, 2), "e": (nan, nan, 0)},
    }
    result["fresh"]["e"] = (0.4, 0.0, 2)
    found = search.noise(result)
    means = [0.5, 0.3, 0.1, 0.2, 0.4]
    assert found["configurations"] == 5
    assert found["spread_of_means"] == pytest.approx(pd.Series(means).std(ddof=1))
    assert found["seed_std"] == pytest.approx((0.1 + 0.05 + 0 + 0) / 4)  # c's one seed skipped
    assert found["both"] == 4  # a, b, c, full: not d (no fresh runs), not e (none selected)
    assert found["pearson"] == pytest.approx(
        np.corrcoef([0.5, 0.3, 0.1, 0.2], [0.6, 0.2, 0.3, 0.25])[0, 1]
    )
    # ranks 4 3 1 2 against 4 1 3 2: 1 - 6 * (0 + 4 + 4 + 0) / (4 * 15)
    assert found["spearman"] == pytest.approx(0.2)
    lone = search.noise({"fresh": {"a": (0.5, 0.1, 2)}, "selection": {}})
    assert lone["both"] == 0 and lone["spread_of_means"] != lone["spread_of_means"]  # NaN


def test_a_third_of_random_search_counts_the_selection_on_both_sides():
    searches = [{"arm": "random", "trial_epochs": 384}, {"arm": "random", "trial_epochs": 360}]
    assert search.third_of_random(searches) == 128
    # 72 trial-epochs of selection on top of each: (384 + 72) / 3 = 152, 80 of them searching
    assert search.third_of_random(searches, selection_cost=72) == 80
    assert search.third_of_random(searches, selection_cost=400) is None  # nothing left to search
    assert search.third_of_random([{"arm": "tpe", "trial_epochs": 384}]) is None


def test_the_target_is_judged_paired_by_sampler_seed_beyond_the_noise():
    t2 = 4.302652729911275  # Student's t, 97.5%, 2 degrees of freedom
    # differences 0, +0.02, -0.01: the interval holds -0.01, nothing is decided
    found = search.paired({0: 0.5, 1: 0.6, 2: 0.55}, {0: 0.5, 1: 0.58, 2: 0.56}, 0.01, True)
    std = float(np.std([0.0, 0.02, -0.01], ddof=1))
    assert found["mean"] == pytest.approx(0.01 / 3) and found["std"] == pytest.approx(std)
    assert found["ci95"] == pytest.approx(
        [0.01 / 3 - t2 * std / 3**0.5, 0.01 / 3 + t2 * std / 3**0.5]
    )
    assert found["verdict"] == "undecided" and found["seeds"] == 3
    assert found["differences"] == pytest.approx({0: 0.0, 1: 0.02, 2: -0.01})
    # the seeds it asks for are the fewest whose interval would clear -margin
    n, gap = found["seeds_to_decide"], 0.01 / 3 + 0.01
    assert stats.t.ppf(0.975, n - 1) * std / n**0.5 < gap
    assert stats.t.ppf(0.975, n - 2) * std / (n - 1) ** 0.5 >= gap
    # level within the margin, tightly: holds; worse beyond the margin, tightly: fails
    level = search.paired({0: 0.5, 1: 0.6, 2: 0.7}, {0: 0.501, 1: 0.6, 2: 0.701}, 0.01, True)
    assert level["verdict"] == "holds" and level["mean"] < 0  # a shortfall inside the margin
    worse = search.paired({0: 0.4, 1: 0.5, 2: 0.6}, {0: 0.5, 1: 0.61, 2: 0.7}, 0.01, True)
    assert worse["verdict"] == "fails" and worse["ci95"][1] < -0.01
    assert search.paired({0: 0.4, 1: 0.5}, {0: 0.5, 1: 0.61}, 0.2, True)["verdict"] == "holds"
    # a metric to minimise: lower is better, the same differences with their sign turned
    lower = search.paired({0: 0.4, 1: 0.5, 2: 0.6}, {0: 0.5, 1: 0.61, 2: 0.7}, 0.01, False)
    assert lower["verdict"] == "holds" and lower["mean"] == pytest.approx(-worse["mean"])
    # seeds without an incumbent on either side do not pair; one pair decides nothing
    lone = search.paired({0: 0.5, 1: None, 2: 0.4}, {0: 0.3, 1: 0.2}, 0.01, True)
    assert lone["seeds"] == 1 and lone["ci95"] is None and lone["verdict"] == "undecided"


def test_a_finished_benchmark_is_judged_again_from_its_json(tmp_path, capsys):
    """`--report`: the recorded digits result, its verdicts removed, judged again: the
    figures stay as they were, the verdicts come back, at the margin asked for."""
    recorded = json.loads(Path("bench/results/search.json").read_text())
    derived = ("target", "target_selected", "equal_budget")
    stripped = {k: v for k, v in recorded.items() if k not in derived}
    path = tmp_path / "search.json"
    path.write_text(json.dumps(stripped))
    figure = Path("docs/search_efficiency.png")
    drawn = figure.stat().st_mtime_ns
    assert search.main(["--report", str(path), "--margin", "0.5"]) == 0
    assert figure.stat().st_mtime_ns == drawn  # no --plot: the recorded figure is left alone
    judged = json.loads(path.read_text())
    assert {k: judged[k] for k in stripped} == stripped | {"noise": judged["noise"]}
    assert judged["maximize"] is True  # digits.yaml's val/pgd_acc
    goal = judged["target_selected"]
    assert goal["difference"]["margin"] == 0.5
    assert goal["difference"]["verdict"] == "holds" and goal["holds"]  # any gap under 0.5
    assert goal["difference"]["seeds"] == len(recorded["seeds"])
    assert goal["tpe_asha_mean"] == pytest.approx(recorded["target_selected"]["tpe_asha_mean"])
    assert "holds at margin 0.5: paired difference" in capsys.readouterr().out
    # the same comparison at random search's whole budget: each TPE + ASHA search's incumbent
    # there (its own end, where it spent less) against random search's
    equal = judged["equal_budget"]
    spent = [s["trial_epochs"] for s in recorded["searches"] if s["arm"] == "random"]
    assert equal["third"] == max(spent) == 384 and equal["divisor"] == 1
    for s in recorded["searches"]:
        if s["arm"] == "tpe_asha":
            fresh = s["incumbents"]["384"]["fresh_mean"]
            assert equal["tpe_asha_at_third"][str(s["seed"])] == pytest.approx(fresh)
    # not a result: the command says which file and what it expected, and changes nothing
    broken = tmp_path / "broken.json"
    broken.write_text('{"searches": []')
    with pytest.raises(SystemExit, match=r"--report .*broken.json: expected the JSON"):
        search.main(["--report", str(broken), "--plot", ""])
    assert broken.read_text() == '{"searches": []'
    with pytest.raises(SystemExit, match=r"missing.json: expected the JSON.*FileNotFoundError"):
        search.main(["--report", str(tmp_path / "missing.json"), "--plot", ""])


def test_an_arm_whose_trials_average_seeds_pays_for_every_seed_s_epochs():
    study = optuna.create_study(direction="maximize")
    study.add_trial(trial(State.PRUNED, 0.1, 3))
    study.add_trial(trial(State.COMPLETE, 0.2, 12, value=0.50))
    points = search.curve(study.trials, maximize=True, seeds_per_trial=2)
    assert [p.trial_epochs for p in points] == [6, 30]
    base = {"study": {"name": "s", "scheduler": {"name": "asha"}}, "search": {"tau": {}}}
    arm = search.arm_spec(base, "tpe_asha", 0, 8, "a", trial_seeds=[0, 1])
    assert arm["study"]["trial_seeds"] == [0, 1]
    assert "trial_seeds" not in search.arm_spec(base, "random", 0, 8, "b")["study"]
    # its searches are named apart from the same arm's over one seed (a store holds both)
    assert search.search_name("tpe_asha", 3, None) == "bench_search_tpe_asha_s3"
    assert search.search_name("tpe_asha", 3, [0, 1]) == "bench_search_tpe_asha_s3_trials0-1"
    arms = ["tpe_asha", "random"]
    assert search.arm_trial_seeds(["tpe_asha=0,1"], arms) == {"tpe_asha": [0, 1]}
    for bad, expected in (
        ("tpe=0,1", "ARM one of --arms"),
        ("tpe_asha=0,x", "integer seeds"),
        ("tpe_asha=1,1", "distinct seeds"),
    ):
        with pytest.raises(ValueError, match=expected):
            search.arm_trial_seeds([bad], arms)
    result = {"trial_seeds": {"tpe_asha": [0, 1]}}
    assert search.arm_label(result, "tpe_asha") == "tpe_asha (trials over 2 seeds)"
    assert search.arm_label(result, "random") == "random"


def test_a_finished_search_is_reused_only_for_the_same_study_file(tmp_path):
    """A study of the same name that ran to its end in `--out` stands for this run's only if
    it ran the same file (another `--epochs`, `--study` or `--trials` is another search)."""
    runner = search.Runner(tmp_path, [])
    spec = {"study": {"name": "bench_search_random_s0", "num_samples": 32}, "search": {}}
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "bench_search_random_s0.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "logs").mkdir()
    runner.marker("bench_search_random_s0").write_text("12.5")
    assert runner.run(json.loads(json.dumps(spec))) == 12.5  # nothing runs
    other = json.loads(json.dumps(spec))
    other["study"]["num_samples"] = 16
    with pytest.raises(SystemExit, match="bench_search_random_s0 in .* ran another study file"):
        runner.run(other)
    written = yaml.safe_load((tmp_path / "studies" / "bench_search_random_s0.yaml").read_text())
    assert written == spec  # what ran stays on record


def test_only_the_default_results_write_the_documented_figure():
    assert search.default_plot(search.DEFAULT_RESULTS) == "docs/search_efficiency.png"
    assert search.default_plot("runs/x/fm.json") == "runs/x/fm.png"


def test_each_arm_is_the_study_file_with_its_sampler_and_scheduler():
    base = {
        "study": {
            "name": "s",
            "scheduler": {"name": "asha", "grace_period": 3},
            "sampler": {"name": "tpe", "seed": 0, "multivariate": True, "n_startup_trials": 6},
        },
        "search": {"tau": {}},
    }
    asha = search.arm_spec(base, "tpe_asha", 4, 32, "a")
    assert asha["study"]["scheduler"]["name"] == "asha" and asha["study"]["sampler"]["seed"] == 4
    assert asha["study"]["num_samples"] == 32 and asha["study"]["name"] == "a"
    tpe = search.arm_spec(base, "tpe", 1, 32, "b")
    assert tpe["study"]["scheduler"] == {"name": "none"}
    assert tpe["study"]["sampler"]["multivariate"] is True
    random = search.arm_spec(base, "random", 2, 32, "c")
    assert random["study"]["sampler"] == {"name": "random", "seed": 2}
    assert base["study"]["name"] == "s"  # the file's own spec is untouched
    with pytest.raises(SystemExit, match="scheduler is none"):
        search.arm_spec({"study": {"scheduler": {"name": "none"}}}, "tpe_asha", 0, 2, "d")


def test_a_budgeted_file_is_searched_with_its_budget_and_the_benchmarks_trials(tmp_path):
    """The file's budget is applied before the arms' settings: its `study.num_samples`
    (10) must not replace the benchmark's 32 trials, and a named budget replaces the file's."""
    path = "search_spaces/fashion_mnist.yaml"
    base, budget = search.search_file(path, None, None, None)  # the file's own: cpu
    assert budget == "cpu" and "budgets" not in base and "budget" not in base["study"]
    assert base["base"]["data"]["train_subset"] == 6000
    assert search.arm_spec(base, "random", 0, 32, "a")["study"]["num_samples"] == 32
    base, budget = search.search_file(path, "bench_search", 3, None)
    assert budget == "bench_search" and base["base"]["data"]["train_subset"] == 3000
    assert base["base"]["optim"]["epochs"] == 3 and base["base"]["eval"]["max_samples"] == 2000
    assert base["study"]["scheduler"]["grace_period"] == 1
    # the arm's file is one study.run reads as it is: no budget left to apply over it
    arm = tmp_path / "arm.yaml"
    arm.write_text(yaml.safe_dump(search.arm_spec(base, "tpe_asha", 0, 32, "b")))
    assert read_study_file(arm).study.num_samples == 32


def test_a_budget_the_file_lacks_or_a_file_that_is_no_search_is_refused():
    expected = r"fashion_mnist.yaml.*'budget'.*\(full, cpu, bench_search\).*, got 'gpu'"
    with pytest.raises(ValueError, match=expected):
        search.search_file("search_spaces/fashion_mnist.yaml", "gpu", None, None)
    ablation = "search_spaces/digits_ablation.yaml"
    with pytest.raises(ValueError, match="digits_ablation.yaml: expected a search file"):
        search.search_file(ablation, None, None, None)
    with pytest.raises(SystemExit):  # the command line says so and exits 2
        search.main(["--study", "search_spaces/fashion_mnist.yaml", "--budget", "gpu"])


@pytest.mark.slow
def test_the_benchmark_measures_every_search_on_fresh_seeds(
    tmp_path, robust_teacher_path, ray_cluster
):
    out = tmp_path / "out"
    argv = ["--arms", "tpe_asha", "random", "--seeds", "0", "--trials", "3", "--epochs", "2"]
    argv += ["--budgets", "2", "6", "--fresh-seeds", "1000", "1001"]
    argv += ["--select-top", "2", "--select-seeds", "2000"]
    argv += ["--teacher", str(robust_teacher_path), "--out", str(out), "--address", ray_cluster]
    argv += ["--results", str(tmp_path / "search.json"), "--plot", str(tmp_path / "plot.png")]
    assert search.main(argv) == 0
    result = json.loads((tmp_path / "search.json").read_text())
    assert result["budget"] is None  # digits.yaml has no budgets (not a budget's trial-epochs)
    assert (tmp_path / "plot.png").stat().st_size > 0
    assert result["noise"] == pytest.approx(search.noise(result), nan_ok=True)
    assert result["noise"]["both"] >= 1  # the incumbents ran on the selection seeds too
    uri = f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(uri)
    by_arm = {s["arm"]: s for s in result["searches"]}
    assert by_arm["random"]["trial_epochs"] == 6 and by_arm["random"]["complete"] == 3
    for s in result["searches"]:
        # Optuna's epochs (what the curve counts) are the epochs MLflow logged for the search
        runs = load_runs(uri, s["name"])
        logged = sum(
            len(client.get_metric_history(run_id, schema.VAL_PGD_ACC)) for run_id in runs.run_id
        )
        assert s["trial_epochs"] == logged and s["trials"] == len(runs) == 3
        assert s["curve"][-1]["trial_epochs"] == s["trial_epochs"]
    # every incumbent's fresh value is the mean MLflow holds for its configuration
    [fresh_study] = result["fresh_studies"]  # a new store: one fresh study, run now
    assert fresh_study.startswith(search.FRESH_STUDY) and result["fresh_seconds"] > 0
    spent = sum(s["seconds"] for s in result["searches"]) + result["selection_seconds"]
    assert result["compute_seconds"] == pytest.approx(spent + result["fresh_seconds"])
    variant = schema.tag_column(schema.TAG_VARIANT)
    value = f"metrics.{schema.VAL_PGD_ACC}"
    fresh = load_runs(uri, fresh_study)
    fresh = fresh[fresh[variant] != "full"]
    chosen = {
        choice["config"]
        for s in result["searches"]
        for key in ("incumbents", "selected")
        for choice in s[key].values()
    }
    assert set(fresh[variant]) == chosen and len(fresh) == 2 * len(chosen)
    # each selected incumbent is its search's leader with the best mean on the selection seed,
    # as MLflow recorded it; its cost is the search's budget plus one 2-epoch run per leader
    [selection_study] = result["selection_studies"]
    selection = load_runs(uri, selection_study)
    assert set(selection["params.seed"]) == {"2000"}
    means = selection.groupby(variant)[value].mean()
    for s in result["searches"]:
        assert s["selected"].keys() == s["incumbents"].keys()  # the third (2) is a budget
        for budget, choice in s["selected"].items():
            incumbent = s["incumbents"][budget]
            assert choice["candidates"][0] == incumbent["config"]  # the search's best leads
            assert 1 <= len(choice["candidates"]) <= 2
            assert choice["config"] == means[choice["candidates"]].idxmax()
            assert choice["selection_mean"] == pytest.approx(means[choice["config"]])
            assert choice["cost"] == int(budget) + 2 * len(choice["candidates"])
    assert result["target_selected"]["third"] is None  # (6 + 4) / 3 - 4: no budget to search
    for label, (mean, _, n) in result["fresh"].items():
        if label == "full":
            continue
        rows = fresh[fresh[schema.tag_column(schema.TAG_VARIANT)] == label]
        assert n == 2 and set(rows["params.seed"]) == {"1000", "1001"}
        assert mean == pytest.approx(rows[value].mean())
    # run again, it finds every study done and reports the same figures without rerunning
    assert search.main(argv) == 0
    again = json.loads((tmp_path / "search.json").read_text())
    assert again["fresh"] == result["fresh"] and again["searches"] == result["searches"]
    assert len(load_runs(uri, fresh_study)) == len(fresh) + 2  # nothing added

    # choosing among fewer leaders needs only configurations measured already: nothing runs,
    # each figure is the one recorded, taken from the earlier studies
    def every_run() -> int:
        experiments = [e.experiment_id for e in client.search_experiments()]
        return len(client.search_runs(experiments, max_results=10_000))

    runs_before = every_run()
    assert search.main([*argv, "--select-top", "1"]) == 0  # the last --select-top counts
    fewer = json.loads((tmp_path / "search.json").read_text())
    assert fewer["fresh_studies"] == [fresh_study]
    assert fewer["fresh_seconds"] == result["fresh_seconds"]  # what it cost when it ran
    assert fewer["selection_studies"] == [selection_study]
    assert every_run() == runs_before
    params = {label: search.canonical(config) for label, config in fewer["variants"].items()}
    recorded = {
        search.canonical(config): result["fresh"][label]
        for label, config in result["variants"].items()
        if label in result["fresh"]
    }
    assert len(fewer["fresh"]) > 1
    for label, figures in fewer["fresh"].items():
        assert figures == (result["fresh"]["full"] if label == "full" else recorded[params[label]])
    # one configuration measured and one not: only the new one (and the reference) runs
    runner = search.Runner(out, ["--address", ray_cluster])
    resolved = json.loads(
        (out / "ray_results" / result["searches"][0]["name"] / schema.SPEC_FILE).read_text()
    )["resolved"]
    old_label = next(label for label in result["fresh"] if label != "full")
    old = result["variants"][old_label]
    new = old | {"tau": old["tau"] * 1.01}
    both = search.rerun(
        runner, resolved, {"a": old, "b": new}, [1000, 1001], search.FRESH_STUDY, schema.VAL_PGD_ACC
    )
    assert both.studies[0] == fresh_study and len(both.studies) == 2
    assert both.values["a"] == tuple(result["fresh"][old_label])
    added = load_runs(uri, both.studies[1])
    assert sorted(added[variant]) == ["b", "b", "full", "full"]
    assert both.seconds > result["fresh_seconds"]  # the earlier study's and the new one's
    assert both.values["b"][0] == pytest.approx(added[added[variant] == "b"][value].mean())
    # a third fresh seed: only that seed runs, for each configuration and the reference, and
    # each figure is the mean over all three seeds, whichever study measured which
    more = search.rerun(
        runner,
        resolved,
        {"a": old, "b": new},
        [1000, 1001, 1002],
        search.FRESH_STUDY,
        schema.VAL_PGD_ACC,
    )
    assert more.studies[:2] == sorted(both.studies) and len(more.studies) == 3
    third = load_runs(uri, more.studies[2])
    assert sorted(third[variant]) == ["a", "b", "full"] and set(third["params.seed"]) == {"1002"}
    earlier = {"a": fresh[fresh[variant] == old_label], "b": added[added[variant] == "b"]}
    for label, runs in earlier.items():
        values = pd.concat([runs[value], third[third[variant] == label][value]])
        assert more.values[label][2] == 3 == len(values)
        assert more.values[label][0] == pytest.approx(values.mean())
        assert more.values[label][1] == pytest.approx(values.std(ddof=1))
    goal = result["target"]
    assert goal["third"] == 2 and set(goal["random_at_all"]) == {"0"}
    assert result["maximize"] is True
    paired = int(goal["tpe_asha_at_third"]["0"] is not None)  # none yet, if ASHA stopped all
    assert goal["difference"]["seeds"] == paired and goal["difference"]["verdict"] == "undecided"


@pytest.mark.slow
def test_an_arm_over_trial_seeds_is_searched_counted_and_judged_beside_random_search(
    tmp_path, robust_teacher_path, ray_cluster
):
    """`--trial-seeds tpe_asha=0,1`: TPE + ASHA's trials each train seeds 0 and 1 (MLflow's
    seed tag says so) and its trial-epochs count both seeds' epochs, judged against random
    search's trials of one seed. `--from-defaults tpe_asha`: its first trial is the study
    file's own configuration."""
    out = tmp_path / "out"
    argv = ["--arms", "tpe_asha", "random", "--seeds", "0", "--trials", "2", "--epochs", "2"]
    argv += ["--trial-seeds", "tpe_asha=0,1", "--budgets", "4", "--fresh-seeds", "1000"]
    argv += ["--from-defaults", "tpe_asha"]
    argv += ["--select-top", "0", "--teacher", str(robust_teacher_path), "--out", str(out)]
    argv += ["--address", ray_cluster, "--results", str(tmp_path / "search.json"), "--plot", ""]
    assert search.main(argv) == 0
    result = json.loads((tmp_path / "search.json").read_text())
    assert result["trial_seeds"] == {"tpe_asha": [0, 1]}
    uri = f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(uri)
    by_arm = {s["arm"]: s for s in result["searches"]}
    assert by_arm["tpe_asha"]["name"] == "bench_search_tpe_asha_s0_trials0-1_defaults-kept"
    study = optuna.load_study(
        study_name=by_arm["tpe_asha"]["name"], storage=f"sqlite:///{out / 'optuna.db'}"
    )
    arm_file = out / "studies" / f"{by_arm['tpe_asha']['name']}.yaml"
    defaults = read_study_file(arm_file).points_to_evaluate()
    assert set(defaults[0]) == set(yaml.safe_load(arm_file.read_text())["search"])
    assert study.trials[0].params == defaults[0] and study.trials[0].user_attrs[ENQUEUED_ATTR]
    assert not study.trials[1].user_attrs.get(ENQUEUED_ATTR)
    runs = load_runs(uri, by_arm["tpe_asha"]["name"]).set_index("tags.optuna_trial_number")
    assert runs.loc["0", "tags.point_to_evaluate"] == "true"  # ASHA never stops it
    assert runs.loc["0", "tags.full_budget"] == "true" and study.trials[0].state.name == "COMPLETE"
    assert runs.loc["1"].get("tags.point_to_evaluate") is None or pd.isna(
        runs.loc["1", "tags.point_to_evaluate"]
    )
    assert search.arm_label(result, "tpe_asha") == "tpe_asha (trials over 2 seeds, from defaults)"
    for arm, seeds in (("tpe_asha", "0,1"), ("random", "0")):
        runs = load_runs(uri, by_arm[arm]["name"])
        assert set(runs["tags.seed"]) == {seeds}
        logged = sum(
            len(client.get_metric_history(run_id, schema.VAL_PGD_ACC)) for run_id in runs.run_id
        )
        assert by_arm[arm]["trial_epochs"] == logged * len(seeds.split(","))
    assert by_arm["random"]["trial_epochs"] == 4  # 2 trials of 2 epochs, one seed each
    assert result["target"]["third"] == 4 // 3
