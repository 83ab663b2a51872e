"""A comparison (`mode: compare`): each method searched alike, its best trials confirmed on
fresh seeds, its winner run on the test split; on a real Ray cluster, MLflow and Optuna."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import pickle
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import Searcher
from scipy import stats as scipy_stats

from analysis.compare import (
    budget_table,
    comparison_markdown,
    comparison_state,
    final_study,
    replicated,
    replicated_csv,
    replicated_latex,
    replicated_markdown,
    winner_text,
)
from analysis.runs import load_runs
from analysis.table import ablation_table
from gacd import schema
from gacd.config import ConfigError, ConfigFileError, shared_searchers
from gacd.runtime import cpu_model
from study.compare import (
    STATE_FILE,
    ablation_stage,
    confirm_rounds,
    explicit,
    final_rounds,
    first_rounds,
    ranked,
    search_stage,
    uneven_searches,
)
from study.run import grown_seeds, main, save_study_spec, spec_source, trial_count
from study.search import PerEntryScheduler, compare_searcher, optuna_storage, scheduler
from study.spec import ENTRY_KEY, StudyError, read_study_file, spec_from_dict
from tests.test_study_run import digits_base, study_args

ROOT = Path(__file__).resolve().parents[1]


def comparison(teacher: str, **compare) -> dict:
    methods = {
        "gacd": {
            "search": {
                "tau": {"distribution": "loguniform", "low": 0.05, "high": 0.5},
                "attack.steps": {"distribution": "choice", "values": [1]},
            }
        },
        "trades": {"search": {"trades_beta": {"distribution": "uniform", "low": 1.0, "high": 9.0}}},
    }
    return {
        "study": {
            "name": "duel",
            "mode": "compare",
            "num_samples": 2,
            "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
            "sampler": {"seed": 0, "n_startup_trials": 1},
        },
        "teacher": {"checkpoint": teacher},
        "base": {**digits_base(epochs=2), "method": "natural"},
        "compare": {"methods": methods, "confirm_seeds": [1000], "seeds": [0, 1], **compare},
    }


# --- the study file --------------------------------------------------------------------------


def test_the_shipped_comparison_gives_every_method_its_own_search_and_the_same_budget():
    spec = read_study_file(ROOT / "search_spaces/digits_compare.yaml", teacher_cache=Path("/t"))
    assert spec.compare is not None and len(spec.compare.methods) == 8
    assert trial_count(spec) == 8 * spec.study.num_samples
    for entry in spec.compare.methods:
        config = spec.trial_config({ENTRY_KEY: entry})
        assert config.method == entry and config.optim.epochs == 12 and not config.final
        assert config.data.val_fraction == 0.3 and config.eval.epsilon == 0.1
    trades = spec.trial_config({ENTRY_KEY: "trades", "trades_beta": 2.5, "tau": 0.3})
    assert trades.trades_beta == 2.5 and trades.tau == 0.1  # another method's key: not read
    # every method trains against the same attack: GACD searching its PGD steps let PGD-1
    # winners through ASHA and cost it (docs/benchmarks/digits.md, "GACD's search, ...")
    for entry, settings in spec.compare.methods.items():
        assert not any(key.startswith("attack.") for key in settings.search), entry
        assert spec.trial_config({ENTRY_KEY: entry}).attack.steps == 5
    assert spec.trial_label({ENTRY_KEY: "kd", "optuna_trial_number": 4}, "x") == "kd.trial-004"


@pytest.mark.parametrize("name", ["digits_compare.yaml", "fashion_mnist_compare.yaml"])
def test_the_shipped_comparisons_search_the_learning_rate_alike_for_every_method(name):
    """A training key searched for some methods only handicaps the others (TRADES at its base
    lr lost about 8 points of PGD-20 on digits to it): every method searches lr, alike."""
    spec = read_study_file(ROOT / "search_spaces" / name, teacher_cache=Path("/t"))
    assert spec.compare is not None and uneven_searches(spec) == []
    ranges = {entry: m.search["optim.lr"] for entry, m in spec.compare.methods.items()}
    assert len({(d.distribution, d.low, d.high) for d in ranges.values()}) == 1, ranges


GUIDED = {"attack.objective": "contrastive"}  # GACD's default attack until 2026-12-07


@pytest.mark.parametrize(
    ("probe", "parent", "same", "changed"),
    [
        # digits_compare.yaml has trained GACD at PGD-5 since this probe measured it; both
        # gacd_search probes pin the guided attack they were measured with, the default then
        (
            "digits_compare_gacd_search.yaml",
            "digits_compare.yaml",
            {},
            {"gacd": ("gacd", {"attack.steps": 3, **GUIDED}), "gacd_pgd5": ("gacd", GUIDED)},
        ),
        (
            "fashion_mnist_compare_gacd_search.yaml",
            "fashion_mnist_compare.yaml",
            {},
            {"gacd": ("gacd", GUIDED), "gacd_pgd5": ("gacd", {"attack.steps": 5, **GUIDED})},
        ),
        # the CE attack, GACD's default since: gacd_ce is the comparison's gacd
        (
            "fashion_mnist_compare_gacd_ce.yaml",
            "fashion_mnist_compare.yaml",
            {"gacd_ce": "gacd"},
            {},
        ),
        # and its search with the steps fixed at PGD-7, the steps that keep the probe's robustness
        (
            "fashion_mnist_compare_gacd_pgd7.yaml",
            "fashion_mnist_compare.yaml",
            {},
            {"gacd_pgd7": ("gacd", {"attack.steps": 7})},
        ),
        # and at PGD-5, the steps every other method trains with (GACD alone: TRADES' rows are
        # the pgd7 file's)
        (
            "fashion_mnist_compare_gacd_pgd5.yaml",
            "fashion_mnist_compare.yaml",
            {},
            {"gacd_pgd5": ("gacd", {"attack.steps": 5})},
        ),
    ],
)
def test_a_gacd_search_probe_runs_its_comparisons_entries_as_they_are_but_what_it_names(
    probe, parent, same, changed
):
    """The probes of GACD's search (`*_gacd_search`, `*_gacd_ce`, `*_gacd_pgd7`, ...) measure a
    change to its search or training (the PGD steps searched or fixed; the attack) beside
    entries of their comparison: those must be the comparison's own (the same search, trial
    config, teacher and budget), and a changed entry differ in what it names only, or their
    cells say nothing about the comparison's table."""
    for budget in (None, "full") if "fashion" in probe else (None,):
        spec, before = (
            read_study_file(ROOT / "search_spaces" / name, teacher_cache=Path("/t"), budget=budget)
            for name in (probe, parent)
        )
        assert spec.teacher.checkpoint == before.teacher.checkpoint  # the same cache key
        for part in ("num_samples", "scheduler", "sampler", "budget"):
            assert getattr(spec.study, part) == getattr(before.study, part), part
        for part in ("top", "confirm_seeds", "seeds"):
            assert getattr(spec.compare, part) == getattr(before.compare, part), part
        point = {"optim.lr": 0.07, "tau": 0.1, "beta": 1.0, "reweight.gamma": 1.0}
        point |= {"attack.steps": 3, "trades_beta": 2.0}
        shared = set(spec.compare.methods) & set(before.compare.methods) - set(changed)
        assert set(spec.compare.methods) == shared | set(same) | set(changed)
        for entry, theirs in {**{e: e for e in shared}, **same}.items():
            mine = spec.compare.methods[entry]
            assert mine.search == before.compare.methods[theirs].search, entry
            assert spec.trial_config({**point, ENTRY_KEY: entry}) == before.trial_config(
                {**point, ENTRY_KEY: theirs}
            ), entry
        for entry, (theirs, change) in changed.items():
            mine, other = spec.compare.methods[entry].search, before.compare.methods[theirs].search
            assert {**mine, **other}.keys() - (mine.keys() & other.keys()) <= {"attack.steps"}
            assert all(mine[key] == other[key] for key in mine.keys() & other.keys()), entry
            config = spec.trial_config({**point, ENTRY_KEY: entry})
            expected = before.trial_config({**point, ENTRY_KEY: theirs})
            fields = {key.removeprefix("attack."): value for key, value in change.items()}
            expected = dataclasses.replace(
                expected, attack=dataclasses.replace(expected.attack, **fields)
            )
            assert config == expected, entry


def test_the_in_batch_ablation_trains_the_fashion_comparisons_winners_as_they_were_trained():
    """fashion_mnist_in_batch_ablation.yaml's `full` and `trades` rows are the comparison's
    GACD and TRADES winners retrained on its final seeds: everything that shapes training (not
    the evaluation, which the ablation trims) must be the comparison's, or the rows are not."""
    ablation = read_study_file(
        ROOT / "search_spaces/fashion_mnist_in_batch_ablation.yaml", teacher_cache=Path("/t")
    )
    compare = read_study_file(
        ROOT / "search_spaces/fashion_mnist_compare.yaml", teacher_cache=Path("/t")
    )
    assert ablation.teacher.checkpoint == compare.teacher.checkpoint
    assert ablation.ablation.seeds == compare.compare.seeds
    report = ROOT / "docs/examples/fashion_mnist_compare_lr_all/budget.csv"
    won = pd.read_csv(report).set_index("method")["winner's values"]
    common = ("method", "data", "student", "optim", "attack", "seed")
    trained = {  # what each method's training reads (TRADES no GACD key: tau and the rest)
        "gacd": (*common, "tau", "anchor", "negatives", "reweight", "alpha", "beta", "lambda_kd"),
        "trades": (*common, "trades_beta"),
    }
    for variant, entry in (("full", "gacd"), ("trades", "trades")):
        values = json.loads(won[entry])
        for seed in compare.compare.seeds:
            mine = ablation.trial_config({"variant": variant, "seed": seed})
            theirs = compare.trial_config({ENTRY_KEY: entry, **values})
            theirs = dataclasses.replace(theirs, seed=seed)
            if entry == "gacd":  # as it ran on 2026-12-07: the guided attack, the default then
                theirs.attack = dataclasses.replace(theirs.attack, objective="contrastive")
            for part in trained[entry]:
                assert getattr(mine, part) == getattr(theirs, part), (variant, part)
    # the variants change one thing each
    full = ablation.trial_config({"variant": "full", "seed": 0})
    for variant, changed in (
        ("ce_attack", "attack"),
        ("kl_attack", "attack"),
        ("no_reweight", "reweight"),
    ):
        config = ablation.trial_config({"variant": variant, "seed": 0})
        differ = [p for p in trained["gacd"] if getattr(config, p) != getattr(full, p)]
        assert differ == [changed], variant
    # its confirmation: three of its rows on fresh seeds, validation split only
    confirm = read_study_file(
        ROOT / "search_spaces/fashion_mnist_in_batch_confirm.yaml", teacher_cache=Path("/t")
    )
    assert confirm.study.metric == "val/pgd_acc" and not confirm.ablation.test_split
    assert not set(confirm.ablation.seeds) & set(ablation.ablation.seeds)
    assert list(confirm.variants()) == ["full", "ce_attack", "trades"]
    for variant in confirm.variants():
        point = {"variant": variant, "seed": confirm.ablation.seeds[0]}
        config = confirm.trial_config(point)
        assert not config.final
        assert dataclasses.replace(config, final=True) == ablation.trial_config(point), variant


def test_the_transfer_ablation_crosses_the_two_gacd_winners_with_the_two_attacks():
    """fashion_mnist_transfer_ablation.yaml's `full` and `ce_winner` are the GACD rows of
    fashion_mnist_compare.yaml (guided attack) and fashion_mnist_compare_gacd_ce.yaml (CE
    attack, sampler seed 0) retrained, evaluation and MNIST probe included; `ce_attack` and
    `ce_winner_guided` change their attack only. Else the 2x2 cannot say whether the attack
    or the searched values cost the transfer."""
    ablation, guided, ce = (
        read_study_file(
            ROOT / "search_spaces" / f"fashion_mnist_{name}.yaml", teacher_cache=Path("/t")
        )
        for name in ("transfer_ablation", "compare", "compare_gacd_ce")
    )
    assert ablation.teacher.checkpoint == guided.teacher.checkpoint == ce.teacher.checkpoint
    assert ablation.ablation.seeds == guided.compare.seeds == ce.compare.seeds
    assert ablation.study.metric == "transfer/pgd_acc"
    budget = pd.read_csv(ROOT / "docs/examples/fashion_mnist_compare_lr_all/budget.csv")
    guided_won = json.loads(budget.set_index("method")["winner's values"]["gacd"])
    report = (ROOT / "docs/examples/fashion_mnist_compare_gacd_ce/report_s0.md").read_text()
    row = next(
        line for line in report.splitlines() if line.startswith("| gacd_ce  ") and "{" in line
    )
    ce_won = json.loads(row[row.index("{") : row.rindex("}") + 1])
    for seed in ablation.ablation.seeds:

        def config(variant, seed=seed):
            return ablation.trial_config({"variant": variant, "seed": seed})

        theirs = guided.trial_config({ENTRY_KEY: "gacd", **guided_won})  # the guided default then
        theirs = dataclasses.replace(theirs, seed=seed, final=True)
        theirs.attack = dataclasses.replace(theirs.attack, objective="contrastive")
        assert config("full") == theirs
        assert config("ce_attack") == dataclasses.replace(
            theirs, attack=dataclasses.replace(theirs.attack, objective="ce")
        )
        theirs = ce.trial_config({ENTRY_KEY: "gacd_ce", **ce_won})
        theirs = dataclasses.replace(theirs, seed=seed, final=True)
        assert theirs.attack.objective == "ce" and config("ce_winner") == theirs
        assert config("ce_winner_guided") == dataclasses.replace(
            theirs, attack=dataclasses.replace(theirs.attack, objective="contrastive")
        )


def test_the_transfer_values_ablation_moves_one_of_the_ce_winner_s_values_at_a_time():
    """fashion_mnist_transfer_values.yaml's `full` is the 2x2's `ce_attack` (its rows retrained);
    each variant sets one of the values in which the two GACD winners differ to the CE
    winner's, and nothing else."""
    values, square = (
        read_study_file(
            ROOT / "search_spaces" / f"fashion_mnist_{name}.yaml", teacher_cache=Path("/t")
        )
        for name in ("transfer_values", "transfer_ablation")
    )
    assert values.teacher.checkpoint == square.teacher.checkpoint
    assert values.ablation.seeds == square.ablation.seeds
    winner = square.trial_config({"variant": "ce_winner", "seed": 0})
    for seed in values.ablation.seeds:
        full = values.trial_config({"variant": "full", "seed": seed})
        assert full == square.trial_config({"variant": "ce_attack", "seed": seed})
    full = values.trial_config({"variant": "full", "seed": 0})
    for variant, section, key in (
        ("ce_beta", None, "beta"),
        ("ce_tau", None, "tau"),
        ("ce_lr", "optim", "lr"),
        ("ce_steps", "attack", "steps"),
    ):
        config = values.trial_config({"variant": variant, "seed": 0})
        mine, theirs, base = (getattr(c, section) if section else c for c in (config, winner, full))
        assert getattr(mine, key) == getattr(theirs, key) != getattr(base, key), variant
        back = dataclasses.replace(mine, **{key: getattr(base, key)})
        assert (dataclasses.replace(config, **{section: back}) if section else back) == full


def test_the_pgd7_comparisons_table_in_the_docs_is_what_its_reports_hold():
    """docs/benchmarks/fashion_mnist.md's table of the three `gacd_pgd7` comparisons cites their
    shipped reports (`replicated.csv`): each sampler seed's row and the row over the three must
    show those figures, or a regenerated report and the prose have drifted apart."""
    doc = (ROOT / "docs/benchmarks/fashion_mnist.md").read_text()
    section = doc[doc.index("## GACD's PGD steps fixed at 7") :]
    section = re.split(r"\n##+ ", section)[0]  # up to its first subsection
    rows = {
        line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| ")
    }
    cells = pd.read_csv(ROOT / "docs/examples/fashion_mnist_compare_gacd_pgd7/replicated.csv")
    cells = cells[cells["metric"].isin(["test/pgd_acc", "test/autoattack_acc", "transfer/pgd_acc"])]
    each, over = cells[cells["comparison"].notna()], cells[cells["comparison"].isna()]
    assert sorted(each["comparison"].unique()) == ["fp7_s0", "fp7_s1", "fp7_s2"]
    for cell in each.itertuples():  # a comparison's mean, in its sampler seed's row
        line = rows[cell.comparison.removeprefix("fp7_s")]
        assert f"{cell.mean:.3f}" in line, (cell.metric, cell.comparison, cell.method)
    assert len(over) == 6  # the spread over the three, in the last row
    for cell in over.itertuples():
        line = rows["over the three (mean ± std)"]
        assert f"{cell.mean:.3f} ± {cell.std:.3f}" in line, (cell.metric, cell.method)


def test_the_eight_trial_comparisons_tables_in_the_docs_are_what_their_reports_hold():
    """The tables of GACD's eight-trial searches (`--budget cpu+gacd_trials8`, and both methods
    at 8 trials) cite their shipped reports: in each sampler seed's row GACD's mean and TRADES'
    paired difference to it, in the last row GACD's mean ± std and TRADES' difference over the
    comparisons."""
    doc = (ROOT / "docs/benchmarks/fashion_mnist.md").read_text()
    folder = ROOT / "docs/examples/fashion_mnist_compare_gacd_ce_trials8"
    tables = [
        ("## Twice the trials for GACD", "replicated.csv", "fct8_s"),
        ("### Both at 8 trials", "replicated_both8.csv", "fcb8_s"),
    ]
    for heading, csv, prefix in tables:
        section = re.split(r"\n##+ ", doc[doc.index(heading) :])[0]
        rows = {
            line.split("|")[1].strip(): line
            for line in section.splitlines()
            if line.startswith("| ")
        }
        cells = pd.read_csv(folder / csv)
        cells = cells[
            cells["metric"].isin(["test/pgd_acc", "test/autoattack_acc", "transfer/pgd_acc"])
        ]
        comparisons = sorted(set(cells["comparison"].dropna()))
        assert len(cells) == 6 * (len(comparisons) + 1)
        for cell in cells.itertuples():
            over = pd.isna(cell.comparison)
            line = rows[
                f"over the {['two', 'three'][len(comparisons) - 2]} (mean ± std)"
                if over
                else cell.comparison.removeprefix(prefix)
            ]
            if cell.method == "gacd_ce":
                shown = f"{cell.mean:.3f} ± {cell.std:.3f}" if over else f"{cell.mean:.3f}"
            else:
                shown = f"{cell.diff:+.3f}, p={cell.p_value:.{3 if cell.p_value < 0.01 else 2}f}"
            assert shown in line, (csv, cell.metric, cell.comparison, cell.method, shown)
    for seed in (0, 1):  # each report of the uneven comparisons says its trials were not alike
        report = (folder / f"report_s{seed}.md").read_text()
        assert "the searches' trials differ (gacd_ce: 8; trades: 4;" in report
        assert "trials differ" not in (folder / f"report_both8_s{seed}.md").read_text()


def test_a_shared_key_searched_for_some_methods_only_is_named_with_what_the_others_train_at(
    tmp_path, capsys
):
    raw = comparison("/nowhere/teacher.pt")
    raw["compare"]["methods"]["natural"] = {
        "search": {"optim.lr": {"distribution": "loguniform", "low": 0.01, "high": 0.2}}
    }
    raw["compare"]["methods"]["trades"]["search"]["data.batch_size"] = {
        "distribution": "choice",
        "values": [32, 128],
    }
    spec = spec_from_dict(raw, teacher_cache=Path("/t"))
    # gacd alone searches attack.steps: the attack is a method's own (natural has none)
    assert shared_searchers({e: m.search for e, m in spec.compare.methods.items()}) == {
        "data.batch_size": ["trades"],
        "optim.lr": ["natural"],
    }
    notes = uneven_searches(spec)
    assert notes[0].startswith("data.batch_size is searched for trades only; gacd, natural ")
    assert "train at 64: a handicap for them" in notes[0]
    assert notes[1].startswith("optim.lr is searched for natural only; gacd, trades train at 0.05")
    path = tmp_path / "duel.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main([str(path), "--dry-run", "--storage", str(tmp_path / "results")]) == 0
    assert f"note       {notes[1]}" in capsys.readouterr().out
    lr = raw["compare"]["methods"]["natural"]["search"]["optim.lr"]
    for entry in ("gacd", "trades"):  # searched by all, the note goes
        raw["compare"]["methods"][entry]["search"]["optim.lr"] = lr
    raw["compare"]["methods"]["trades"]["search"].pop("data.batch_size")
    assert uneven_searches(spec_from_dict(raw, teacher_cache=Path("/t"))) == []
    # searched by all over different ranges: named, with who searches over which
    raw["compare"]["methods"]["trades"]["search"]["optim.lr"] = lr | {"high": 0.3}
    notes = uneven_searches(spec_from_dict(raw, teacher_cache=Path("/t")))
    assert len(notes) == 1 and notes[0].startswith("optim.lr is searched over different ranges (")
    assert "gacd, natural over loguniform 0.01 to 0.2;" in notes[0]
    assert "; trades over loguniform 0.01 to 0.3)" in notes[0]


BAD_COMPARISONS = [
    ({"methods": {"gacd": {"search": {}}}}, "compare.methods.gacd.search"),
    (
        {
            "methods": {
                "gacd": {
                    "num_samples": 0,
                    "search": {"tau": {"distribution": "choice", "values": [0.1]}},
                }
            }
        },
        "compare.methods.gacd.num_samples",
    ),
    ({"reference": "kd"}, "compare.reference"),
    ({"top": 0}, "compare.top"),
    ({"confirm_seeds": [3, 3]}, "compare.confirm_seeds"),
    ({"seeds": []}, "compare.seeds"),
    (
        {
            "methods": {
                "gacd": {
                    "method": "gacdd",
                    "search": {"tau": {"distribution": "choice", "values": [0.1]}},
                }
            }
        },
        "compare.methods.gacd.method",
    ),
    (
        {
            "methods": {
                "gacd": {
                    "overrides": {"method": "kd"},
                    "search": {"tau": {"distribution": "choice", "values": [0.1]}},
                }
            }
        },
        "compare.methods.gacd.overrides",
    ),
    (
        {
            "methods": {
                "gacd": {"search": {"tau": {"distribution": "uniform", "low": -1.0, "high": 0.5}}}
            }
        },
        "compare.methods.gacd.search.tau",
    ),
    (
        {
            "methods": {
                "gacd": {"search": {"negatives.count": {"distribution": "choice", "values": [64]}}}
            }
        },
        "compare.methods.gacd.search.negatives.count",
    ),
]


@pytest.mark.parametrize(("change", "key"), BAD_COMPARISONS)
def test_a_bad_comparison_is_refused_naming_the_key(tmp_path, change, key):
    raw = comparison("/nowhere/teacher.pt")
    raw["compare"] |= change
    with pytest.raises(ConfigError) as refused:
        spec_from_dict(raw)
    assert refused.value.key == key, str(refused.value)
    assert not any(tmp_path.iterdir())


def test_a_compare_section_outside_a_comparison_is_refused(tmp_path):
    raw = comparison("/nowhere/teacher.pt")
    raw["study"]["mode"] = "search"
    raw["search"] = {"tau": {"distribution": "uniform", "low": 0.1, "high": 0.2}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(
        ConfigFileError,
        match="study.yaml: config key 'compare': expected no compare section in a search",
    ):
        read_study_file(path)


def test_one_method_s_searched_values_never_reach_another_s_runs():
    spec = spec_from_dict(comparison("/nowhere/teacher.pt"))
    variants = explicit(
        spec,
        {
            "gacd": {"method": "gacd", "tau": 0.3, "attack.steps": 1},
            "trades": {"method": "trades", "trades_beta": 2.0},
        },
    )
    assert variants["trades"] == {
        "method": "trades",
        "tau": 0.1,  # gacd's default, not gacd's searched 0.3
        "attack.steps": 2,  # base's
        "trades_beta": 2.0,
    }
    assert variants["gacd"]["trades_beta"] == 6.0


def test_an_entry_s_override_of_what_a_method_decides_leaves_the_others_their_own():
    """An entry overriding the attack's objective (`gacd_ce`, `overrides: {attack.objective:
    ce}`) made every other entry's confirm and final runs take the base method's resolved
    objective, which TRADES refuses: the stage failed before it ran. Each takes its own."""
    raw = comparison("/nowhere/teacher.pt")
    raw["compare"]["methods"]["gacd"] |= {
        "method": "gacd",
        "overrides": {"attack.objective": "kl", "attack.step_size": 0.01},
    }
    raw["compare"]["methods"]["gacd_ce"] = {
        **raw["compare"]["methods"]["gacd"],
        "overrides": {"attack.objective": "ce"},
    }
    raw["base"]["method"] = "gacd"
    spec = spec_from_dict(raw)
    variants = explicit(
        spec,
        {
            entry: {"method": spec.compare.entry_method(entry), **m.overrides}
            for entry, m in spec.compare.methods.items()
        },
    )
    assert variants["trades"]["attack.objective"] == "auto"
    assert variants["trades"]["attack.step_size"] is None  # derived from its own epsilon
    stage = ablation_stage(spec, "final", "gacd", variants, [0], True, Path("/t"))
    attacks = {name: stage.trial_config({"variant": name, "seed": 0}).attack for name in variants}
    assert {name: a.objective for name, a in attacks.items()} == {
        "gacd": "kl",
        "trades": "trades",
        "gacd_ce": "ce",
    }
    epsilon = spec.trial_config({ENTRY_KEY: "trades"}).attack.epsilon
    assert attacks["trades"].step_size == pytest.approx(epsilon / 4)
    assert attacks["gacd"].step_size == 0.01


# --- the searcher and the scheduler ----------------------------------------------------------


def test_every_method_gets_exactly_its_trials_in_turn_each_in_its_own_optuna_study(tmp_path):
    spec = search_stage(spec_from_dict(comparison("/nowhere/teacher.pt")))
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = compare_searcher(spec, optuna_storage(url))
    proposals = [searcher.suggest(f"t{i}") for i in range(4)]
    assert [p[ENTRY_KEY] for p in proposals] == ["gacd", "trades", "gacd", "trades"]
    assert searcher.suggest("t4") == Searcher.FINISHED
    assert set(proposals[1]) == {ENTRY_KEY, "trades_beta", "optuna_trial_number"}
    for i in range(len(proposals)):
        result = {schema.EPOCH: 2, "epochs_total": 2, schema.VAL_PGD_ACC: 0.1 * (i + 1)}
        searcher.on_trial_complete(f"t{i}", result)
    for entry, values in (("gacd", [0.1, 0.3]), ("trades", [0.2, 0.4])):
        study = optuna.load_study(study_name=f"duel-search.{entry}", storage=url)
        assert [t.value for t in study.trials] == pytest.approx(values)
    saved = tmp_path / "searcher.pkl"
    searcher.save(str(saved))
    again = compare_searcher(spec, optuna_storage(url))
    again.restore(str(saved))
    assert again.suggest("t5") == Searcher.FINISHED  # a restored searcher proposes no more


def test_a_method_given_more_trials_gets_them_at_the_same_pace_as_the_others(tmp_path, capsys):
    """`compare.methods.gacd.num_samples: 4` beside the study's 2: gacd's search runs 4 trials,
    trades' 2, each advancing by the share of its own trials (trades is not left to the end),
    and every place that reports the comparison says the budget was not alike."""
    raw = comparison("/nowhere/teacher.pt")
    raw["compare"]["methods"]["gacd"]["num_samples"] = 4
    spec = search_stage(spec_from_dict(raw))
    assert trial_count(spec) == 6 and spec.trials_of("trades") == 2
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = compare_searcher(spec, optuna_storage(url))
    proposals = [searcher.suggest(f"t{i}") for i in range(6)]
    entries = [p[ENTRY_KEY] for p in proposals]
    assert entries == ["gacd", "trades", "gacd", "gacd", "trades", "gacd"]
    assert searcher.suggest("t6") == Searcher.FINISHED
    for i in range(len(entries)):
        result = {schema.EPOCH: 2, "epochs_total": 2, schema.VAL_PGD_ACC: 0.1 * (i + 1)}
        searcher.on_trial_complete(f"t{i}", result)
    for entry, count in (("gacd", 4), ("trades", 2)):
        study = optuna.load_study(study_name=f"duel-search.{entry}", storage=url)
        assert len(study.trials) == count
    notes = uneven_searches(spec)
    assert notes == [
        "the searches' trials differ (gacd: 4; trades: 2; compare.methods.ENTRY.num_samples): "
        "the budget table's trial-epochs say what each method's search spent"
    ]
    path = tmp_path / "duel.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main([str(path), "--dry-run", "--storage", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    assert "compare    2 methods, 6 trials;" in out and "study      duel (compare), 6 trials" in out
    assert "  gacd (gacd, 4 trials)" in out and "  trades (trades, 2 trials)" in out
    assert f"note       {notes[0]}" in out
    # the searches start from their defaults: no more points than the fewest trials
    raw["study"]["sampler"]["points_to_evaluate"] = ["defaults"] * 3
    raw["study"]["num_samples"] = 5
    raw["compare"]["methods"]["trades"]["num_samples"] = 2
    with pytest.raises(ConfigError) as refused:
        spec_from_dict(raw)
    assert refused.value.key == "study.sampler.points_to_evaluate"
    assert "the fewest trials a method's search has (2)" in str(refused.value)


def test_a_searcher_saved_before_entries_had_their_own_trials_restores_with_equal_ones(tmp_path):
    spec = search_stage(spec_from_dict(comparison("/nowhere/teacher.pt")))
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = compare_searcher(spec, optuna_storage(url))
    first = searcher.suggest("t0")
    state = searcher.__dict__.copy()  # as `CompareSearch.save` pickled it then
    state["trials_per_entry"] = state.pop("trials")[first[ENTRY_KEY]]
    saved = tmp_path / "searcher.pkl"
    saved.write_bytes(pickle.dumps(state))
    again = compare_searcher(spec, optuna_storage(url))
    again.restore(str(saved))
    assert again.trials == {"gacd": 2, "trades": 2}
    assert [again.suggest(f"t{i}")[ENTRY_KEY] for i in (1, 2, 3)] == ["trades", "gacd", "trades"]
    assert again.suggest("t4") == Searcher.FINISHED


def test_a_budget_may_give_one_method_s_search_more_trials_naming_an_entry_it_has(tmp_path):
    raw = comparison("/nowhere/teacher.pt")
    raw["budgets"] = {"wide": {"compare.methods.gacd.num_samples": 5, "study.num_samples": 3}}
    path = tmp_path / "duel.yaml"
    path.write_text(yaml.safe_dump(raw))
    spec = read_study_file(path, teacher_cache=tmp_path, budget="wide")
    assert (spec.trials_of("gacd"), spec.trials_of("trades")) == (5, 3)
    assert read_study_file(path, teacher_cache=tmp_path).trials_of("gacd") == 2
    raw["budgets"] = {"wide": {"compare.methods.gacdd.num_samples": 5}}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(
        ConfigFileError,
        match=r"'budgets.wide.compare.methods.gacdd.num_samples': expected an entry of "
        r"compare.methods \(gacd, trades\), got 'gacdd'",
    ):
        read_study_file(path, teacher_cache=tmp_path)
    raw["budgets"] = {"wide": {"compare.methods.gacd.search": {}}}  # what is searched: not a budget
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigFileError, match="or compare.methods.ENTRY.num_samples"):
        read_study_file(path, teacher_cache=tmp_path)


def test_a_method_s_trials_are_stopped_early_only_against_its_own():
    spec = search_stage(spec_from_dict(comparison("/nowhere/teacher.pt")))
    per_entry = scheduler(spec, epochs=4)
    assert isinstance(per_entry, PerEntryScheduler)
    per_entry.set_search_properties(schema.VAL_PGD_ACC, "max")

    def trial(name: str, entry: str):
        return SimpleNamespace(trial_id=name, config={ENTRY_KEY: entry})

    fast = [trial(f"g{i}", "gacd") for i in range(3)]
    slow = trial("t0", "trades")  # learns slowly: far below every gacd trial at epoch 1
    for item in [*fast, slow]:
        per_entry.on_trial_add(None, item)
    for item, value in zip(fast, (0.8, 0.9, 0.7), strict=True):
        per_entry.on_trial_result(None, item, {schema.EPOCH: 1, schema.VAL_PGD_ACC: value})
    decision = per_entry.on_trial_result(None, slow, {schema.EPOCH: 1, schema.VAL_PGD_ACC: 0.1})
    assert decision == TrialScheduler.CONTINUE
    worse = trial("g3", "gacd")
    per_entry.on_trial_add(None, worse)
    decision = per_entry.on_trial_result(None, worse, {schema.EPOCH: 1, schema.VAL_PGD_ACC: 0.1})
    assert decision == TrialScheduler.STOP


def test_too_few_full_budget_trials_are_filled_with_those_asha_stopped_latest():
    study = optuna.create_study(direction="maximize")

    def trial(values, state):
        running = study.ask()
        for epoch, value in enumerate(values, start=1):
            running.report(value, epoch)
        if state == optuna.trial.TrialState.COMPLETE:
            study.tell(running, values[-1])
        else:
            study.tell(running, state=state)

    pruned, complete = optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE
    trial([0.2, 0.3, 0.4, 0.5], complete)  # 0: the only one that ran its budget
    trial([0.7, 0.9], pruned)  # 1: best value, but stopped at the first rung
    trial([0.3, 0.4, 0.45], pruned)  # 2: passed two rungs
    trial([0.3, 0.5, 0.6], pruned)  # 3: passed two rungs, better there
    trial([0.1], optuna.trial.TrialState.FAIL)  # 4: failed
    trials = study.get_trials()
    assert [t.number for t in ranked(trials, 3, maximize=True)] == [0, 3, 2]
    assert [t.number for t in ranked(trials, 5, maximize=True)] == [0, 3, 2, 1]
    assert [t.number for t in ranked(trials, 1, maximize=True)] == [0]
    assert [t.number for t in ranked(trials, 3, maximize=False)] == [0, 2, 3]
    trial([0.1, 0.2, 0.3, 0.35], complete)  # 5: a second full-budget trial, worse than 0
    assert [t.number for t in ranked(study.get_trials(), 3, maximize=True)] == [0, 5, 3]
    # no trial ran its full budget: the search failed, however far the stopped ones went
    assert ranked([t for t in trials if t.state != complete], 2, maximize=True) == []


def test_a_search_started_from_its_defaults_confirms_them_beside_its_best():
    """`points_to_evaluate: [defaults]` in a comparison: every method's candidates are its
    defaults trial and its `top` best others, `top` + 1 alike, wherever the defaults rank."""
    from study.compare import with_defaults
    from study.search import ENQUEUED_ATTR

    def study_with(defaults_value, others, state=optuna.trial.TrialState.COMPLETE):
        study = optuna.create_study(direction="maximize")
        study.enqueue_trial({"x": 0.0}, user_attrs={ENQUEUED_ATTR: True})
        for value in [defaults_value, *others]:
            trial = study.ask({"x": optuna.distributions.FloatDistribution(-1.0, 1.0)})
            trial.report(value, 1)
            if value is None or state != optuna.trial.TrialState.COMPLETE:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                state = optuna.trial.TrialState.COMPLETE  # the defaults only
            else:
                study.tell(trial, value)
        return study.get_trials()

    numbers = lambda trials: [t.number for t in trials]  # noqa: E731
    # the defaults (trial 0) rank last: they join the 2 best, not replace the second
    assert numbers(with_defaults(study_with(0.1, [0.5, 0.4, 0.3]), 2, True)) == [1, 2, 0]
    # the defaults rank among the best: the 2 best others beside them, 3 alike
    assert numbers(with_defaults(study_with(0.45, [0.5, 0.4, 0.3]), 2, True)) == [1, 0, 2]
    assert numbers(with_defaults(study_with(0.9, [0.5, 0.4, 0.3]), 1, True)) == [0, 1]
    assert [t.user_attrs.get(ENQUEUED_ATTR) for t in study_with(0.9, [0.5])] == [True, None]
    # defaults that failed are not a candidate: the `top` best alone
    failed = study_with(0.9, [0.5, 0.4, 0.3], optuna.trial.TrialState.FAIL)
    assert numbers(with_defaults(failed, 2, True)) == [1, 2]
    # without defaults (an older study, or none asked for): `ranked` as it was
    plain = optuna.create_study(direction="maximize")
    for value in (0.2, 0.7, 0.5):
        plain.add_trial(optuna.trial.create_trial(value=value, intermediate_values={1: value}))
    assert numbers(with_defaults(plain.get_trials(), 2, True)) == [1, 2]


def test_a_comparison_s_trial_seeds_are_its_searches_and_trial_epochs_count_each(tmp_path):
    """`study.trial_seeds` in a comparison: each search trial trains both seeds; the confirm
    and final stages run one seed per run; the budget table counts every seed's epochs (from
    the runs' seed tags in a real MLflow store)."""
    raw = comparison("/nowhere/teacher.pt")
    raw["study"]["trial_seeds"] = [0, 1]
    spec = spec_from_dict(raw)
    stage = search_stage(spec)
    assert stage.study.trial_seeds == [0, 1]
    assert stage.trial_seeds({ENTRY_KEY: "trades", "trades_beta": 2.0}) == [0, 1]
    confirm = ablation_stage(spec, "confirm", "gacd", {"gacd": {}}, [1000], False, tmp_path)
    assert confirm.study.trial_seeds is None
    assert [c.seed for c in confirm.trial_configs({"variant": "gacd", "seed": 1000})] == [1000]

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("duel")
    for study, variant, entry, seeds, epochs in (
        ("duel-search", "gacd", "gacd", "0,1", 2),  # a search trial over two seeds
        ("duel-search", "gacd", "gacd", "0,1", 1),  # one ASHA stopped after an epoch
        ("duel-confirm", "gacd.trial-000", None, "1000", 2),
    ):
        tags = {schema.TAG_ROLE: schema.ROLE_TRIAL, schema.TAG_STUDY: study}
        tags |= {schema.TAG_VARIANT: variant, schema.TAG_SEED: seeds}
        if entry:
            tags[schema.TAG_ENTRY] = entry
        run = client.create_run(experiment, tags=tags)
        client.log_metric(run.info.run_id, schema.EPOCH, epochs, step=epochs)
        client.set_terminated(run.info.run_id)
    table = budget_table(uri, "duel", {"candidates": {"gacd": []}})
    assert table.loc["gacd", "search trial-epochs"] == 2 * (2 + 1)
    assert table.loc["gacd", "confirm trial-epochs"] == 2
    assert table.loc["gacd", "search trials"] == 2


def test_trial_hours_count_the_epochs_not_the_time_a_study_stood_between_interruption_and_resume(
    tmp_path,
):
    """A run resumed an hour after its study was interrupted spans that hour in MLflow; its
    trial-hours are the time its epochs took (their `time/epoch_s`, each epoch logged once).
    A run that logs no epoch time keeps its span."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("duel")
    start = 1_700_000_000_000
    for stage, epoch_seconds in (("duel-confirm", [30.0, 40.0, 90.0]), ("duel-final", [])):
        tags = {schema.TAG_ROLE: schema.ROLE_TRIAL, schema.TAG_STUDY: stage}
        tags |= {schema.TAG_VARIANT: "gacd.trial-000" if "confirm" in stage else "gacd"}
        run = client.create_run(experiment, start_time=start, tags=tags)
        # epochs 1 and 2, an hour's interruption, then epoch 3 after the resume
        for step, seconds in zip((1, 2, 3), epoch_seconds, strict=False):
            client.log_metric(run.info.run_id, schema.EPOCH_SECONDS, seconds, step=step)
        client.log_metric(run.info.run_id, schema.EPOCH, 3, step=3)
        client.set_terminated(run.info.run_id, end_time=start + 3_600_000 + 160_000)
    table = budget_table(uri, "duel", {"candidates": {"gacd": []}})
    assert table.loc["gacd", "confirm trial-hours"] == pytest.approx(160.0 / 3600.0)
    assert table.loc["gacd", "final trial-hours"] == pytest.approx(1.0 + 160.0 / 3600.0)


def test_the_budget_table_says_a_winner_was_stopped_early_or_confirmed_on_one_seed():
    stopped = {"name": "gacd.trial-003", "params": {}, "mean": 0.5, "std": 0.01, "stopped": True}
    assert winner_text(stopped) == "gacd.trial-003 (0.500 ± 0.010), stopped early in the search"
    alone = {"name": "gacd.trial-000", "params": {}, "mean": 0.5, "std": float("nan")}
    assert winner_text(alone) == "gacd.trial-000 (0.500, one seed)"


# --- seeds added on --resume ----------------------------------------------------------------


def test_added_seeds_run_only_what_they_add():
    spec = spec_from_dict(comparison("/nowhere/teacher.pt", seeds=[0, 1]))
    won = {"gacd": {"name": "gacd.trial-000"}, "trades": {"name": "trades.trial-001"}}
    state = {"done": ["winners"], "winners": won}
    first_rounds(state, {"confirm_seeds": [1000], "seeds": [0, 1]})
    assert confirm_rounds(spec, state) == [{"stage": "confirm", "seeds": [1000]}]
    assert final_rounds(spec, state) == [{"stage": "final", "seeds": [0, 1], "winners": won}]
    spec.compare.confirm_seeds, spec.compare.seeds = [1000, 1001, 1002], [0, 1, 2]
    assert confirm_rounds(spec, state)[1:] == [{"stage": "confirm-2", "seeds": [1001, 1002]}]
    assert confirm_rounds(spec, state)[1:] == [{"stage": "confirm-2", "seeds": [1001, 1002]}]
    # the added confirm seeds chose another trades: it runs on every final seed, gacd on 2 only
    state["winners"] = {**won, "trades": {"name": "trades.trial-000"}}
    assert final_rounds(spec, state)[1:] == [
        {"stage": "final-2", "seeds": [2], "winners": {"gacd": won["gacd"]}},
        {"stage": "final-3", "seeds": [0, 1, 2], "winners": {"trades": state["winners"]["trades"]}},
    ]
    assert len(final_rounds(spec, state)) == 3  # planned once: a resume continues those rounds


def test_the_final_table_reads_only_each_method_s_current_winner(tmp_path):
    """Two final rounds in a real MLflow store: pgd_at's first winner (replaced when confirm
    seeds were added) ran in `duel-final`; its runs count in no table, the new winner's do."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("duel", artifact_location=(tmp_path / "a").as_uri())
    ran = {  # stage -> variant -> seed -> test/pgd_acc
        "final": {"gacd": {0: 0.50, 1: 0.60}, "pgd_at": {0: 0.90, 1: 0.95}},
        "final-2": {"gacd": {2: 0.70}},
        "final-3": {"pgd_at": {0: 0.30, 1: 0.40, 2: 0.50}},
    }
    for stage, variants in ran.items():
        tags = {"role": "study", "study": f"duel-{stage}", "mode": "ablation"}
        tags |= {"metric": "test/pgd_acc", "direction": "max"}
        tags["variants"] = json.dumps(list(variants))
        parent = client.create_run(experiment, tags=tags).info.run_id
        for variant, seeds in variants.items():
            for seed, value in seeds.items():
                run_tags = {"role": "trial", "mlflow.parentRunId": parent, "variant": variant}
                run_id = client.create_run(experiment, tags=run_tags | {"seed": str(seed)})
                client.log_metric(run_id.info.run_id, "test/pgd_acc", value)
                client.set_terminated(run_id.info.run_id, "FINISHED")
    gacd, old, new = ({"name": name} for name in ("gacd.t0", "pgd_at.t0", "pgd_at.t2"))
    state = {
        "reference": "gacd",
        "winners": {"gacd": gacd, "pgd_at": new},
        "final_rounds": [
            {"stage": "final", "seeds": [0, 1], "winners": {"gacd": gacd, "pgd_at": old}},
            {"stage": "final-2", "seeds": [2], "winners": {"gacd": gacd}},
            {"stage": "final-3", "seeds": [0, 1, 2], "winners": {"pgd_at": new}},
        ],
    }
    study = final_study(uri, "duel", state)
    variant, seed = schema.tag_column("variant"), schema.tag_column("seed")
    got = {
        name: dict(zip(group[seed].astype(int), group["metrics.test/pgd_acc"], strict=True))
        for name, group in study.runs.groupby(variant)
    }
    assert got == {"gacd": {0: 0.50, 1: 0.60, 2: 0.70}, "pgd_at": {0: 0.30, 1: 0.40, 2: 0.50}}
    assert study.variants == ["gacd", "pgd_at"] and study.reference == "gacd"
    # a round that has not started yet is skipped, not an error
    state["final_rounds"].append({"stage": "final-4", "seeds": [3], "winners": {"gacd": gacd}})
    assert len(final_study(uri, "duel", state).runs) == 6


@pytest.mark.parametrize(
    ("saved", "now", "grown"),
    [
        ([1000], [1000, 1001], {"confirm_seeds": [1000, 1001]}),
        ([1000, 1001], [1000], {}),  # the file as it was before seeds were added: continue
        ([1000, 1001], [1000, 1001], {}),
    ],
)
def test_a_resume_may_append_seeds_to_a_comparison(saved, now, grown):
    spec = spec_from_dict(comparison("/nowhere/teacher.pt", confirm_seeds=now))
    resolved = {"compare": {"confirm_seeds": saved, "seeds": [0, 1]}}
    assert grown_seeds(resolved, spec) == grown


@pytest.mark.parametrize("now", [[1001], [1001, 1000], [1000, 1002]])
def test_a_resume_refuses_seeds_that_drop_or_reorder_what_ran(now):
    spec = spec_from_dict(comparison("/nowhere/teacher.pt", confirm_seeds=now))
    resolved = {"compare": {"confirm_seeds": [1000, 1001], "seeds": [0, 1]}}
    with pytest.raises(
        StudyError,
        match=r"compare.confirm_seeds of study 'duel' can only grow: "
        r"it has \[1000, 1001\], now .*--confirm-seeds 1000 1001 \.\.\.",
    ):
        grown_seeds(resolved, spec)


def test_a_resume_refuses_confirm_seeds_where_no_confirm_stage_runs():
    spec = spec_from_dict(comparison("/nowhere/teacher.pt", top=1, confirm_seeds=[1000, 1001]))
    resolved = {"compare": {"confirm_seeds": [1000], "seeds": [0, 1]}}
    with pytest.raises(
        StudyError,
        match=r"compare.top is 1 and its searches do not start from their defaults, so no confirm",
    ):
        grown_seeds(resolved, spec)
    spec.compare.confirm_seeds = [1000]
    spec.compare.seeds = [0, 1, 2]
    assert grown_seeds(resolved, spec) == {"seeds": [0, 1, 2]}


def test_a_dry_run_of_a_resume_says_what_added_seeds_would_run(tmp_path, capsys):
    """`--resume --dry-run` plans from the saved comparison, as the resume would run it."""
    path = tmp_path / "duel.yaml"
    path.write_text(yaml.safe_dump(comparison("/nowhere/teacher.pt", top=2)))
    storage = ["--storage", str(tmp_path / "results")]
    storage += ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    spec = read_study_file(path, teacher_cache=tmp_path / "results" / "teachers")
    folder = tmp_path / "results" / "duel"
    save_study_spec(folder, spec)
    found = {e: [{"name": f"{e}.trial-00{i}"} for i in (0, 1)] for e in ("gacd", "trades")}
    won = {entry: cs[0] for entry, cs in found.items()}
    done = ["search", "candidates", "confirm", "winners", "final"]
    state = {"done": done, "candidates": found, "winners": won, "failed": {}}
    (folder / STATE_FILE).write_text(json.dumps(state))

    def plan(*more: str) -> str:
        assert main([str(path), "--resume", "--dry-run", *storage, *more]) == 0
        return capsys.readouterr().out

    assert "resume " not in plan()
    out = plan("--final-seeds", "0", "1", "2")
    assert "final-2: gacd, trades on the added final seeds [2] (2 runs)" in out
    assert "the winners on seeds [0, 1, 2]" in out
    out = plan("--confirm-seeds", "1000", "1001", "1002")
    assert "confirm-2: every candidate on the added confirm seeds [1001, 1002] (8 runs)" in out
    assert "final: each winner on the final seeds [0, 1] it has not run on" in out
    assert json.loads((folder / STATE_FILE).read_text()) == state  # a plan changes nothing
    assert main([str(path), "--resume", "--dry-run", *storage, "--final-seeds", "1"]) == 2
    assert "compare.seeds of study 'duel' can only grow" in capsys.readouterr().err


def test_seeds_on_the_command_line_are_refused_outside_a_comparison(tmp_path, capsys):
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({"study": {"name": "s"}, "base": digits_base(epochs=1)}))
    assert main([str(path), "--confirm-seeds", "1000", "--dry-run"]) == 2
    assert "config key 'compare.confirm_seeds': expected a comparison" in capsys.readouterr().err


# --- end to end ------------------------------------------------------------------------------


@pytest.mark.slow
def interrupt_in_stage(command: list[str], stage: str) -> str:
    """`study.run` in its own process, sent SIGINT at its first epoch in `stage`; what it
    printed after that."""
    driver = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seen, inside = [], False
    for line in driver.stdout:
        seen.append(line)
        inside = inside or stage in line
        if inside and "epoch 1/2" in line:
            driver.send_signal(signal.SIGINT)
            break
    assert inside, "".join(seen[-40:])
    rest = driver.stdout.read()
    assert driver.wait(timeout=300) == 130, "".join(seen[-40:]) + rest[-3000:]
    return rest


@pytest.mark.slow
def test_a_comparison_runs_every_stage_reports_a_failed_method_and_resumes_losing_nothing(
    tmp_path, ray_cluster, robust_teacher_path
):
    raw = comparison(str(robust_teacher_path))
    raw["compare"]["methods"]["natural"] = {  # diverges: every trial fails
        "overrides": {"optim.momentum": 0.0},
        "search": {"optim.lr": {"distribution": "loguniform", "low": 1e5, "high": 1e6}},
        "num_samples": 3,  # its own trial count, kept through the interruption and resume
    }
    path = tmp_path / "duel.yaml"
    path.write_text(yaml.safe_dump(raw))
    args = study_args(tmp_path, ray_cluster)
    printed = interrupt_in_stage(
        [sys.executable, "-m", "study.run", str(path), *args], "stage confirm"
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert load_runs(uri, "duel", role=schema.ROLE_COMPARISON).status[0] == "KILLED"

    # the command it printed continues it: the same file, stores and cluster
    hint = next(line for line in printed.splitlines() if line.startswith("interrupted:"))
    resume = shlex.split(hint.split("continue with python -m study.run ", 1)[1])
    assert resume == [str(path), "--resume", *args[2:], *args[:2]]
    assert main(resume) == 0
    state = json.loads((tmp_path / "results" / "duel" / STATE_FILE).read_text())
    assert set(state["failed"]) == {"natural"}
    assert state["failed"]["natural"].startswith("search failed: no trial ran its full budget")
    assert "NonFiniteLossError" in state["failed"]["natural"]
    assert set(state["winners"]) == {"gacd", "trades"}

    comparison_run = load_runs(uri, "duel", role=schema.ROLE_COMPARISON)
    assert list(comparison_run.status) == ["FINISHED"]
    stages = load_runs(uri, "duel", role=schema.ROLE_STUDY)
    assert sorted(stages["tags.study"]) == ["duel-confirm", "duel-final", "duel-search"]
    assert set(stages["tags.mlflow.parentRunId"]) == {comparison_run.run_id[0]}
    assert set(stages.status) == {"FINISHED"}
    by_stage = {
        row["tags.study"]: load_runs(uri, "duel", parent_run_id=row.run_id)
        for _, row in stages.iterrows()
    }
    search = by_stage["duel-search"]
    assert search["tags.compare_entry"].value_counts().to_dict() == {
        "gacd": 2,
        "trades": 2,
        "natural": 3,
    }
    assert set(search.loc[search["tags.compare_entry"] == "natural", "tags.state"]) == {"failed"}
    # every number Optuna holds is the one MLflow and Ray recorded
    client = MlflowClient(uri)
    for entry in ("gacd", "trades"):
        study = optuna.load_study(
            study_name=f"duel-search.{entry}", storage=f"sqlite:///{tmp_path / 'optuna.db'}"
        )
        for trial in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
            run = search[search["tags.ray_trial_id"] == trial.user_attrs["ray_trial_id"]]
            history = client.get_metric_history(run.run_id.iloc[0], schema.VAL_PGD_ACC)
            assert trial.value == pytest.approx(history[-1].value, abs=1e-12)
    # the confirm stage re-ran each candidate on the fresh seed, once each after the resume
    confirm = by_stage["duel-confirm"]
    names = {c["name"] for found in state["candidates"].values() for c in found}
    # top 2 of 2 trials each, whether or not ASHA stopped one of them
    assert {entry: len(found) for entry, found in state["candidates"].items()} == {
        "gacd": 2,
        "trades": 2,
    }
    assert set(confirm["tags.variant"]) == names and len(confirm) == len(names)
    assert set(confirm["tags.seed"]) == {"1000"} and set(confirm.status) == {"FINISHED"}
    for run_id in confirm.run_id:
        steps = [m.step for m in client.get_metric_history(run_id, schema.VAL_PGD_ACC)]
        assert steps == [1, 2], steps
    assert not any(column.startswith("metrics.test/") for column in confirm.columns)
    # the winners on the test split; gacd's searched values stay gacd's
    final = by_stage["duel-final"]
    assert sorted(final.run_name) == ["gacd-seed0", "gacd-seed1", "trades-seed0", "trades-seed1"]
    assert "metrics.test/pgd_acc" in final and set(final.status) == {"FINISHED"}
    trades = final[final["tags.variant"] == "trades"]
    assert set(trades["params.attack.steps"]) == {"2"}
    won = state["winners"]["trades"]["params"]["trades_beta"]
    assert {float(beta) for beta in trades["params.trades_beta"]} == {won}
    report = (tmp_path / "results" / "duel" / "report" / "report.md").read_text()
    assert "| gacd " in report and "| trades " in report
    assert "natural**: search failed" in report
    # both checkpoints' tables, then the budget and the failure once
    assert report.count("## Test split") == 2 and report.count("## The budget") == 1
    assert report.count("natural**: search failed") == 1
    budget = (tmp_path / "results" / "duel" / "report" / "budget.csv").read_text()
    assert budget.count("\n") == 4  # a header and every method, the failed one included

    # seeds added on --resume run only what they add: each candidate on the new confirm seed,
    # the winners chosen again on both, each winner on the final seeds it lacks
    # (interrupted in its added confirm round, it continues with the file as it was)
    more = ["--confirm-seeds", "1000", "1001", "--final-seeds", "0", "1", "2"]
    command = [sys.executable, "-m", "study.run", str(path), "--resume", *args, *more]
    interrupt_in_stage(command, "stage confirm-2")
    assert main([str(path), "--resume", *args]) == 0
    grown = json.loads((tmp_path / "results" / "duel" / STATE_FILE).read_text())
    assert grown["growth"][0]["confirm_seeds"] == [1001] and grown["growth"][0]["seeds"] == [2]
    stages = load_runs(uri, "duel", role=schema.ROLE_STUDY).set_index("tags.study")
    assert len(load_runs(uri, "duel", parent_run_id=stages.run_id["duel-search"])) == 7
    assert len(load_runs(uri, "duel", parent_run_id=stages.run_id["duel-confirm"])) == len(names)
    again = load_runs(uri, "duel", parent_run_id=stages.run_id["duel-confirm-2"])
    assert set(again["tags.variant"]) == names and len(again) == len(names)
    assert set(again["tags.seed"]) == {"1001"} and set(again.status) == {"FINISHED"}
    # each winner has the best mean over both confirm seeds, as MLflow recorded them
    both = pd.concat([confirm, again])
    means = both.groupby("tags.variant")["metrics.val/pgd_acc"].mean()
    for entry, found in grown["candidates"].items():
        best = max((c["name"] for c in found), key=lambda name: means[name])
        assert grown["winners"][entry]["name"] == best
        assert grown["winners"][entry]["mean"] == pytest.approx(means[best], abs=1e-9)
    changed = grown["growth"][0]["winners_changed"]
    table = final_study(uri, "duel", grown).runs
    for entry in ("gacd", "trades"):
        mine = table[table["tags.variant"] == entry]
        assert sorted(mine["tags.seed"]) == ["0", "1", "2"], entry
        added = 3 if entry in changed else 1  # a changed winner runs on every final seed
        ran = 0
        for round_ in grown["final_rounds"][1:]:
            runs = load_runs(uri, "duel", parent_run_id=stages.run_id[f"duel-{round_['stage']}"])
            ran += int((runs["tags.variant"] == entry).sum())
        assert ran == added, (entry, changed)
    report = (tmp_path / "results" / "duel" / "report" / "report.md").read_text()
    assert "## Seeds added on resume" in report and "confirm seeds [1001]" in report
    # natural alone searched the learning rate: the report says so, as the run recorded it
    assert (
        "**Not searched alike:** optim.lr is searched for natural only; gacd, trades train at "
        "0.05: a handicap" in report
    )
    assert "**Not searched alike:** the searches' trials differ (natural: 3; gacd, trades: 2;" in (
        report
    )
    assert (
        "(each method's own search, the same scheduler and epoch budget, its own number" in report
    )
    assert report.startswith("# duel: every method tuned, its own number of trials, compared")
    # the file as it was continues the grown comparison, running nothing; a seed dropped is
    # refused, naming the key, and changes nothing
    assert main([str(path), "--resume", *args]) == 0
    assert len(load_runs(uri, "duel", role=schema.ROLE_STUDY)) == len(stages)
    before = (tmp_path / "results" / "duel" / STATE_FILE).read_text()
    assert main([str(path), "--resume", *args, "--confirm-seeds", "1001"]) == 2
    assert (tmp_path / "results" / "duel" / STATE_FILE).read_text() == before


@pytest.mark.slow
def test_a_comparison_from_its_defaults_confirms_them_and_a_winner_must_beat_them(
    tmp_path, ray_cluster, robust_teacher_path
):
    """`study.sampler.points_to_evaluate: [defaults]` and `compare.top: 1`: each method's search
    runs its base configuration first and to its full budget; the confirm stage (which `top: 1`
    alone would skip) re-runs its best trial and its defaults on the fresh seed; the winner is
    the better of the two as MLflow recorded them, and the report shows both."""
    raw = comparison(str(robust_teacher_path), top=1)
    del raw["compare"]["methods"]["gacd"]["search"]["attack.steps"]  # the base's PGD-2 is outside
    raw["study"]["sampler"]["points_to_evaluate"] = ["defaults"]
    path = tmp_path / "duel.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main([str(path), *study_args(tmp_path, ray_cluster)]) == 0

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    state = json.loads((tmp_path / "results" / "duel" / STATE_FILE).read_text())
    stages = load_runs(uri, "duel", role=schema.ROLE_STUDY).set_index("tags.study")
    search = load_runs(uri, "duel", parent_run_id=stages.run_id["duel-search"])
    confirm = load_runs(uri, "duel", parent_run_id=stages.run_id["duel-confirm"])
    spec = spec_from_dict(raw)
    for entry, key in (("gacd", "tau"), ("trades", "trades_beta")):
        mine = search[search["tags.compare_entry"] == entry]
        first = mine[mine[schema.tag_column(schema.TAG_POINT_TO_EVALUATE)] == "true"]
        assert len(first) == 1 and first["tags.state"].iloc[0] == "complete"  # its full budget
        base = spec.trial_config({ENTRY_KEY: entry})
        assert float(first[f"params.{key}"].iloc[0]) == pytest.approx(
            base.tau if key == "tau" else base.trades_beta
        )
        found = state["candidates"][entry]
        assert len(found) == 2 and [c.get("defaults", False) for c in found].count(True) == 1
        defaults = next(c["name"] for c in found if c.get("defaults"))
        assert defaults == f"{entry}.trial-000"  # enqueued first: Optuna's trial 0
        # both re-run on the confirm seed; the winner is the better, the defaults kept beside it
        value = confirm.set_index("tags.variant")["metrics.val/pgd_acc"]
        assert sorted(value.index[value.index.str.startswith(entry + ".")]) == sorted(
            c["name"] for c in found
        )
        won = state["winners"][entry]
        assert won["mean"] == pytest.approx(max(value[c["name"]] for c in found), abs=1e-9)
        assert won["defaults_confirmed"]["mean"] == pytest.approx(value[defaults], abs=1e-9)
        assert won["mean"] >= won["defaults_confirmed"]["mean"]
        assert won.get("defaults", False) == (won["name"] == defaults)
    budget = budget_table(uri, "duel", state)
    assert budget.loc["gacd", "confirm trials"] == 2 == budget.loc["trades", "confirm trials"]
    report = (tmp_path / "results" / "duel" / "report" / "report.md").read_text()
    assert "defaults (confirm mean ± std)" in report and "confirmed beside its best" in report
    capability = torch.backends.cpu.get_cpu_capability()
    assert f"Final runs' hardware: {cpu_model()}, {capability}, 1 thread, torch" in report

    # The same comparison again with the sampler's seed 1, beside the first in the same stores,
    # then both read together: each one's cells are its own final table's.
    assert main([str(path), "--sampler-seed", "1", *study_args(tmp_path, ray_cluster)]) == 0
    again = json.loads((tmp_path / "results" / "duel_sampler1" / STATE_FILE).read_text())
    assert again["reference"] == "gacd" and set(again["winners"]) == {"gacd", "trades"}
    proposed = {
        name: optuna.load_study(
            study_name=f"{name}-search.gacd", storage=f"sqlite:///{tmp_path / 'optuna.db'}"
        ).trials
        for name in ("duel", "duel_sampler1")
    }
    assert [len(trials) for trials in proposed.values()] == [2, 2]  # each its own studies
    first, second = (trials[1].params["tau"] for trials in proposed.values())
    assert first != second  # after the defaults, the other seed proposes another tau
    rep = replicated(uri, ["duel", "duel_sampler1"], ["test/pgd_acc"])
    for name, won in (("duel", state), ("duel_sampler1", again)):
        own = final_study(uri, name, won)
        alone = ablation_table(own.runs, ["test/pgd_acc"], "gacd", order=own.variants)
        mine = rep.cells[rep.cells["comparison"] == name].set_index("method")
        for method in ("gacd", "trades"):
            for key in ("mean", "std", "n", "diff", "p_value"):
                expected = alone.cell(method, "test/pgd_acc")[key]
                assert mine.loc[method, key] == pytest.approx(expected, nan_ok=True)
    means = rep.cells[rep.cells["method"] == "trades"]["mean"]
    summary = rep.summary.set_index("method")
    assert summary.loc["trades", "mean"] == pytest.approx(means.mean())
    assert summary.loc["trades", "ahead"] + summary.loc["trades", "behind"] <= 2


def test_a_budget_changes_what_each_method_gets_alike(tmp_path):
    path = ROOT / "search_spaces/fashion_mnist_compare.yaml"
    cpu = read_study_file(path, teacher_cache=tmp_path)
    full = read_study_file(path, teacher_cache=tmp_path, budget="full")
    assert (cpu.study.num_samples, full.study.num_samples) == (4, 8)
    assert (cpu.compare.confirm_seeds, full.compare.confirm_seeds) == ([1000], [1000, 1001])
    # budgets joined by `+` apply in turn: the scale's, then the search's start
    for scale, samples in (("cpu", 4), ("full", 8)):
        both = read_study_file(path, teacher_cache=tmp_path, budget=f"{scale}+from_defaults")
        assert both.study.num_samples == samples and both.study.budget == f"{scale}+from_defaults"
        assert both.starts_from_defaults and both.study.trial_seeds == [0, 1]
        assert not (cpu if scale == "cpu" else full).starts_from_defaults
    with pytest.raises(ConfigFileError, match=r"'budget': expected one of .* got 'fast'"):
        read_study_file(path, teacher_cache=tmp_path, budget="cpu+fast")
    baselines = read_study_file(
        ROOT / "search_spaces/fashion_mnist_baselines.yaml", teacher_cache=tmp_path
    )
    # every method gets the defaults table's student epochs at each budget: 7 on CPU, 30 in full
    variant = next(iter(baselines.variants()))
    cpu_epochs = baselines.trial_config({"variant": variant, "seed": 0}).optim.epochs
    assert cpu_epochs == 7
    for entry in cpu.compare.methods:
        assert cpu.trial_config({ENTRY_KEY: entry}).optim.epochs == cpu_epochs
        assert full.trial_config({ENTRY_KEY: entry}).optim.epochs == 30
    assert cpu.teacher.checkpoint == baselines.teacher.checkpoint  # one teacher for both tables


# --- several comparisons read together ------------------------------------------------------


def log_comparison(
    uri: str,
    name: str,
    finals: dict,
    reference: str = "gacd",
    study: dict | None = None,
    failed: dict | None = None,
    hardware: str = "Xeon, AVX512, 1 thread, torch 2",
) -> dict:
    """A finished comparison in a real MLflow store, as `study.compare` leaves it: its run
    (`role=comparison`) with `comparison.json` (and `study.json`, if `study` is given), its
    final stage's study run and the winners' final runs (`finals`: method -> seed ->
    test/pgd_acc)."""
    client = MlflowClient(uri)
    experiment = client.create_experiment(name)
    winners = {
        method: {"name": f"{method}.trial-00{i}", "params": {"optim.lr": 0.05 * (i + 1)}}
        for i, method in enumerate(finals)
    }
    state = {"reference": reference, "winners": winners, "failed": failed or {}}
    parent = client.create_run(experiment, tags={"role": "comparison"}).info.run_id
    client.log_dict(parent, state, "comparison.json")
    if study is not None:
        client.log_dict(parent, study, "study.json")
    tags = {"role": "study", "study": f"{name}-final", "mode": "ablation", "reference": reference}
    tags |= {"metric": "test/pgd_acc", "direction": "max", "variants": json.dumps(list(finals))}
    tags["mlflow.parentRunId"] = parent
    stage = client.create_run(experiment, tags=tags).info.run_id
    for method, seeds in finals.items():
        for seed, value in seeds.items():
            run_tags = {"role": "trial", "mlflow.parentRunId": stage, "variant": method}
            run = client.create_run(experiment, tags=run_tags | {"seed": str(seed)}).info.run_id
            client.log_metric(run, "test/pgd_acc", value)
            client.log_metric(run, "test/clean_acc", value + 0.2)
            client.log_param(run, "hardware", hardware)
            client.set_terminated(run, "FINISHED")
    return state


THREE = {  # comparison -> method -> seed -> test/pgd_acc
    "duel": {
        "gacd": {0: 0.80, 1: 0.82, 2: 0.81},
        "pgd_at": {0: 0.79, 1: 0.80, 2: 0.80},  # behind, not significantly
        "kd": {0: 0.50, 1: 0.55, 2: 0.52},
    },
    "duel_sampler1": {
        "gacd": {0: 0.80, 1: 0.81, 2: 0.79},
        "pgd_at": {0: 0.86, 1: 0.88, 2: 0.85},  # ahead, significantly
        "kd": {0: 0.60, 1: 0.61, 2: 0.58},
    },
    "duel_sampler2": {
        "gacd": {0: 0.78, 1: 0.82, 2: 0.80},
        "pgd_at": {0: 0.84, 1: 0.87, 2: 0.86},
        "kd": {0: 0.55, 1: 0.50},  # a seed short: paired over the seeds both ran
    },
}


@pytest.fixture
def three_comparisons(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for number, (name, finals) in enumerate(THREE.items()):
        study = {"study": {"name": name, "sampler": {"seed": number, "name": "tpe"}}}
        log_comparison(uri, name, finals, study=study | {"compare": {"seeds": [0, 1, 2]}})
    return uri


def test_several_comparisons_read_together_keep_each_one_s_cells_and_count_what_holds(
    three_comparisons,
):
    """Each comparison's cells as its own table has them, and over the three: the mean and
    std of the per-comparison means, ahead/behind counts, and a t-test over comparisons, all
    re-computed here from the logged values."""
    uri = three_comparisons
    rep = replicated(uri, list(THREE), ["test/pgd_acc"])
    assert rep.reference == "gacd" and rep.metrics == ["test/pgd_acc"]
    assert rep.seeds == {name: [0, 1, 2] for name in THREE}
    cells = rep.cells.set_index(["method", "comparison"])
    for name, finals in THREE.items():
        own = final_study(uri, name, comparison_state(uri, name))
        alone = ablation_table(own.runs, ["test/pgd_acc"], "gacd", order=own.variants)
        for method, seeds in finals.items():
            cell = cells.loc[(method, name)]
            assert cell["mean"] == pytest.approx(np.mean(list(seeds.values())), abs=1e-12)
            for key in ("mean", "std", "diff", "p_value"):
                assert cell[key] == pytest.approx(
                    alone.cell(method, "test/pgd_acc")[key], nan_ok=True
                )
            if method != "gacd":
                shared = sorted(seeds)
                here = [seeds[s] for s in shared]
                there = [finals["gacd"][s] for s in shared]
                assert cell["p_value"] == pytest.approx(scipy_stats.ttest_rel(here, there).pvalue)
    summary = rep.summary.set_index("method")
    for method in ("gacd", "pgd_at", "kd"):
        means = [np.mean(list(THREE[name][method].values())) for name in THREE]
        assert summary.loc[method, "mean"] == pytest.approx(np.mean(means))
        assert summary.loc[method, "std"] == pytest.approx(np.std(means, ddof=1))
        assert summary.loc[method, "comparisons"] == 3
    diffs = [
        np.mean([THREE[n]["pgd_at"][s] - THREE[n]["gacd"][s] for s in THREE[n]["pgd_at"]])
        for n in THREE
    ]
    assert summary.loc["pgd_at", "diff"] == pytest.approx(np.mean(diffs))
    assert summary.loc["pgd_at", "p_value"] == pytest.approx(
        scipy_stats.ttest_1samp(diffs, 0).pvalue
    )
    assert summary.loc[
        "pgd_at", ["ahead", "ahead_significant", "behind", "behind_significant"]
    ].tolist() == [2, 2, 1, 0]
    # kd's third comparison pairs 2 seeds only: behind there, but not separated (p = 0.10)
    assert summary.loc["kd", ["ahead", "behind", "behind_significant"]].tolist() == [0, 3, 2]
    assert np.isnan(summary.loc["gacd", "diff"])  # the reference against itself: nothing

    alone = comparison_markdown(uri, "duel", comparison_state(uri, "duel"))
    assert "Final runs' hardware: Xeon, AVX512, 1 thread, torch 2." in alone
    # what was varied, and nothing else: their names aside, only the sampler's seed differs
    assert rep.differences.to_dict(orient="index") == {
        "study.sampler.seed": {"duel": 0, "duel_sampler1": 1, "duel_sampler2": 2}
    }
    page = replicated_markdown(rep)
    assert "| study.sampler.seed |" in page
    # no study.json: the page says so; a method whose search failed: its row says so
    without = {k: v for k, v in THREE["duel"].items() if k != "kd"}
    failed = {"kd": "no trial ran its full budget"}
    log_comparison(uri, "unrecorded", without, failed=failed, hardware="EPYC, AVX2, 1 thread")
    unknown = replicated_markdown(replicated(uri, ["duel", "unrecorded"]))
    assert re.search(r"\| study.json +\| recorded +\| not recorded +\|", unknown)
    # and it ran on another machine, whose kernels round otherwise: said too
    assert re.search(r"\| hardware \(final runs\) +\| Xeon, AVX512.* +\| EPYC, AVX2.* +\|", unknown)
    assert re.search(r"\| kd +\| lr 0.15 +\| failed +\|", unknown)
    assert "ahead in 0 of 1 (0 significant), behind in 1 (1)" in unknown  # kd: 1 of its 2 ran
    row = next(line for line in page.splitlines() if line.startswith("| pgd_at"))
    assert (
        "0.797 " in row
        and "0.863*" in row
        and "ahead in 2 of 3 (2 significant), behind in 1 (0)" in row
    )
    reference_row = next(line for line in page.splitlines() if line.startswith("| gacd"))
    assert " 0.800 |" in reference_row  # three digits, as written, not re-parsed to 0.8
    section = page.split("(`test/pgd_acc`)")[1].split("\n\n")[1]
    order = [line.split("|")[1].strip() for line in section.splitlines()]
    assert [order[0], *order[2:]] == [
        "method",
        "gacd",
        "pgd_at",
        "kd",
    ]  # the reference, then best first
    assert "lr 0.1" in page  # pgd_at's winner's values, each comparison
    tidy = pd.read_csv(io.StringIO(replicated_csv(rep)))
    assert len(tidy) == 9 + 3 and tidy["comparison"].isna().sum() == 3  # cells, then over all
    assert "\\begin{tabular}" in replicated_latex(rep) and "$\\pm$" in replicated_latex(rep)


def test_several_comparisons_on_the_command_line_write_every_format_and_default_to_accuracies(
    three_comparisons, tmp_path, capsys
):
    from analysis.compare import main as compare_main

    out = tmp_path / "together"
    assert (
        compare_main(
            ["--experiment", *THREE, "--tracking-uri", three_comparisons, "--out", str(out)]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "replicated.csv",
        "replicated.md",
        "replicated.tex",
    ]
    page = (out / "replicated.md").read_text()
    assert "(`test/clean_acc`)" in page and "(`test/pgd_acc`)" in page  # every accuracy logged
    assert capsys.readouterr().out.strip() == str(out / "replicated.md")
    assert (
        compare_main(
            [
                "--experiment",
                "duel",
                "duel_sampler1",
                "--tracking-uri",
                three_comparisons,
                "--format",
                "csv",
            ]
        )
        == 0
    )
    assert set(pd.read_csv(io.StringIO(capsys.readouterr().out))["metric"]) == {
        "test/clean_acc",
        "test/pgd_acc",
    }


@pytest.mark.parametrize(
    ("experiments", "extra", "message"),
    [
        (["duel", "nowhere"], [], "no MLflow experiment 'nowhere'"),
        (["duel", "duel"], [], "each comparison once"),
        (
            ["duel", "duel_sampler1"],
            ["--metrics", "test/cw_acc"],
            "no final run logged test/cw_acc",
        ),
        (["duel", "other_reference"], [], "must share their reference"),
        (["duel"], ["--metrics", "test/pgd_acc"], "only for several comparisons"),
    ],
)
def test_several_comparisons_that_cannot_be_read_together_are_refused_by_name(
    three_comparisons, experiments, extra, message, capsys
):
    from analysis.compare import main as compare_main

    log_comparison(three_comparisons, "other_reference", THREE["duel"], reference="pgd_at")
    with pytest.raises(SystemExit) if message.startswith("only") else contextlib.nullcontext():
        code = compare_main(
            ["--experiment", *experiments, "--tracking-uri", three_comparisons, *extra]
        )
        assert code == 2
    assert message in capsys.readouterr().err


def test_a_sampler_seed_renames_the_study_and_changes_only_its_sampler(tmp_path):
    path = ROOT / "search_spaces/digits_compare.yaml"
    first = read_study_file(path, teacher_cache=tmp_path)
    again = read_study_file(path, teacher_cache=tmp_path, sampler_seed=1)
    assert again.name == "digits_compare_sampler1" and again.study.sampler.seed == 1
    assert first.study.sampler.seed == 0
    named = read_study_file(path, "mine", teacher_cache=tmp_path, sampler_seed=3)
    assert named.name == "mine" and named.study.sampler.seed == 3
    first_source, again_source = spec_source(first), spec_source(again)
    for source in (first_source, again_source):
        source["study"].pop("name")
        source["study"]["sampler"].pop("seed")
    assert first_source == again_source
    with pytest.raises(ConfigFileError, match="an ablation proposes nothing"):
        read_study_file(ROOT / "search_spaces/digits_ablation.yaml", sampler_seed=1)


def test_an_interrupted_study_names_the_command_that_resumes_it():
    """Everything that says which study ran and where comes back: a resume without the budget
    or the sampler seed would be refused (another study), without the stores would not find it."""
    from study.run import parse_args, resume_command

    given = ["my study.yaml", "--budget", "cpu+from_defaults", "--sampler-seed", "1"]
    given += ["--storage", "/r", "--tracking-uri", "sqlite:////r/m.db", "--num-cpus", "2"]
    command = resume_command(parse_args(given))
    assert shlex.split(command)[3:] == [
        "my study.yaml",
        "--resume",
        "--budget",
        "cpu+from_defaults",
        "--sampler-seed",
        "1",
        "--storage",
        "/r",
        "--tracking-uri",
        "sqlite:////r/m.db",
    ]
    assert command.startswith("python -m study.run 'my study.yaml' --resume")
