"""Study files: every shipped one plans, bad ones fail at the edge, searchers see full budgets."""

import copy
import socket
from pathlib import Path

import optuna
import pytest
import yaml

from gacd.config import Config
from study.confirm import confirm_spec
from study.run import main, save_study_spec
from study.search import (
    ENQUEUED_ATTR,
    FULL_BUDGET_ATTR,
    RAY_TRIAL_ID_ATTR,
    StudyASHA,
    StudySearch,
    search_space,
    searcher,
)
from study.spec import (
    ENTRY_KEY,
    EPOCHS_TOTAL,
    POINT_KEY,
    ConfigError,
    config_hash,
    read_study_file,
    spec_from_dict,
)

ROOT = Path(__file__).resolve().parents[1]
SPACES = sorted((ROOT / "search_spaces").glob("*.yaml"))


def digits_search(**sections) -> dict:
    """A small valid search on digits; `sections` replace or extend its parts."""
    spec = {
        "study": {"name": "unit", "mode": "search", "num_samples": 2},
        "teacher": {"checkpoint": "teacher.pt"},
        "base": {
            "data": {"name": "digits"},
            "optim": {"epochs": 4},
            "attack": {"epsilon": 0.1, "steps": 2},
        },
        "search": {"tau": {"distribution": "loguniform", "low": 0.02, "high": 0.5}},
    }
    spec.update(sections)
    return spec


def planned(tmp_path: Path, spec: dict, *extra: str) -> tuple[int, str]:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return run_main(tmp_path, str(path), "--dry-run", *extra)


def run_main(tmp_path: Path, *args: str) -> tuple[int, str]:
    storage = ["--storage", str(tmp_path / "results")]
    uri = ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    return main([*args, *storage, *uri]), ""


# Every shipped study file as written, and under each of its budgets.
SHIPPED = [
    (path, budget)
    for path in SPACES
    for budget in [None, *(yaml.safe_load(path.read_text()).get("budgets") or {})]
]


@pytest.mark.parametrize(
    "path, budget", SHIPPED, ids=[f"{p.name}[{b}]" if b else p.name for p, b in SHIPPED]
)
def test_every_shipped_study_passes_dry_run(path, budget, tmp_path, capsys):
    extra = ["--budget", budget] if budget else []
    code, _ = run_main(tmp_path, str(path), "--dry-run", *extra)
    out = capsys.readouterr().out
    assert code == 0
    assert f"study      {read_study_file(path, budget=budget).name}" in out
    assert str(tmp_path / "results") in out and "mlflow" in out and "optuna" in out
    # what a study saves to be checked on --resume reads back to itself (study.run.read_as_now)
    from study.run import spec_source

    teachers = tmp_path / "results" / "teachers"
    source = spec_source(read_study_file(path, teacher_cache=teachers, budget=budget))
    assert spec_source(spec_from_dict(copy.deepcopy(source), teacher_cache=teachers)) == source


def test_trial_values_follow_precedence(tmp_path):
    spec = spec_from_dict(
        {
            **digits_search(search={}),
            "study": {"name": "ablate", "mode": "ablation"},
            "ablation": {
                "reference": {"tau": 0.2, "reweight.gamma": 2.0},
                "variants": {"no_reweight": {"reweight.gamma": 0}},
                "seeds": [3, 4],
            },
        }
    )
    full = spec.trial_config({"variant": "full", "seed": 4})
    variant = spec.trial_config({"variant": "no_reweight", "seed": 3})
    assert (full.tau, full.reweight.gamma, full.seed, full.final) == (0.2, 2.0, 4, True)
    assert (variant.tau, variant.reweight.gamma, variant.seed) == (0.2, 0.0, 3)
    assert variant.teacher.checkpoint == str(Path("teacher.pt").resolve())
    assert list(spec.variants()) == ["full", "no_reweight"]


def test_a_search_never_sees_the_test_split_and_pins_the_evaluation_budget():
    spec = spec_from_dict(
        digits_search(
            search={"attack.epsilon": {"distribution": "choice", "values": [0.05, 0.1]}},
            base={"data": {"name": "digits"}, "attack": {"epsilon": 0.1}, "final": True},
        )
    )
    trial = spec.trial_config({"attack.epsilon": 0.05})
    assert trial.final is False
    assert trial.attack.epsilon == 0.05 and trial.eval.epsilon == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"study": {"name": "unit", "mode": "serch"}}, "'study.mode'"),
        ({"study": {"name": "unit", "metrik": "x"}}, "did you mean 'study.metric'"),
        ({"study": {"name": "unit", "metric": "test/pgd_acc"}}, "'study.metric': expected one of"),
        ({"study": {"name": "has space"}}, "'study.name'"),
        ({"study": {"name": "unit", "num_samples": 0}}, "'study.num_samples'"),
        ({"resources": {"gpus_per_trial": -1}}, "'resources.gpus_per_trial'"),
        ({"resources": {"gpus_per_trial": 1.5}}, "'resources.gpus_per_trial': expected a number"),
        ({"resources": {"cpus": 2}}, "did you mean 'resources.cpus_per_trial'"),
        ({"base": {"atack": {}}}, "'base.atack'"),
        ({"base": {"attack": {"epsilon": 1.5}}}, "'base.attack.epsilon'"),
        ({"base": {"student": {"arch": "resnet81"}}}, "did you mean 'resnet18'"),
        ({"base": {"data": {"name": "cifar11"}}}, "'base.data.name': expected unknown data set"),
        ({"base": {"method": "gacdd"}}, "did you mean 'gacd'"),
        ({"base": {"attack": {"objective": "cw"}}}, "'base.attack.objective': expected one of"),
        (
            {"study": {"name": "unit", "num_samples": "many"}},
            "'study.num_samples': expected an int",
        ),
        ({"resources": {"cpus_per_trial": "two"}}, "'resources.cpus_per_trial': expected a number"),
        ({"search": {}}, "'search': expected at least one"),
        (
            {"search": {"tua": {"distribution": "uniform", "low": 0, "high": 1}}},
            "'search.tua'",
        ),
        (
            {"search": {"tau": {"distribution": "uniform", "low": 0.5, "high": 0.1}}},
            "'search.tau.low': expected less than high",
        ),
        (
            {"search": {"tau": {"distribution": "loguniform", "low": 0, "high": 0.1}}},
            "'search.tau.low': expected a number > 0",
        ),
        ({"search": {"tau": {"distribution": "choice", "values": []}}}, "'search.tau.values'"),
        ({"search": {"tau": {"distribution": "normal"}}}, "'search.tau.distribution'"),
        (
            {"search": {"attack.epsilon": {"distribution": "choice", "values": [0.1, -0.1]}}},
            "'search.attack.epsilon': expected values valid for config key 'attack.epsilon'",
        ),
        (
            {"search": {"attack.steps": {"distribution": "choice", "values": [0, 1]}}},
            "'search.attack.steps'",
        ),
        (
            {
                "study": {"name": "unit", "scheduler": {"name": "asha", "grace_period": 9}},
            },
            "'study.scheduler.grace_period': expected at most base.optim.epochs (4)",
        ),
        ({"teacher": {"train": {"method": "gacd"}}}, "'teacher.train.teacher.checkpoint'"),
        ({"teacher": {"train": {"method": "pgd_at", "attack": {"steps": 0}}}}, "'teacher.train"),
        ({"teacher": {}}, "'teacher': expected either checkpoint"),
        (
            {"resources": {"teacher_workers": 0}},
            "'resources.teacher_workers': expected an integer >= 1",
        ),
        ({"resources": {"teacher_workers": "all"}}, "'resources.teacher_workers'"),
        (
            {"resources": {"gpus_per_trial": 2, "workers_per_trial": 3}},
            "'resources.workers_per_trial': expected at most one worker per whole GPU",
        ),
        ({"resources": {"workers_per_trial": True}}, "'resources.workers_per_trial'"),
        ({"ablation": {"seeds": [0]}}, "'ablation': expected no ablation section"),
        ({"budgets": {"full": 3}}, "'budgets': expected a mapping of budget names"),
        (
            {"budgets": {"full": {"search.tau.low": 0.1}}},
            "'budgets.full.search.tau.low': expected a dotted key under study, resources",
        ),
        (
            {"study": {"name": "unit", "budget": "ful"}, "budgets": {"full": {}}},
            "'budget': expected one of this file's budgets (full), or several joined by '+', "
            "got 'ful'",
        ),
        (
            {
                "budgets": {"full": {"base.optim.epochs": 0}},
                "study": {"name": "u", "budget": "full"},
            },
            "'base.optim.epochs'",
        ),
        (
            {"study": {"name": "u", "sampler": {"points_to_evaluate": [{"tua": 0.1}]}}},
            "'study.sampler.points_to_evaluate[0].tua': expected one of the searched keys (tau)",
        ),
        (
            {"study": {"name": "u", "sampler": {"points_to_evaluate": [{"tau": 0.9}]}}},
            "'study.sampler.points_to_evaluate[0].tau': expected a value inside search.tau "
            "(loguniform 0.02 to 0.5), got 0.9",
        ),
        (
            {"study": {"name": "u", "sampler": {"points_to_evaluate": ["default"]}}},
            "'study.sampler.points_to_evaluate[0]': expected 'defaults' or a mapping",
        ),
        (
            {
                "study": {
                    "name": "u",
                    "num_samples": 2,
                    "sampler": {"points_to_evaluate": ["defaults"] * 3},
                }
            },
            "'study.sampler.points_to_evaluate': expected at most study.num_samples (2) points",
        ),
        (
            {
                "study": {"name": "u", "sampler": {"points_to_evaluate": ["defaults"]}},
                "base": {"data": {"name": "digits"}, "tau": 0.01},
            },
            "'study.sampler.points_to_evaluate[0] (defaults): the base value of tau': expected "
            "a value inside search.tau (loguniform 0.02 to 0.5), got 0.01",
        ),
        (
            {
                "study": {"name": "u", "sampler": {"points_to_evaluate": [{"attack.steps": 4}]}},
                "search": {"attack.steps": {"distribution": "int", "low": 1, "high": 5, "step": 2}},
            },
            "expected a value inside search.attack.steps (int 1 to 5 in steps of 2), got 4",
        ),
        (
            {
                "study": {"name": "u", "sampler": {"points_to_evaluate": [{"attack.steps": 0}]}},
                "search": {"attack.steps": {"distribution": "int", "low": 1, "high": 5}},
            },
            "'study.sampler.points_to_evaluate[0].attack.steps': expected",
        ),
    ],
)
def test_bad_study_files_fail_with_the_file_and_dotted_key(tmp_path, capsys, change, fragment):
    code, _ = planned(tmp_path, digits_search(**change))
    error = capsys.readouterr().err
    assert code == 2
    assert error.startswith(f"error: {tmp_path / 'study.yaml'}: ") and fragment in error
    assert error.count("\n") == 1 and "Traceback" not in error
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    ("ablation", "fragment"),
    [
        ({"seeds": []}, "'ablation.seeds': expected a non-empty list"),
        ({"seeds": [1, 1]}, "'ablation.seeds': expected distinct seeds"),
        ({"variants": {"full": {}}}, "'ablation.variants.full'"),
        ({"variants": {"bad": {"reweight.mode": "soft_"}}}, "'ablation.variants.bad.reweight"),
        ({"variants": {"nat": {"method": "natural"}}}, "'ablation.variants.nat.attack.objective"),
    ],
)
def test_bad_ablations_name_the_variant(tmp_path, capsys, ablation, fragment):
    spec = digits_search(
        study={"name": "unit", "mode": "ablation"},
        ablation={"seeds": [0], **ablation},
        base={"attack": {"objective": "contrastive", "epsilon": 0.1}},
    )
    del spec["search"]
    code, _ = planned(tmp_path, spec)
    assert code == 2 and fragment in capsys.readouterr().err


def test_an_ablation_ranks_by_the_transfer_probe_only_when_it_has_one(tmp_path, capsys):
    """`transfer/pgd_acc` is a final run's metric when `transfer.data` is set; without it no
    run would report it, and the study's table would be empty after hours of training."""
    spec = digits_search(
        study={"name": "unit", "mode": "ablation", "metric": "transfer/pgd_acc"},
        ablation={"seeds": [0], "variants": {"no_reweight": {"reweight.gamma": 0}}},
    )
    del spec["search"]
    code, _ = planned(tmp_path, spec)
    err = capsys.readouterr().err
    assert code == 2 and "'study.metric': expected base.transfer.data set" in err
    spec["base"]["transfer"] = {"data": {"name": "mnist_5k"}}
    for metric in ("transfer/pgd_acc", "transfer_best/cw_acc", "test/pgd_acc"):
        spec["study"]["metric"] = metric
        assert spec_from_dict(spec).study.metric == metric
    spec["study"]["metric"] = "transfer/pgd"
    with pytest.raises(ConfigError, match="'study.metric': expected one of .*transfer/pgd_acc"):
        spec_from_dict(spec)


def test_missing_and_malformed_files_are_one_line_errors(tmp_path, capsys):
    assert run_main(tmp_path, str(tmp_path / "nope.yaml"), "--dry-run")[0] == 2
    assert "nope.yaml: no such file" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("study:\n  name: [unit\n")
    assert run_main(tmp_path, str(broken), "--dry-run")[0] == 2
    assert "broken.yaml: invalid YAML at line 3" in capsys.readouterr().err


def test_resume_of_an_unknown_study_and_a_bad_tracking_uri_refuse_before_starting(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(digits_search()))
    assert run_main(tmp_path, str(path), "--resume")[0] == 2
    assert "--resume: no study 'unit'" in capsys.readouterr().err
    code = main([str(path), "--tracking-uri", "mlflow.db", "--storage", str(tmp_path)])
    assert code == 2 and "--tracking-uri 'mlflow.db': expected" in capsys.readouterr().err


def test_an_existing_study_is_not_overwritten(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(digits_search()))
    saved = tmp_path / "results" / "unit" / "gacd_study.json"
    saved.parent.mkdir(parents=True)
    saved.write_text("{}")
    assert run_main(tmp_path, str(path))[0] == 2
    assert "already exists" in capsys.readouterr().err and saved.read_text() == "{}"


def test_early_stopped_trials_reach_optuna_as_pruned_and_never_win():
    """ASHA's early stops must not compete with full-budget trials (REFERENCE pitfall 3)."""
    spec = spec_from_dict(digits_search())
    storage = optuna.storages.InMemoryStorage()
    searcher = StudySearch(
        space=search_space(spec),
        metric="val/pgd_acc",
        mode="max",
        study_name="unit",
        storage=storage,
        seed=0,
    )
    ids = ["full", "early", "error"]
    for trial_id in ids:
        assert searcher.suggest(trial_id)["optuna_trial_number"] == ids.index(trial_id)
    for trial_id, value in zip(ids, (0.4, 0.9, 0.95), strict=True):
        searcher.on_trial_result(trial_id, {"val/pgd_acc": value, "training_iteration": 1})
    searcher.on_trial_complete("full", {"val/pgd_acc": 0.4, "epoch": 4, EPOCHS_TOTAL: 4})
    searcher.on_trial_complete("early", {"val/pgd_acc": 0.9, "epoch": 1, EPOCHS_TOTAL: 4})
    searcher.on_trial_complete("error", {"val/pgd_acc": 0.95, "epoch": 2}, error=True)
    study = optuna.load_study(study_name="unit", storage=storage)
    states = [trial.state.name for trial in study.trials]
    assert states == ["COMPLETE", "PRUNED", "FAIL"]
    assert [t.user_attrs[RAY_TRIAL_ID_ATTR] for t in study.trials] == ids
    assert [t.user_attrs.get(FULL_BUDGET_ATTR) for t in study.trials] == [True, False, False]
    assert study.best_trial.user_attrs[RAY_TRIAL_ID_ATTR] == "full"


def test_points_to_evaluate_run_first_once_and_again_only_after_they_failed():
    """`study.sampler.points_to_evaluate`: the base configuration (a choice matched by the
    value it sets: '1/10' is 0.1) and a partial point run as the first two trials, the rest
    sampled; a searcher set up again on the same storage (a study started again before Ray saved
    its state) enqueues nothing twice, except a point whose trial failed (a killed driver's)."""
    spec = spec_from_dict(
        digits_search(
            study={
                "name": "unit",
                "num_samples": 4,
                "sampler": {"seed": 3, "points_to_evaluate": ["defaults", {"tau": 0.3}]},
            },
            base={"data": {"name": "digits"}, "tau": 0.2, "attack": {"epsilon": 0.1}},
            search={
                "tau": {"distribution": "loguniform", "low": 0.02, "high": 0.5},
                "attack.epsilon": {"distribution": "choice", "values": ["1/20", "1/10"]},
            },
        )
    )
    assert spec.points_to_evaluate() == [{"tau": 0.2, "attack.epsilon": "1/10"}, {"tau": 0.3}]
    storage = optuna.storages.InMemoryStorage()
    first = searcher(spec, storage)
    proposed = [first.suggest(f"t{i}") for i in range(3)]
    assert {k: proposed[0][k] for k in ("tau", "attack.epsilon")} == {
        "tau": 0.2,
        "attack.epsilon": "1/10",
    }
    assert proposed[1]["tau"] == 0.3 and proposed[1]["attack.epsilon"] in ("1/20", "1/10")
    study = optuna.load_study(study_name="unit", storage=storage)
    assert [t.user_attrs.get(ENQUEUED_ATTR, False) for t in study.trials] == [True, True, False]
    study.tell(0, state=optuna.trial.TrialState.FAIL)  # as fail_orphaned_trials does
    searcher(spec, storage)  # the base configuration again; {"tau": 0.3} is held already
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [t.system_attrs["fixed_params"] for t in waiting] == [spec.points_to_evaluate()[0]]
    searcher(spec, storage)
    assert len(study.get_trials(states=(optuna.trial.TrialState.WAITING,))) == 1


def test_asha_records_a_point_to_evaluate_at_its_rungs_but_never_stops_it():
    from ray.tune.experiment import Trial

    asha = StudyASHA(
        time_attr="epoch", max_t=4, grace_period=1, reduction_factor=2, metric="v", mode="max"
    )
    good, point, poor = (
        Trial("__fake", config=config, stub=True) for config in ({}, {POINT_KEY: True}, {})
    )
    for trial in (good, point, poor):
        asha.on_trial_add(None, trial)

    def result(trial, epoch: int, value: float) -> str:
        return asha.on_trial_result(None, trial, {"epoch": epoch, "v": value, EPOCHS_TOTAL: 4})

    assert result(good, 1, 0.9) == "CONTINUE"
    assert result(point, 1, 0.1) == "CONTINUE"  # below the cutoff: plain ASHA stops it
    assert result(poor, 1, 0.1) == "STOP"
    assert asha._num_stopped == 1
    rung = dict(asha._trial_info[point.trial_id]._rungs)[1]
    assert rung[point.trial_id] == 0.1  # its value still sets the rung's cutoff
    assert result(point, 4, 0.2) == "STOP"  # the end of its budget, as for any trial


def test_points_to_evaluate_in_a_comparison_are_each_method_s_defaults(tmp_path, capsys):
    path = ROOT / "search_spaces/digits_compare.yaml"
    spec = read_study_file(path, teacher_cache=Path("/t"), budget="from_defaults")
    raw = yaml.safe_load(path.read_text())
    raw.pop("budgets")
    assert raw["study"]["sampler"].get("points_to_evaluate") is None  # only the budget's
    assert spec.compare is not None and spec.starts_from_defaults
    spec.compare.top = 1  # the defaults alone make a confirm stage
    assert spec.confirms and not spec_from_dict(raw, teacher_cache=Path("/t")).starts_from_defaults
    run_main(tmp_path, str(path), "--dry-run", "--budget", "from_defaults")
    assert "top 2 of each (and its defaults) re-run on seeds" in capsys.readouterr().out
    for entry in spec.compare.methods:
        (point,) = spec.points_to_evaluate(entry)
        assert set(point) == set(spec.compare.methods[entry].search)
        config = spec.trial_config({ENTRY_KEY: entry, **point})
        assert config == spec.trial_config({ENTRY_KEY: entry}), entry
    raw["study"]["sampler"]["points_to_evaluate"] = [{"tau": 0.1}]
    with pytest.raises(ConfigError, match=r"points_to_evaluate\[0\].*'defaults' \(in a compar"):
        spec_from_dict(raw, teacher_cache=Path("/t"))


def test_a_search_s_points_to_evaluate_do_not_reach_its_confirmation():
    raw = digits_search(study={"name": "u", "sampler": {"points_to_evaluate": ["defaults"]}})
    resolved = spec_from_dict(raw).to_dict()
    confirmed = spec_from_dict(confirm_spec(resolved, {"a": {"tau": 0.1}}, [5], "u_confirm"))
    assert not confirmed.study.sampler.points_to_evaluate
    raw["study"] |= {"mode": "ablation"}
    raw["ablation"], raw["search"] = {"seeds": [0]}, {}
    with pytest.raises(ConfigError, match="points_to_evaluate': expected none in an ablation"):
        spec_from_dict(raw)


def started(tmp_path: Path, spec: dict, *extra: str) -> int:
    """Run a study for real (no --dry-run): these must fail before anything starts."""
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return run_main(tmp_path, str(path), *extra)[0]


@pytest.mark.parametrize(
    ("teacher", "fragment"),
    [
        ("missing", "no such file"),
        ("corrupt", "not a readable PyTorch file"),
        ("other_arch", "its weights do not fit"),
    ],
)
def test_a_bad_teacher_refuses_to_start_and_writes_nothing(tmp_path, capsys, teacher, fragment):
    import torch

    from gacd.models import build_model

    path = tmp_path / "teacher.pt"
    if teacher == "corrupt":
        path.write_bytes(b"not a checkpoint")
    if teacher == "other_arch":
        model = build_model("small_cnn", num_classes=10, in_channels=1, mean=None, std=None)
        torch.save(model.state_dict(), path)
    spec = digits_search(teacher={"checkpoint": str(path), "arch": "resnet18"})
    assert started(tmp_path, spec) == 2
    error = capsys.readouterr().err
    assert fragment in error and "teacher.checkpoint" in error and error.count("\n") == 1
    assert not (tmp_path / "mlflow.db").exists()


def test_a_data_set_not_on_disk_says_how_to_get_it(tmp_path, capsys):
    base = {"data": {"name": "cifar10", "data_dir": str(tmp_path / "none")}}
    base["attack"] = {"epsilon": "8/255"}
    assert started(tmp_path, digits_search(base=base)) == 2
    error = capsys.readouterr().err
    assert "data set 'cifar10' is not in data.data_dir" in error and "download: true" in error
    assert not (tmp_path / "mlflow.db").exists()


def test_an_unwritable_results_folder_and_an_absent_cluster_refuse_at_once(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(digits_search(teacher={})))
    spec = digits_search(teacher={"checkpoint": str(tmp_path / "t.pt")})
    spec["base"]["method"] = "pgd_at"
    del spec["teacher"]
    path.write_text(yaml.safe_dump(spec))
    assert main([str(path), "--storage", str(blocker / "results")]) == 2
    assert "--storage" in capsys.readouterr().err
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(
        [str(path), "--address", f"127.0.0.1:{port}", "--storage", str(tmp_path / "r")]
        + ["--tracking-uri", uri]
    )
    error = capsys.readouterr().err
    assert code == 2 and f"--address '127.0.0.1:{port}': no Ray cluster answers there" in error


def test_an_mlflow_server_that_does_not_answer_is_refused_before_starting(tmp_path, capsys):
    spec = digits_search()
    spec["base"]["method"] = "pgd_at"
    del spec["teacher"]
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    code = main([str(path), "--tracking-uri", uri, "--storage", str(tmp_path / "results")])
    error = capsys.readouterr().err
    assert code == 2 and f"MLflow at '{uri}' does not answer" in error
    assert error.count("\n") == 1 and not (tmp_path / "results" / "unit").exists()


def test_the_config_hash_ignores_how_a_run_is_computed_but_not_what():
    base = {"method": "natural", "device": "cpu"}
    same = config_hash(Config.from_dict(base))
    for how in ({"device": "cuda"}, {"memory_format": "channels_last"}, {"compile": True}):
        assert config_hash(Config.from_dict({**base, **how})) == same, how
    for what in ({"precision": "bf16"}, {"seed": 1}, {"attack.steps": 3}):
        assert config_hash(Config.from_dict({**base, **what})) != same, what


@pytest.mark.parametrize("gpus", [0, 0.25, 0.5, 1, 2])
def test_a_share_of_one_gpu_or_whole_gpus_are_accepted(gpus):
    assert (
        spec_from_dict(digits_search(resources={"gpus_per_trial": gpus})).resources.gpus_per_trial
        == gpus
    )


@pytest.mark.parametrize("name", ["digits.yaml", "digits_ablation.yaml", "digits_baselines.yaml"])
def test_shipped_digits_studies_measure_validation_finely_enough_to_rank_trials(name, tmp_path):
    """A search ranks on validation, and best checkpoints are chosen there: at 50% accuracy
    the standard error must stay under 3.5 points (144 images, the default split, give 4.2),
    below the spread of the demo's trials (4.5 points)."""
    from gacd.data import load_datasets

    spec = read_study_file(ROOT / "search_spaces" / name, teacher_cache=tmp_path)
    config = spec.trial_config(
        {"variant": "full", "seed": 0} if spec.study.mode == "ablation" else {}
    )
    samples = len(load_datasets(config.data, config.seed).val)
    assert (0.25 / samples) ** 0.5 < 0.035, samples


def test_a_budget_replaces_the_file_s_values_and_is_recorded(tmp_path, capsys):
    spec = digits_search(
        base={
            "data": {"name": "digits", "train_subset": 500},
            "optim.epochs": 4,
            "attack": {"epsilon": 0.1, "steps": 2},
        },
        teacher={"train": {"method": "pgd_at", "optim": {"epochs": 3}}},
        budgets={
            "full": {
                "base.data.train_subset": None,
                "base.optim.epochs": 9,
                "teacher.train.optim.epochs": 7,
                "study.num_samples": 5,
            }
        },
    )
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    as_written = read_study_file(path, teacher_cache=tmp_path)
    assert as_written.study.budget is None and as_written.study.num_samples == 2
    assert as_written.trial_config({}).optim.epochs == 4
    full = read_study_file(path, teacher_cache=tmp_path, budget="full")
    config = full.trial_config({})
    assert full.study.budget == "full" and full.study.num_samples == 5
    assert config.optim.epochs == 9 and config.data.train_subset is None
    assert config.attack.steps == 2  # what the budget leaves alone stays
    assert full.teacher_training_config().optim.epochs == 7
    assert full.teacher.checkpoint != as_written.teacher.checkpoint  # another teacher's cache
    code, _ = run_main(tmp_path, str(path), "--dry-run", "--budget", "full")
    out = capsys.readouterr().out
    assert code == 0 and "budget full" in out and "9 epochs on all training images" in out
    code, _ = run_main(tmp_path, str(path), "--dry-run", "--budget", "tiny")
    assert code == 2 and "'budget': expected one of this file's budgets (full)" in (
        capsys.readouterr().err
    )


def test_a_resume_says_what_differs_and_a_moved_storage_says_where_it_was(tmp_path):
    from study.run import load_saved_spec
    from study.spec import StudyError

    teacher = {"train": {"method": "pgd_at", "student": {"arch": "small_cnn", "width": 8}}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(digits_search(teacher=teacher)))
    old_storage, new_storage = tmp_path / "old", tmp_path / "new"
    started = read_study_file(path, teacher_cache=old_storage / "teachers")
    folder = old_storage / "unit"
    save_study_spec(folder, started)
    assert load_saved_spec(started, folder, old_storage / "teachers").name == "unit"
    moved = read_study_file(path, teacher_cache=new_storage / "teachers")
    with pytest.raises(StudyError) as caught:
        load_saved_spec(moved, folder, new_storage / "teachers")
    assert f"--storage {old_storage}" in str(caught.value)
    changed = digits_search(teacher=teacher)
    changed["base"]["optim"]["epochs"] = 5
    path.write_text(yaml.safe_dump(changed))
    with pytest.raises(StudyError) as caught:
        load_saved_spec(
            read_study_file(path, teacher_cache=old_storage / "teachers"),
            folder,
            old_storage / "teachers",
        )
    assert "base.optim.epochs (was 4, now 5)" in str(caught.value)


def test_a_study_saved_before_the_format_grew_resumes_after_an_upgrade(tmp_path):
    """A study started by an older version lacks the keys added since: read now, they stand at
    their defaults (an unset one, and one with a value), so the resume goes on; a real change
    of the file is still refused, named."""
    import json

    from gacd import schema
    from study.run import load_saved_spec
    from study.spec import StudyError

    teacher = {"train": {"method": "pgd_at", "student": {"arch": "small_cnn", "width": 8}}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(digits_search(teacher=teacher)))
    teachers = tmp_path / "results" / "teachers"
    folder = tmp_path / "results" / "unit"
    save_study_spec(folder, read_study_file(path, teacher_cache=teachers))
    saved = json.loads((folder / schema.SPEC_FILE).read_text())
    del saved["source"]["resources"]["workers_per_trial"]  # added since, default unset
    del saved["source"]["study"]["sampler"]["n_startup_trials"]  # added since, default 5
    (folder / schema.SPEC_FILE).write_text(json.dumps(saved))
    resumed = load_saved_spec(read_study_file(path, teacher_cache=teachers), folder, teachers)
    assert resumed.study.sampler.n_startup_trials == 5
    changed = digits_search(teacher=teacher)
    changed["study"]["sampler"] = {"n_startup_trials": 3}
    path.write_text(yaml.safe_dump(changed))
    with pytest.raises(StudyError) as caught:
        load_saved_spec(read_study_file(path, teacher_cache=teachers), folder, teachers)
    assert "study.sampler.n_startup_trials (was 5, now 3)" in str(caught.value)


def test_a_resume_refuses_a_study_folder_others_can_write(tmp_path, capsys):
    """`--resume` unpickles Ray's state from the folder: one that group or others may write
    (or another user owns) is refused before anything is read."""
    import os

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(digits_search(teacher={"checkpoint": str(tmp_path / "t.pt")})))
    folder = tmp_path / "results" / "unit"
    folder.mkdir(parents=True)
    (folder / "gacd_study.json").write_text("{}")
    (folder / "tuner.pkl").write_bytes(b"not read")
    os.chmod(folder / "tuner.pkl", 0o666)
    code, _ = run_main(tmp_path, str(path), "--resume")
    error = capsys.readouterr().err
    assert code == 2 and "tuner.pkl is writable by others" in error, error
    os.chmod(folder / "tuner.pkl", 0o644)
    os.chmod(folder, 0o777)
    code, _ = run_main(tmp_path, str(path), "--resume")
    assert code == 2 and "unit is writable by others" in capsys.readouterr().err


def test_a_resume_refuses_a_trial_count_or_concurrency_it_would_not_run(tmp_path, capsys):
    """Ray restores a study's TuneConfig as saved: `--resume --num-samples 5` on a two-trial
    study would run two, so it is refused, naming both counts; the saved values, or none
    given, resume."""
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(digits_search(teacher={"checkpoint": str(tmp_path / "t.pt")})))
    started = read_study_file(path, teacher_cache=tmp_path / "results" / "teachers")
    save_study_spec(tmp_path / "results" / "unit", started)
    for flags in ([], ["--num-samples", "2"]):
        code, _ = run_main(tmp_path, str(path), "--resume", "--dry-run", *flags)
        assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    code, _ = run_main(tmp_path, str(path), "--resume", "--dry-run", "--num-samples", "5")
    error = capsys.readouterr().err
    assert code == 2 and "--num-samples 5, but study 'unit' was started with" in error, error
    assert "study.num_samples 2" in error and "start a new --name" in error
    code, _ = run_main(tmp_path, str(path), "--resume", "--max-concurrent", "3")
    error = capsys.readouterr().err
    assert code == 2 and "study.max_concurrent (as many as fit)" in error, error
    assert not (tmp_path / "mlflow.db").exists()  # refused before any store is opened
