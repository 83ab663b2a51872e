"""analysis.importance's intervals on Optuna studies of a synthetic objective with known
importances: f(x, y) = 2 x + y + noise, x and y independent uniform on [0, 1], whose variance
shares (fANOVA's normalised importances in the limit of many trials) are 4/5 and 1/5."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest

from analysis import importance, plots

SPACE = {name: optuna.distributions.FloatDistribution(0, 1) for name in ("x", "y")}
TRUE_FANOVA = {"x": 0.8, "y": 0.2}


def linear_study(trials: int, seed: int, noise: float = 0.05) -> optuna.Study:
    """`trials` COMPLETE trials of 2 x + y + noise * N(0, 1), maximised."""
    rng = np.random.default_rng(seed)
    study = optuna.create_study(direction="maximize", study_name=f"linear{trials}_{seed}")
    for _ in range(trials):
        x, y = rng.random(2)
        value = 2 * x + y + noise * rng.standard_normal()
        study.add_trial(
            optuna.trial.create_trial(params={"x": x, "y": y}, distributions=SPACE, value=value)
        )
    return study


@pytest.fixture(scope="module")
def forty():
    """Both evaluators on 40 trials, 20 subsets of 20 (computed once: fANOVA is slowish)."""
    return importance.importance_table(linear_study(40, seed=0), resamples=20)


def assert_contains_own_estimate(table):
    for row in table.itertuples():
        where = f"{row.evaluator} {row.param}: {row.importance:.3f} [{row.ci_low:.3f}, "
        where += f"{row.ci_high:.3f}]"
        assert 0 <= row.ci_low <= row.importance <= row.ci_high <= 1, where


def test_every_interval_contains_its_own_estimate(forty):
    assert set(forty.evaluator) == {"ped_anova", "fanova"} and set(forty.param) == {"x", "y"}
    assert_contains_own_estimate(forty)
    assert (forty.ci_high > forty.ci_low).all()  # an interval, not a point
    assert set(forty.interval) == {"95% symmetric subsampling, m=20 of 40"}
    assert set(forty.subsets) == {20} and set(forty.trials) == {40}


def test_fanova_interval_covers_the_true_importances_and_ranks_x_over_y(forty):
    # One data set, not a coverage rate: on 35-40 trials fANOVA's forest leans toward x (0.89
    # +- 0.04 over data sets, see analysis.importance), so the interval covers 0.8 for about
    # 60% of data sets. This seed is one of them, and the bias is why the test is not stricter.
    fanova = forty[forty.evaluator == "fanova"].set_index("param")
    for param, truth in TRUE_FANOVA.items():
        low, high = fanova.loc[param, ["ci_low", "ci_high"]]
        assert low <= truth <= high, (param, truth, low, high)
    assert fanova.loc["x", "importance"] > fanova.loc["y", "importance"]
    assert fanova.loc["x", "ci_low"] > fanova.loc["y", "ci_high"]  # the ranking is clear


@pytest.mark.parametrize(
    ("trials", "seed"),
    [
        # The report's call on a few trials, as in a real search. The old bootstrap (trials
        # resampled with replacement) gave fANOVA y 0.059 with [0.065, 0.477] here ...
        (8, 3),
        # ... and PED-ANOVA y 0.160 with [0.209, 0.885] here.
        (12, 2),
    ],
)
def test_intervals_contain_the_estimate_where_the_bootstrap_excluded_it(trials, seed):
    table = importance.importance_table(linear_study(trials, seed), resamples=30)
    assert_contains_own_estimate(table)
    assert set(table.interval) == {f"95% symmetric subsampling, m={trials // 2} of {trials}"}


def test_subsets_are_drawn_without_replacement_at_half_the_trials(monkeypatch):
    seen: list[list[int]] = []

    def fake_importances(trials, direction, evaluator):
        seen.append([trial.number for trial in trials])
        return {"x": 0.5, "y": 0.5}

    monkeypatch.setattr(importance, "importances", fake_importances)
    table = importance.importance_table(linear_study(11, seed=0), ("fanova",), resamples=25)
    full, *subsets = seen
    assert sorted(full) == list(range(11)) and len(subsets) == 25 == table.subsets.iloc[0]
    for subset in subsets:
        assert len(subset) == 5 == len(set(subset))  # m = 11 // 2, no trial twice
    assert len({tuple(sorted(subset)) for subset in subsets}) > 1


def one_outlier_study() -> optuna.Study:
    """5 trials, 4 of them scoring 0.2 and one 0.9: a subset of 4 can miss the 0.9."""
    study = optuna.create_study(direction="maximize")
    space = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for x, value in ((0.1, 0.2), (0.5, 0.2), (0.9, 0.2), (0.3, 0.2), (0.7, 0.9)):
        study.add_trial(
            optuna.trial.create_trial(params={"x": x}, distributions=space, value=value)
        )
    return study


def test_few_trials_use_every_subset_once_and_skip_those_without_differences():
    # 5 trials: m = 4 (at least MIN_TRIALS, at most n - 1), so there are only 5 subsets; all
    # are used, once each, and the one without the 0.9 (all 0.2) is skipped.
    table = importance.importance_table(one_outlier_study(), ("ped_anova",), resamples=100)
    assert importance.subset_size(5) == 4 and math.comb(5, 4) == 5
    assert table.subsets.tolist() == [4]
    assert table.interval.tolist() == ["95% symmetric subsampling, m=4 of 5"]
    assert importance.subset_size(4) == 3 and importance.subset_size(100) == 50


def test_subsets_without_differences_are_skipped_by_both_evaluators():
    result = importance.importance_table(one_outlier_study(), resamples=20)
    assert set(result.param) == {"x"} and result.importance.notna().all()


def test_interval_rescales_by_the_overlap_of_subset_and_full_set():
    # |theta_m - theta_n| = 0.1, 0.05, 0.02, 0.1, 0.2: its 95% quantile is 0.18
    drawn = [0.40, 0.45, 0.52, 0.6, 0.7]
    # n = 10, m = 5: sqrt(m / (n - m)) = 1 (where sqrt(m / n) would shrink it to 0.71)
    assert importance.subsampling_interval(0.5, drawn, 10) == pytest.approx((0.32, 0.68))
    # n = 11, m = 5: sqrt(5 / 6)
    half = math.sqrt(5 / 6) * 0.18
    assert importance.subsampling_interval(0.5, drawn, 11) == pytest.approx(
        (0.5 - half, 0.5 + half)
    )
    # clipped to [0, 1]: |dev| = 0.18, 0.08, quantile 0.175
    assert importance.subsampling_interval(0.98, [0.8, 0.9], 10) == pytest.approx((0.805, 1.0))
    assert all(math.isnan(end) for end in importance.subsampling_interval(0.3, [], 10))


def test_plot_and_cli_name_the_interval(forty, monkeypatch, tmp_path, capsys):
    titles: list[str] = []

    def capture(fig, path):
        titles.extend(axis.get_title() for axis in fig.axes)
        return path

    monkeypatch.setattr(plots, "save", capture)
    plots.plot_importance(forty, tmp_path / "importance.png")
    assert titles == [
        f"{name} (40 full-budget trials)\n95% symmetric subsampling, m=20 of 40"
        for name in ("ped_anova", "fanova")
    ]

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=storage, study_name="cli", direction="maximize")
    study.add_trials(linear_study(6, seed=0).trials)
    argv = ["--study", "cli", "--optuna-storage", storage, "--evaluator", "ped_anova"]
    assert importance.main([*argv, "--resamples", "5"]) == 0
    out = capsys.readouterr().out
    assert "95% symmetric subsampling, m=4 of 6" in out
    with pytest.raises(SystemExit):
        importance.main([*argv, "--bootstrap", "5"])
