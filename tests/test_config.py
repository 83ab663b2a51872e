import pytest

from gacd.config import Config, ConfigError, flatten, nest_dotted


def error_for(values) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        Config.from_dict(values)
    return caught.value


def test_defaults_follow_the_spec():
    config = Config.from_dict({"teacher.checkpoint": "teacher.pt"})
    assert config.attack.epsilon == pytest.approx(8 / 255)
    assert config.attack.step_size == pytest.approx(2 / 255)
    assert config.attack.objective == "contrastive"
    assert (config.alpha, config.beta, config.lambda_kd, config.tau) == (1.0, 0.8, 0.0, 0.1)
    assert config.negatives.source == "memory_bank" and config.negatives.momentum == 0.5
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
        ({"method": "pgd_at", "attack.objective": "kl"}, "attack.objective", "without a teacher"),
        ({"optim.milestones": [0.8, 0.5]}, "optim.milestones", "increasing"),
        ({"tau": 0}, "tau", "> 0"),
        ({"reweight.gamma": -1}, "reweight.gamma", ">= 0"),
        ({"negatives.source": "bank"}, "negatives.source", "memory_bank"),
        ({"data": 3}, "data", "a mapping"),
        ({"device": "tpu"}, "device", "cuda"),
    ],
)
def test_bad_values_name_the_dotted_key(values, key, fragment):
    error = error_for({"teacher.checkpoint": "teacher.pt", **values})
    assert error.key == key
    assert f"'{key}'" in str(error) and fragment in str(error)


def test_nest_dotted_merges():
    assert nest_dotted({"a.b": 1, "a": {"c": 2}}) == {"a": {"b": 1, "c": 2}}
