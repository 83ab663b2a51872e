"""Typed configuration: every default of a run in one place, built from a dict once, at the edge.

`Config.from_dict` is the only way a YAML file, a command line or Ray's trial config becomes a
run's configuration. Unknown keys, wrong types and impossible values raise `ConfigError`
naming the dotted key and what was expected, so nothing downstream re-validates.
Fields that are fractions of the pixel range (budgets) accept strings such as `"8/255"`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import yaml

from gacd.registry import closest

AUTO = "auto"


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the dotted key."""

    def __init__(self, key: str, expected: str, got: object = dataclasses.MISSING) -> None:
        self.key, self.expected, self.got = key, expected, got
        message = f"config key '{key}': expected {expected}"
        if got is not dataclasses.MISSING:
            message += f", got {got!r}"
        super().__init__(message)

    def __reduce__(self):  # pickled whole (a Ray worker's error reaches the driver so)
        missing = self.got is dataclasses.MISSING
        return type(self), (self.key, self.expected) + (() if missing else (self.got,))

    def under(self, prefix: str) -> ConfigError:
        """The same error for a config nested under `prefix` (`base.tau`, `search.tau`)."""
        return ConfigError(f"{prefix}.{self.key}", self.expected, self.got)


class ConfigFileError(ConfigError):
    """A config file that is missing or not valid YAML; the message names the file."""

    def __init__(self, path: str, problem: str) -> None:
        self.key, self.problem = path, problem
        ValueError.__init__(self, f"{path}: {problem}")

    def __reduce__(self):
        return type(self), (self.key, self.problem)


# A study or config file is a few kilobytes; these bounds keep a hostile one (a "billion
# laughs" of YAML aliases, a huge file) from taking the machine's memory or time.
MAX_FILE_BYTES = 1_000_000
MAX_VALUES = 100_000


class StrictLoader(yaml.SafeLoader):
    """YAML's safe loader (data only, no tags that run code) that refuses a key given twice
    in one mapping (PyYAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                problem = f"key {key!r} given twice in one mapping"
                raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
            seen[key] = True
        return super().construct_mapping(node, deep=deep)


def count_values(data: Any, limit: int) -> int:
    """How many values `data` holds once its shared parts (YAML aliases) are expanded, as
    `nest_dotted` and `flatten` would expand them; stops counting past `limit`."""
    count, stack = 0, [data]
    while stack and count <= limit:
        value = stack.pop()
        count += 1
        if isinstance(value, Mapping):
            stack.extend(value.values())
        elif isinstance(value, list | tuple):
            stack.extend(value)
    return count


def read_yaml_file(path: str | Path) -> Any:
    """Parse a YAML file safely (data only, no tags that run code, no key given twice, bounded
    in size once aliases are expanded); one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigFileError(str(path), "no such file")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ConfigFileError(str(path), f"larger than {MAX_FILE_BYTES:,} bytes: not a config")
    try:
        data = yaml.load(path.read_text(), Loader=StrictLoader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigFileError(str(path), f"invalid YAML{where}: {problem}") from error
    if count_values(data, MAX_VALUES) > MAX_VALUES:
        raise ConfigFileError(
            str(path), f"holds more than {MAX_VALUES:,} values once its aliases are expanded"
        )
    return data


@dataclass
class DataConfig:
    name: str = "digits"
    data_dir: str = "data"
    download: bool = False
    # Fraction of the training set held out, with a seeded split, for validation.
    val_fraction: float = 0.1
    # Resize images to this square size (None: the data set's native size).
    image_size: int | None = None
    batch_size: int = 128
    eval_batch_size: int = 512
    augment: bool = True
    # Use only the first N training samples (after the seeded shuffle); for quick runs.
    train_subset: int | None = None
    # Keep only these classes, relabelled 0..k-1 in the order given (None: every class).
    classes: list[int] | None = None


@dataclass
class ModelConfig:
    arch: str = "small_cnn"
    depth: int | None = None
    width: float | None = None
    # Normalise with the data set's mean/std as the model's first layer (False: identity,
    # as RobustBench models that expect raw [0, 1] pixels).
    normalize: bool = True


@dataclass
class TeacherConfig:
    # A checkpoint written by this project, or a plain state dict (RobustBench-style).
    checkpoint: str | None = None
    # Architecture of a plain state dict; a checkpoint of this project carries its own.
    arch: str | None = None
    depth: int | None = None
    width: float | None = None
    normalize: bool = True


@dataclass
class OptimConfig:
    epochs: int = 10
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    # For `step`: fractions of the epochs after which the learning rate is multiplied by
    # `lr_decay` (0.5, 0.75 of 200 epochs = Madry's 100/150).
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    lr_decay: float = 0.1


@dataclass
class AttackConfig:
    """The training attack; `auto` values take the method's default."""

    # What PGD maximises; each method accepts only those it runs (`none`: a method trained on
    # clean inputs, which makes no adversarial examples).
    objective: Literal["auto", "contrastive", "ce", "kl", "trades", "none"] = AUTO
    epsilon: float = 8 / 255
    step_size: float | None = None  # None: epsilon / 4
    steps: int = 10
    start: Literal["auto", "uniform", "gaussian", "none"] = AUTO
    # Temperature of the `kl` objective's softmaxes.
    temperature: float = 1.0
    # The student's mode while attacked: `eval` freezes its batch-norm statistics; `auto` takes
    # the method's (`train` for ARD, `eval` for every other method). `start` and
    # `student_mode` stay `auto` for methods that do not attack.
    student_mode: Literal["auto", "eval", "train"] = AUTO


@dataclass
class EvalConfig:
    epsilon: float | None = None  # None: the training attack's epsilon
    step_size: float | None = None  # None: epsilon / 4 (2/255 at 8/255)
    val_steps: int = 10
    pgd_steps: int = 20
    cw_steps: int = 30
    cw_kappa: float = 50.0
    fgsm: bool = True
    cw: bool = True
    # AutoAttack (standard) runs in final evaluations when `pyautoattack` is installed.
    autoattack: bool = True
    # Evaluate at most this many samples of a split (None: all): its first ones (the test
    # split in its published order, the validation split in its seeded order).
    max_samples: int | None = None
    # AutoAttack on at most this many of those (None: as many as the other attacks); the
    # fixed first ones of the split, for budgets where the whole evaluation set is too slow.
    autoattack_samples: int | None = None


@dataclass
class NegativesConfig:
    source: Literal["memory_bank", "in_batch"] = "in_batch"
    count: int = 4096
    momentum: float = 0.5
    # Draw memory-bank negatives only from samples of other classes.
    class_aware: bool = True
    # Each direction's positive: the other side's `current` embedding of the sample (the
    # spec's reading), or its `memory` row in the bank, detached (RepDistiller's CRD).
    positive: Literal["current", "memory"] = "current"


@dataclass
class ReweightConfig:
    mode: Literal["soft", "hard", "none"] = "soft"
    gamma: float = 1.0


KLReduction = Literal["element_mean", "batch_mean"]


@dataclass
class KDConfig:
    """Hinton's KD: `gamma CE(S(x), y) + alpha t^2 KL(p_T^t(x) || p_S^t(x))`."""

    temperature: float = 4.0
    gamma: float = 0.1
    alpha: float = 0.9


@dataclass
class CRDConfig:
    """CRD: `gamma CE(S(x), y) + beta L_CRD` on clean inputs (RepDistiller's defaults)."""

    tau: float = 0.07
    # Negatives per sample, capped at what the memory bank holds (as `negatives.count`).
    count: int = 16384
    momentum: float = 0.5
    class_aware: bool = True
    # As RepDistiller's `ContrastMemory`: each direction's positive is the bank's stored row of
    # the sample itself (`negatives.positive` explains the switch).
    positive: Literal["current", "memory"] = "memory"
    embed_dim: int = 128
    gamma: float = 1.0
    beta: float = 0.8


@dataclass
class ARDConfig:
    """ARD: `alpha t^2 KL(p_T^t(x) || p_S^t(x')) + (1 - alpha) CE(S(x), y)`."""

    temperature: float = 30.0
    alpha: float = 1.0
    # ARD's code uses `nn.KLDivLoss()`'s default, the mean over batch and classes.
    kl_reduction: KLReduction = "element_mean"


@dataclass
class RSLADConfig:
    """RSLAD: `scale (w_adv KL(p_T(x) || p_S(x')) + w_nat KL(p_T(x) || p_S(x)))`, t = 1."""

    adversarial_weight: float = 5 / 6
    natural_weight: float = 1 / 6
    # RSLAD multiplies both terms by 10 on CIFAR-100 (its element-mean KL divides by 100).
    scale: float = 1.0
    # RSLAD's code averages `nn.KLDivLoss(reduction='none')` over batch and classes.
    kl_reduction: KLReduction = "element_mean"


@dataclass
class TransferConfig:
    """Transfer across tasks: a linear probe on the frozen student's features of `data`."""

    # The target data set (None: no transfer evaluation).
    data: DataConfig | None = None
    epochs: int = 30
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 256
    # AutoAttack on the transferred pipeline (None: as `eval.autoattack`). Its figure costs
    # as much as the test split's AutoAttack again; budgets that cannot afford both turn this
    # one off and keep clean, FGSM, PGD and CW-inf for the transfer.
    autoattack: bool | None = None
    # The pipeline attacked on at most this many of the target's first test images (None: as
    # `eval.max_samples`).
    max_samples: int | None = None


@dataclass
class Config:
    seed: int = 0
    method: str = "gacd"
    device: str = AUTO
    # Training arithmetic: `bf16` runs the attack and the step under bfloat16 autocast (on CUDA
    # or CPU); evaluation always runs in float32, so robust accuracy is never flattered.
    precision: Literal["fp32", "bf16"] = "fp32"
    # Speed switches that leave the arithmetic's meaning alone: the models' and images' memory
    # layout (channels-last measured faster for convolutions on CPU, and the layout of tensor
    # cores on GPUs: `docs/performance.md`), and the models' feature extractors compiled with
    # `torch.compile` (a one-off compile per trial and model mode).
    memory_format: Literal["channels_last", "contiguous"] = "channels_last"
    compile: bool = False
    # Evaluate the test split (every attack) at the end: for final and ablation runs only.
    final: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # GACD: contrastive temperature, anchor, embedding size, negatives, reweighting.
    tau: float = 0.1
    anchor: Literal["clean", "adversarial"] = "clean"
    embed_dim: int = 128
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    reweight: ReweightConfig = field(default_factory=ReweightConfig)
    # Loss weights: alpha CE(S(x'), y) + beta L_GACD + lambda_kd t^2 KL(T(x)/t || S(x')/t).
    alpha: float = 1.0
    beta: float = 0.8
    lambda_kd: float = 0.0
    kd_temperature: float = 4.0
    # TRADES' weight on KL(S(x) || S(x')).
    trades_beta: float = 6.0
    # The baselines' own terms and defaults, read only when `method` names them.
    kd: KDConfig = field(default_factory=KDConfig)
    crd: CRDConfig = field(default_factory=CRDConfig)
    ard: ARDConfig = field(default_factory=ARDConfig)
    rslad: RSLADConfig = field(default_factory=RSLADConfig)
    # Final runs with `transfer.data` also report `transfer/<attack>_acc`.
    transfer: TransferConfig = field(default_factory=TransferConfig)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None = None) -> Config:
        """Build, validate and resolve a config from nested (or dotted-key) overrides."""
        config = cls.unresolved(values)
        validate(config)
        resolve(config)
        return config

    @classmethod
    def unresolved(cls, values: Mapping[str, Any] | None = None) -> Config:
        """The config the overrides say, `auto` and derived defaults left as they are: what a
        layer of overrides means before a method resolves it (checked by `from_dict` only)."""
        return build_dataclass(cls, nest_dotted(values or {}), prefix="")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- dicts, dotted keys -------------------------------------------------------------------


def nest_dotted(values: Mapping[str, Any]) -> dict[str, Any]:
    """`{"attack.epsilon": x, "data": {...}}` -> nested dicts (dotted keys merged in)."""
    nested: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            value = nest_dotted(value)
        set_dotted(nested, str(key), value)
    return nested


def set_dotted(target: dict[str, Any], key: str, value: Any) -> None:
    """Set `target["a"]["b"] = value` for key `a.b`, merging mappings already there."""
    *parents, last = key.split(".")
    for part in parents:
        child = target.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(key, f"'{part}' to be a mapping", child)
        target = child
    if isinstance(value, dict) and isinstance(target.get(last), dict):
        for sub_key, sub_value in value.items():
            set_dotted(target[last], sub_key, sub_value)
    else:
        target[last] = value


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> `{"attack.epsilon": ...}`."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


# Sections every method trains with, unlike `kd.*`, `trades_beta` or `attack.*`, which only
# some methods read: in a comparison, searching one of their keys for some methods only
# leaves the others at the base value, a handicap unless meant.
SHARED_SECTIONS = ("optim", "data", "student")


def shared_searchers(searches: Mapping[str, Any]) -> dict[str, list[str]]:
    """Each shared training key (`SHARED_SECTIONS`) some entry of a comparison searches ->
    the entries that search it. `searches`: entry -> its searched keys."""
    keys = sorted(
        {key for keys in searches.values() for key in keys if key.split(".")[0] in SHARED_SECTIONS}
    )
    return {key: [entry for entry in searches if key in searches[entry]] for key in keys}


def uneven_search_notes(
    searches: Mapping[str, Mapping[str, Any]], value: Callable[[str, str], Any]
) -> list[str]:
    """One line per shared key (`SHARED_SECTIONS`) a comparison does not search alike.
    `searches`: entry -> its searched key -> that key's distribution (hashable, shown with
    `str`: `study.compare` passes each as words, `loguniform 0.01 to 0.2`). A key
    some entries search and others do not is named with who searches it and the value the
    others train at (`value(entry, key)`); a key every entry searches, over distributions
    that differ, with each distribution and who searches over it."""
    notes = []
    for key, some in shared_searchers(searches).items():
        if len(some) < len(searches):
            others = [entry for entry in searches if entry not in some]
            values = sorted({str(value(entry, key)) for entry in others})
            notes.append(
                f"{key} is searched for {', '.join(some)} only; {', '.join(others)} train at "
                f"{' / '.join(values)}: a handicap for them unless every method searches it alike"
            )
            continue
        groups: dict[Any, list[str]] = {}
        for entry, keys in searches.items():
            groups.setdefault(keys[key], []).append(entry)
        if len(groups) > 1:
            over = "; ".join(f"{', '.join(who)} over {dist}" for dist, who in groups.items())
            notes.append(
                f"{key} is searched over different ranges ({over}): a handicap for the "
                "narrower or shifted ones unless every method searches it alike"
            )
    return notes


# --- typed construction -------------------------------------------------------------------


def build_dataclass(cls: type, values: Any, prefix: str) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(prefix.rstrip(".") or "<root>", "a mapping", values)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            close = closest(key, names)
            hint = f" (did you mean '{prefix}{close}'?)" if close else ""
            raise ConfigError(f"{prefix}{key}", f"one of the known keys{hint}: {', '.join(names)}")
    converted = {key: convert(hints[key], value, f"{prefix}{key}") for key, value in values.items()}
    return cls(**converted)


def convert(annotation: Any, value: Any, key: str) -> Any:
    """Check `value` against a type annotation; numbers and fractions become floats."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if dataclasses.is_dataclass(annotation):
        return build_dataclass(annotation, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return convert(inner, value, key)
    if origin is Literal:
        if value not in args:
            close = closest(value, [str(a) for a in args])
            hint = f" (did you mean '{close}'?)" if close else ""
            raise ConfigError(key, f"one of {', '.join(map(str, args))}{hint}", value)
        return value
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, "a mapping", value)
        return {str(k): convert(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(key, "a list", value)
        return [convert(args[0], item, f"{key}[{i}]") for i, item in enumerate(value)]
    if annotation is float:
        return to_float(value, key)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, "an integer", value)
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, "true or false", value)
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(key, "a string", value)
        return value
    raise TypeError(f"config key '{key}': unsupported annotation {annotation!r}")


def to_float(value: Any, key: str) -> float:
    """A finite number, or a string such as `"8/255"` or `"1e-3"` (YAML 1.1 reads that as a
    string); `.inf` and `.nan` are refused here, for every key."""
    if isinstance(value, bool):
        raise ConfigError(key, "a number", value)
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ConfigError(key, "a finite number", value)
        return float(value)
    if isinstance(value, str):
        try:
            return float(Fraction(value.replace(" ", "")))
        except (ValueError, ZeroDivisionError):
            pass
    raise ConfigError(key, "a number or a fraction such as '8/255'", value)


# --- values -------------------------------------------------------------------------------


def require(condition: bool, key: str, expected: str, got: object = dataclasses.MISSING) -> None:
    """Raise `ConfigError` for `key` unless `condition` (`got`: the value, when there is one)."""
    if not condition:
        raise ConfigError(key, expected, got)


def validate(config: Config) -> None:
    """Impossible values and unknown names; every message names the dotted key."""
    from gacd.methods import METHODS
    from gacd.models import MODELS

    require_name(METHODS, config.method, "method")
    require_name(MODELS, config.student.arch, "student.arch")
    if config.teacher.arch is not None:
        require_name(MODELS, config.teacher.arch, "teacher.arch")
    for prefix, model in (("student", config.student), ("teacher", config.teacher)):
        if model.width is not None:
            require(model.width > 0, f"{prefix}.width", "a number > 0", model.width)
        if model.depth is not None:
            require(model.depth >= 1, f"{prefix}.depth", "an integer >= 1", model.depth)
    validate_data(config.data)
    validate_optim(config.optim)
    validate_attack(config)
    validate_eval(config.eval)
    validate_contrastive(config)
    validate_baselines(config)
    validate_transfer(config.transfer)
    method = METHODS.get(config.method)
    require(
        not method.uses_teacher or config.teacher.checkpoint is not None,
        "teacher.checkpoint",
        f"a path to a teacher checkpoint (method '{config.method}' distils from a teacher)",
        None,
    )
    require(
        config.device == AUTO or config.device.split(":")[0] in ("cpu", "cuda"),
        "device",
        "auto, cpu, cuda or cuda:N",
        config.device,
    )


def require_name(registry: Any, name: str, key: str) -> None:
    if name not in registry:
        from gacd.registry import unknown_name_message

        raise ConfigError(key, unknown_name_message(registry.kind, name, registry.names()))


def validate_data(data: DataConfig, prefix: str = "data") -> None:
    from gacd.data import DATASETS

    require_name(DATASETS, data.name, f"{prefix}.name")
    require(
        0.0 < data.val_fraction < 1.0,
        f"{prefix}.val_fraction",
        "a number in (0, 1)",
        data.val_fraction,
    )
    require(data.batch_size >= 1, f"{prefix}.batch_size", "an integer >= 1", data.batch_size)
    require(
        data.eval_batch_size >= 1,
        f"{prefix}.eval_batch_size",
        "an integer >= 1",
        data.eval_batch_size,
    )
    if data.image_size is not None:
        require(data.image_size >= 8, f"{prefix}.image_size", "an integer >= 8", data.image_size)
    if data.train_subset is not None:
        require(
            data.train_subset >= 1, f"{prefix}.train_subset", "an integer >= 1", data.train_subset
        )
    if data.classes is not None:
        validate_classes(data.name, data.classes, f"{prefix}.classes")


def validate_classes(name: str, classes: list[int], key: str) -> None:
    """At least two distinct class indices of data set `name`."""
    from gacd.data import CLASS_COUNTS

    require(len(classes) >= 2, key, "a list of at least 2 class indices", classes)
    require(len(set(classes)) == len(classes), key, "distinct class indices", classes)
    count = CLASS_COUNTS.get(name)
    expected = (
        f"a class index in [0, {count}) (data set '{name}' has {count} classes)"
        if count is not None
        else "a class index >= 0"
    )
    for i, label in enumerate(classes):
        require(0 <= label < (count or label + 1), f"{key}[{i}]", expected, label)


def validate_optim(optim: OptimConfig) -> None:
    require(optim.epochs >= 1, "optim.epochs", "an integer >= 1", optim.epochs)
    require(optim.lr > 0, "optim.lr", "a number > 0", optim.lr)
    require(0 <= optim.momentum < 1, "optim.momentum", "a number in [0, 1)", optim.momentum)
    require(optim.weight_decay >= 0, "optim.weight_decay", "a number >= 0", optim.weight_decay)
    require(0 < optim.lr_decay <= 1, "optim.lr_decay", "a number in (0, 1]", optim.lr_decay)
    for i, milestone in enumerate(optim.milestones):
        require(
            0 < milestone < 1,
            f"optim.milestones[{i}]",
            "a fraction of the epochs in (0, 1)",
            milestone,
        )
    require(
        optim.milestones == sorted(optim.milestones),
        "optim.milestones",
        "increasing fractions",
        optim.milestones,
    )


def validate_budget(prefix: str, epsilon: float | None, step_size: float | None) -> None:
    if epsilon is not None:
        require(
            0 <= epsilon <= 1, f"{prefix}.epsilon", "a number in [0, 1] (pixels in [0, 1])", epsilon
        )
    if step_size is not None:
        require(0 < step_size <= 1, f"{prefix}.step_size", "a number in (0, 1]", step_size)
    if epsilon is not None and step_size is not None:
        # A step past the ball's radius is projected back at once: the attack degenerates to
        # sign steps to the corners, which is never what a budget written so means.
        require(
            step_size <= epsilon or epsilon == 0,
            f"{prefix}.step_size",
            f"a step no larger than {prefix}.epsilon ({epsilon:g})",
            step_size,
        )


def validate_attack(config: Config) -> None:
    from gacd.methods import METHODS

    attack = config.attack
    validate_budget("attack", attack.epsilon, attack.step_size)
    require(attack.temperature > 0, "attack.temperature", "a number > 0", attack.temperature)
    method = METHODS.get(config.method)
    if method.adversarial:
        require(
            attack.steps >= 1,
            "attack.steps",
            f"an integer >= 1 (method '{config.method}' trains on adversarial inputs)",
            attack.steps,
        )
        require(
            attack.epsilon > 0,
            "attack.epsilon",
            f"a number > 0 (method '{config.method}' trains on adversarial inputs)",
            attack.epsilon,
        )
    if attack.objective != AUTO:
        require(
            attack.objective in method.objectives,
            "attack.objective",
            f"one of auto, {', '.join(method.objectives)} (what method '{config.method}' "
            + ("attacks with" if method.adversarial else "runs: it trains on clean inputs")
            + ")",
            attack.objective,
        )
    if not method.adversarial:
        for name in ("start", "student_mode"):
            require(
                getattr(attack, name) == AUTO,
                f"attack.{name}",
                f"auto (method '{config.method}' trains on clean inputs: nothing is attacked)",
                getattr(attack, name),
            )


def validate_eval(evaluation: EvalConfig) -> None:
    validate_budget("eval", evaluation.epsilon, evaluation.step_size)
    for name in ("val_steps", "pgd_steps", "cw_steps"):
        steps = getattr(evaluation, name)
        require(steps >= 1, f"eval.{name}", "an integer >= 1", steps)
    require(evaluation.cw_kappa > 0, "eval.cw_kappa", "a number > 0", evaluation.cw_kappa)
    for name in ("max_samples", "autoattack_samples"):
        value = getattr(evaluation, name)
        if value is not None:
            require(value >= 1, f"eval.{name}", "an integer >= 1 (or null: all)", value)


def validate_contrastive(config: Config) -> None:
    require(config.tau > 0, "tau", "a number > 0", config.tau)
    require(config.embed_dim >= 1, "embed_dim", "an integer >= 1", config.embed_dim)
    require(
        config.negatives.count >= 1, "negatives.count", "an integer >= 1", config.negatives.count
    )
    require(
        0 <= config.negatives.momentum < 1,
        "negatives.momentum",
        "a number in [0, 1)",
        config.negatives.momentum,
    )
    require(config.reweight.gamma >= 0, "reweight.gamma", "a number >= 0", config.reweight.gamma)
    negatives = config.negatives
    require(
        config.method != "gacd"
        or negatives.source == "memory_bank"
        or negatives.positive != "memory",
        "negatives.positive",
        "current with negatives.source in_batch (in-batch negatives keep no memory)",
        negatives.positive,
    )
    for name in ("alpha", "beta", "lambda_kd", "trades_beta"):
        require(getattr(config, name) >= 0, name, "a number >= 0", getattr(config, name))
    require(config.kd_temperature > 0, "kd_temperature", "a number > 0", config.kd_temperature)


def validate_baselines(config: Config) -> None:
    """The baselines' sections: weights >= 0, temperatures > 0, CRD's bank as `negatives`."""
    weights = {
        "kd.gamma": config.kd.gamma,
        "kd.alpha": config.kd.alpha,
        "crd.gamma": config.crd.gamma,
        "crd.beta": config.crd.beta,
        "rslad.adversarial_weight": config.rslad.adversarial_weight,
        "rslad.natural_weight": config.rslad.natural_weight,
        "rslad.scale": config.rslad.scale,
    }
    for key, value in weights.items():
        require(value >= 0, key, "a number >= 0", value)
    for key, value in {
        "kd.temperature": config.kd.temperature,
        "ard.temperature": config.ard.temperature,
        "crd.tau": config.crd.tau,
    }.items():
        require(value > 0, key, "a number > 0", value)
    require(0 <= config.ard.alpha <= 1, "ard.alpha", "a number in [0, 1]", config.ard.alpha)
    require(config.crd.count >= 1, "crd.count", "an integer >= 1", config.crd.count)
    require(config.crd.embed_dim >= 1, "crd.embed_dim", "an integer >= 1", config.crd.embed_dim)
    require(0 <= config.crd.momentum < 1, "crd.momentum", "a number in [0, 1)", config.crd.momentum)


def validate_transfer(transfer: TransferConfig) -> None:
    if transfer.data is not None:
        validate_data(transfer.data, "transfer.data")
    require(transfer.epochs >= 1, "transfer.epochs", "an integer >= 1", transfer.epochs)
    require(transfer.lr > 0, "transfer.lr", "a number > 0", transfer.lr)
    require(
        0 <= transfer.momentum < 1, "transfer.momentum", "a number in [0, 1)", transfer.momentum
    )
    require(
        transfer.weight_decay >= 0,
        "transfer.weight_decay",
        "a number >= 0",
        transfer.weight_decay,
    )
    require(transfer.batch_size >= 1, "transfer.batch_size", "an integer >= 1", transfer.batch_size)
    if transfer.max_samples is not None:
        require(
            transfer.max_samples >= 1,
            "transfer.max_samples",
            "an integer >= 1 (or null: as eval.max_samples)",
            transfer.max_samples,
        )


def resolve(config: Config) -> None:
    """Replace `auto` and derived defaults by concrete values, so checkpoints say what ran."""
    from gacd.methods import METHODS

    method = METHODS.get(config.method)
    attack = config.attack
    if attack.objective == AUTO:
        attack.objective = method.default_objective
    if attack.start == AUTO and method.adversarial:
        attack.start = method.default_start
    if attack.student_mode == AUTO and method.adversarial:
        attack.student_mode = method.default_student_mode
    if attack.step_size is None:
        attack.step_size = attack.epsilon / 4
    evaluation = config.eval
    if evaluation.epsilon is None:
        evaluation.epsilon = attack.epsilon
    if evaluation.step_size is None:
        evaluation.step_size = evaluation.epsilon / 4
