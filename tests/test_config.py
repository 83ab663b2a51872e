import pytest

from gacd.config import Config, ConfigError, flatten, nest_dotted


def error_for(values) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        Config.from_dict(values)
    return caught.value


def test_defaults_follow_the_spec():
    """The spec's defaults, but for those a confirmed measurement moved (GACD-SPEC: "the
    default follows the measurement"): in-batch negatives and the CE attack,
    docs/benchmarks/fashion_mnist.md."""
    config = Config.from_dict({"teacher.checkpoint": "teacher.pt"})
    assert config.attack.epsilon == pytest.approx(8 / 255)
    assert config.attack.step_size == pytest.approx(2 / 255)
    assert config.attack.objective == "ce"
    assert (config.alpha, config.beta, config.lambda_kd, config.tau) == (1.0, 0.8, 0.0, 0.1)
    assert config.negatives.source == "in_batch" and config.negatives.momentum == 0.5
    assert config.reweight.mode == "soft"
    assert config.eval.pgd_steps == 20 and config.eval.cw_steps == 30


def test_fractions_and_dotted_keys():
    config = Config.from_dict(
        {
            "attack.epsilon": "8/255",
            "eval": {"step_size": "1/255"},
            "optim.lr": "1e-3",
            "method": "pgd_at",
        }
    )
    assert config.attack.epsilon == pytest.approx(8 / 255)
    assert config.eval.step_size == pytest.approx(1 / 255)
    assert config.eval.epsilon == pytest.approx(8 / 255)
    assert config.optim.lr == pytest.approx(1e-3)
    assert config.attack.objective == "ce"


def test_resolved_config_round_trips():
    config = Config.from_dict({"method": "trades", "attack.epsilon": 0.1})
    assert config.attack.start == "gaussian" and config.attack.objective == "trades"
    assert Config.from_dict(config.to_dict()) == config
    assert Config.from_dict(flatten(config.to_dict())) == config


@pytest.mark.parametrize(
    ("values", "key", "fragment"),
    [
        ({"atack": {}}, "atack", "did you mean 'attack'"),
        ({"attack": {"epsilom": 0.1}}, "attack.epsilom", "did you mean 'attack.epsilon'"),
        ({"attack.steps": 2.5}, "attack.steps", "an integer"),
        ({"attack.steps": True}, "attack.steps", "an integer"),
        ({"data.augment": "yes"}, "data.augment", "true or false"),
        ({"attack.epsilon": -0.1}, "attack.epsilon", "[0, 1]"),
        ({"attack.epsilon": 1.5}, "attack.epsilon", "[0, 1]"),
        ({"attack.epsilon": "eight"}, "attack.epsilon", "fraction"),
        ({"method": "pgd_at", "attack.steps": 0}, "attack.steps", "trains on adversarial"),
        ({"student.arch": "resnet81"}, "student.arch", "did you mean 'resnet18'"),
        ({"data.name": "cifar11"}, "data.name", "cifar10"),
        ({"method": "gcd"}, "method", "did you mean 'gacd'"),
        ({"attack.objective": "pgd"}, "attack.objective", "one of"),
        ({"teacher.checkpoint": None}, "teacher.checkpoint", "distils from a teacher"),
        ({"method": "pgd_at", "attack.objective": "kl"}, "attack.objective", "auto, ce (what"),
        ({"optim.milestones": [0.8, 0.5]}, "optim.milestones", "increasing"),
        ({"tau": 0}, "tau", "> 0"),
        ({"reweight.gamma": -1}, "reweight.gamma", ">= 0"),
        ({"negatives.source": "bank"}, "negatives.source", "memory_bank"),
        ({"data": 3}, "data", "a mapping"),
        ({"device": "tpu"}, "device", "cuda"),
        ({"eval.autoattack_samples": 0}, "eval.autoattack_samples", ">= 1 (or null: all)"),
        ({"data.name": "fashion-mnist"}, "data.name", "fashion_mnist"),
    ],
)
def test_bad_values_name_the_dotted_key(values, key, fragment):
    error = error_for({"teacher.checkpoint": "teacher.pt", **values})
    assert error.key == key
    assert f"'{key}'" in str(error) and fragment in str(error)


def test_nest_dotted_merges():
    assert nest_dotted({"a.b": 1, "a": {"c": 2}}) == {"a": {"b": 1, "c": 2}}


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"method": "pgd_at", "attack.objective": "trades"}, "one of auto, ce (what method"),
        ({"method": "gacd", "attack.objective": "trades"}, "auto, contrastive, ce, kl"),
        ({"method": "trades", "attack.objective": "ce"}, "one of auto, trades"),
        ({"method": "ard", "attack.objective": "trades"}, "one of auto, ce, kl"),
        ({"method": "rslad", "attack.objective": "contrastive"}, "one of auto, kl, ce"),
        ({"method": "natural", "attack.objective": "ce"}, "auto, none (what method 'natural'"),
        ({"method": "kd", "attack.objective": "kl"}, "trains on clean inputs"),
        ({"method": "crd", "attack.objective": "contrastive"}, "trains on clean inputs"),
        ({"method": "gacd", "attack.objective": "none"}, "auto, contrastive, ce, kl"),
    ],
)
def test_an_objective_the_method_does_not_run_is_refused_with_those_it_does(values, fragment):
    error = error_for({"teacher.checkpoint": "teacher.pt", **values})
    assert error.key == "attack.objective" and fragment in str(error), str(error)


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"method": "natural", "attack.start": "gaussian"}, "attack.start"),
        ({"method": "kd", "attack.student_mode": "train"}, "attack.student_mode"),
        ({"negatives.source": "in_batch", "negatives.positive": "memory"}, "negatives.positive"),
    ],
)
def test_switches_a_run_would_ignore_are_refused_by_name(values, key):
    error = error_for({"teacher.checkpoint": "teacher.pt", **values})
    assert error.key == key


def test_every_objective_a_method_accepts_resolves_to_itself_and_round_trips():
    from gacd.methods import METHODS

    for name in METHODS.names():
        method = METHODS.get(name)
        for objective in method.objectives:
            config = Config.from_dict(
                {"method": name, "teacher.checkpoint": "t.pt", "attack.objective": objective}
            )
            assert config.attack.objective == objective
            assert Config.from_dict(flatten(config.to_dict())) == config
        default = Config.from_dict({"method": name, "teacher.checkpoint": "t.pt"})
        assert default.attack.objective == method.default_objective in method.objectives
        if not method.adversarial:
            assert (default.attack.start, default.attack.student_mode) == ("auto", "auto")


def test_gacd_train_refuses_an_ignored_switch_with_exit_status_2(tmp_path, capsys):
    from gacd.train import main

    config = tmp_path / "run.yaml"
    config.write_text("method: pgd_at\nattack: {objective: trades}\n")
    assert main([str(config), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "'attack.objective'" in error and "one of auto, ce" in error
    assert not (tmp_path / "out").exists()


def test_config_errors_survive_pickling_as_a_ray_worker_sends_them():
    """Ray pickles a worker's exception to the driver: a ConfigError that could not be rebuilt
    arrived as `TypeError: ConfigError.__init__() missing ... 'expected'`."""
    import pickle

    from gacd.config import ConfigFileError

    for error in (
        ConfigError("data.batch_size", "a multiple of 2", 63),
        ConfigError("tau", "a number > 0"),
        ConfigFileError("study.yaml", "no such file"),
    ):
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and str(again) == str(error), (again, error)
        assert again.key == error.key
