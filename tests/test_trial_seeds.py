"""A trial over several training seeds (`study.trial_seeds`): `gacd.train.fit_seeds` trains each
seed exactly as `fit` alone would, resumes to the same weights, and reports the mean."""

from __future__ import annotations

import dataclasses
import math
import pickle

import pytest
import torch

from gacd import schema
from gacd.checkpoint import CheckpointError
from gacd.config import ConfigError
from gacd.train import fit, fit_seeds, seed_mean
from study.spec import spec_from_dict
from study.trainable import checkpoint_files, later
from tests.conftest import digits_config
from tests.test_study_spec import digits_search, planned


def seeded_configs(teacher_path, seeds=(0, 1), **overrides):
    config = digits_config(
        **{
            "teacher.checkpoint": str(teacher_path),
            "optim.epochs": 3,
            "data.train_subset": 256,
            "eval.max_samples": 64,
            **overrides,
        }
    )
    return [dataclasses.replace(config, seed=seed) for seed in seeds]


def without_time(history):
    return [{k: v for k, v in epoch.items() if k != schema.EPOCH_SECONDS} for epoch in history]


def assert_same_weights(first, second):
    for name, value in first.method.state_dict().items():
        assert torch.equal(value, second.method.state_dict()[name]), name


def test_each_seed_of_a_trial_trains_exactly_as_it_would_alone(robust_teacher_path):
    configs = seeded_configs(robust_teacher_path)
    reports = []
    together = fit_seeds(configs, report=lambda epochs, states: reports.append(epochs))
    torch.manual_seed(12345)
    before = torch.get_rng_state()
    alone = [fit(config) for config in configs]
    for pair in zip(together, alone, strict=True):
        assert_same_weights(*pair)
        assert without_time(pair[0].history) == without_time(pair[1].history)
    # the seeds differ (else the test could not tell them apart), each epoch reported once
    assert alone[0].history[-1]["train/loss"] != alone[1].history[-1]["train/loss"]
    assert [len(epochs) for epochs in reports] == [2, 2, 2]
    # the caller's generators are left as they were
    torch.set_rng_state(before)
    fit_seeds(configs[:1])
    assert torch.equal(torch.get_rng_state(), before)


def test_a_trial_over_seeds_resumed_mid_run_ends_where_an_uninterrupted_one_does(
    robust_teacher_path,
):
    configs = seeded_configs(robust_teacher_path, **{"negatives.source": "memory_bank"})
    saved = []
    uninterrupted = fit_seeds(
        configs, report=lambda epochs, states: saved.append(pickle.loads(pickle.dumps(states)))
    )
    resumed = fit_seeds(configs, resumes=saved[0])
    for pair in zip(uninterrupted, resumed, strict=True):
        assert_same_weights(*pair)
        assert without_time(pair[0].history) == without_time(pair[1].history)
    with pytest.raises(CheckpointError, match="different epochs"):
        fit_seeds(configs, resumes=[saved[0][0], saved[1][1]])
    # the states a trial restores from: the one with the most epochs done, all its seeds
    assert later(saved[0], None, saved[1]) is saved[1]


def test_seed_mean_averages_every_metric_sums_the_time_and_keeps_each_seed_s_validation():
    epochs = [
        {"epoch": 2, "val/pgd_acc": 0.5, "train/loss": 1.0, schema.EPOCH_SECONDS: 3.0},
        {"epoch": 2, "val/pgd_acc": 0.25, "train/loss": 2.0, schema.EPOCH_SECONDS: 4.0},
    ]
    mean = seed_mean([7, 9], epochs)
    assert mean == {
        "epoch": 2,
        "val/pgd_acc": 0.375,
        "train/loss": 1.5,
        schema.EPOCH_SECONDS: 7.0,
        "seeds/7/val/pgd_acc": 0.5,
        "seeds/9/val/pgd_acc": 0.25,
    }
    assert isinstance(mean["epoch"], int)  # as a trial of one seed reports it
    schema.check_metric_names(mean)  # a family MLflow logs
    assert schema.seeds_in_tag(schema.seed_tag([7, 9])) == 2
    assert schema.seeds_in_tag("3") == 1 and schema.seeds_in_tag(math.nan) == 1
    assert checkpoint_files([3]) == ["checkpoint.pt"]
    assert checkpoint_files([7, 9]) == ["checkpoint.seed7.pt", "checkpoint.seed9.pt"]


def test_fit_seeds_refuses_what_is_not_one_configuration_on_several_seeds(robust_teacher_path):
    configs = seeded_configs(robust_teacher_path)
    with pytest.raises(ConfigError, match="distinct seeds"):
        fit_seeds([configs[0], configs[0]])
    with pytest.raises(ConfigError, match="differ in optim"):
        other = dataclasses.replace(
            configs[1], optim=dataclasses.replace(configs[1].optim, lr=0.01)
        )
        fit_seeds([configs[0], other])
    with pytest.raises(ConfigError, match="got no configs"):
        fit_seeds([])


def search(**study):
    return {
        "study": {"name": "s", "mode": "search", **study},
        "base": {"method": "natural"},
        "search": {"optim.lr": {"distribution": "loguniform", "low": 0.01, "high": 0.1}},
    }


def test_a_search_s_trial_configs_are_one_per_trial_seed():
    spec = spec_from_dict(search(trial_seeds=[4, 5, 6]))
    configs = spec.trial_configs({"optim.lr": 0.02})
    assert [c.seed for c in configs] == [4, 5, 6] == spec.trial_seeds({"optim.lr": 0.02})
    assert {c.optim.lr for c in configs} == {0.02}
    assert [c.seed for c in spec_from_dict(search()).trial_configs({})] == [0]


@pytest.mark.parametrize(
    "change, key, expected",
    [
        ({"trial_seeds": [1, 1]}, "study.trial_seeds", "distinct seeds"),
        ({"trial_seeds": []}, "study.trial_seeds", "non-empty"),
        ({"trial_seeds": [0, "a"]}, "study.trial_seeds[1]", "an integer"),
        ({"trial_seeds": 2}, "study.trial_seeds", "expected a list"),
        ({"base_seed": 3}, "base.seed", "no seed beside study.trial_seeds"),
        ({"mode": "ablation"}, "study.trial_seeds", "ablation.seeds"),
    ],
)
def test_bad_trial_seeds_are_refused_naming_the_key(change, key, expected):
    raw = search(trial_seeds=[0, 1])
    if "trial_seeds" in change:
        raw["study"]["trial_seeds"] = change["trial_seeds"]
    if "base_seed" in change:
        raw["base"]["seed"] = change["base_seed"]
    if "mode" in change:
        raw["study"] |= {"mode": "ablation", "scheduler": {"name": "none"}}
        raw["ablation"] = {"seeds": [0]}
        del raw["search"]
    with pytest.raises(ConfigError) as error:
        spec_from_dict(raw)
    assert key in str(error.value) and expected in str(error.value), str(error.value)


def test_a_dry_run_says_each_trial_trains_on_every_trial_seed(tmp_path, capsys):
    spec = digits_search()
    spec["study"]["trial_seeds"] = [3, 4]
    assert planned(tmp_path, spec)[0] == 0
    assert "on each of seeds [3, 4] (their mean reported)" in capsys.readouterr().out


def test_a_trial_lists_each_seed_s_own_splits_and_the_shared_test_split_once(tmp_path):
    """MLflow's Dataset column for a trial over seeds 0 and 1: each seed's training and
    validation split (each drawn from its seed), tagged with it; the test split, which every
    seed shares, once with both. A one-seed run lists its splits without a seed."""
    from gacd.data import load_datasets
    from study.tracking import dataset_inputs
    from study.trainable import seeds_splits

    configs = seeded_configs(tmp_path / "teacher.pt")
    data = [load_datasets(c.data, c.seed, with_test=True) for c in configs]
    splits = seeds_splits(configs, data)
    seeds = {(split["context"], tuple(split["seeds"])) for split in splits}
    assert seeds == {
        ("training", (0,)),
        ("training", (1,)),
        ("validation", (0,)),
        ("validation", (1,)),
        ("test", (0, 1)),
    }
    assert len({split["digest"] for split in splits}) == 5
    tags = [{tag.key: tag.value for tag in i.tags} for i in dataset_inputs(splits)]
    assert {"mlflow.data.context": "test", "seed": "0,1"} in tags
    alone = seeds_splits(configs[:1], data[:1])
    assert [split["context"] for split in alone] == ["training", "validation", "test"]
    assert [[tag.key for tag in i.tags] for i in dataset_inputs(alone)] == [
        ["mlflow.data.context"]
    ] * 3
