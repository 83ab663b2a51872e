"""Shapes, normalisation, state-dict naming and option checks of gacd.models (fast, CPU)."""

import pytest
import torch
from torch import Tensor, nn

from gacd.models import MODELS, ImageClassifier, Normalize, build_model
from gacd.registry import UnknownNameError

# Small sizes per architecture so that every test stays well under a second.
SMALL_OPTIONS: dict[str, dict[str, float]] = {
    "small_cnn": {"width": 8},
    "resnet18": {"width": 8},
    "preact_resnet18": {"width": 8},
    "wide_resnet": {"depth": 10, "width": 1},
    "mobilenet_v2": {"width": 0.25},
}


def small_model(arch: str, in_channels: int = 3, num_classes: int = 5, **normalization):
    normalization = {"mean": None, "std": None} | normalization
    return build_model(
        arch,
        num_classes=num_classes,
        in_channels=in_channels,
        **normalization,
        **SMALL_OPTIONS[arch],
    )


def test_every_registered_architecture_is_covered():
    assert set(MODELS.names()) == set(SMALL_OPTIONS)


@pytest.mark.parametrize("arch", sorted(SMALL_OPTIONS))
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("size", [8, 32])
def test_shapes_and_forward_decomposition(arch: str, in_channels: int, size: int):
    torch.manual_seed(0)
    model = small_model(arch, in_channels=in_channels, num_classes=7).eval()
    images = torch.rand(2, in_channels, size, size)

    with torch.no_grad():
        features = model.forward_features(images)
        logits = model(images)

    assert isinstance(model, ImageClassifier)
    assert isinstance(model.normalize, Normalize)
    assert model.num_classes == 7
    assert features.shape == (2, model.feature_dim)
    assert logits.shape == (2, 7)
    torch.testing.assert_close(logits, model.forward_head(features))


@pytest.mark.parametrize(
    ("arch", "feature_dim"),
    [
        ("small_cnn", 64),
        ("resnet18", 512),
        ("preact_resnet18", 512),
        ("wide_resnet", 640),
        ("mobilenet_v2", 1280),
    ],
)
def test_default_sizes(arch: str, feature_dim: int):
    # The meta device skips allocation, so full-size defaults (WRN-34-10) cost nothing.
    with torch.device("meta"):
        model = build_model(arch, num_classes=10, in_channels=3, mean=None, std=None)
    assert model.feature_dim == feature_dim
    assert model.fc.in_features == feature_dim
    if arch == "wide_resnet":
        assert len(model.block1.layer) == (34 - 4) // 6


def test_width_scales_feature_dim():
    def feature_dim(arch: str, width: float) -> int:
        with torch.device("meta"):
            return build_model(
                arch, num_classes=10, in_channels=3, mean=None, std=None, width=width
            ).feature_dim

    assert feature_dim("small_cnn", 16.0) == 32
    assert feature_dim("resnet18", 32) == 256
    assert feature_dim("wide_resnet", 2) == 128
    assert feature_dim("mobilenet_v2", 0.5) == 1280
    assert feature_dim("mobilenet_v2", 1.4) == 1792


@pytest.mark.parametrize("arch", sorted(SMALL_OPTIONS))
def test_normalization_is_not_in_state_dict(arch: str):
    model = small_model(arch, in_channels=1, mean=(0.5,), std=(0.25,))
    assert not any(key.startswith("normalize") for key in model.state_dict())
    assert {"normalize.mean", "normalize.std"} <= {name for name, _ in model.named_buffers()}


@pytest.mark.parametrize("arch", sorted(SMALL_OPTIONS))
def test_normalization_equals_normalising_the_input(arch: str):
    torch.manual_seed(0)
    normalized_model = small_model(arch, in_channels=1, mean=(0.5,), std=(0.25,)).eval()
    identity_model = small_model(arch, in_channels=1).eval()
    identity_model.load_state_dict(normalized_model.state_dict(), strict=True)
    images = torch.rand(3, 1, 8, 8)

    with torch.no_grad():
        expected = identity_model((images - 0.5) / 0.25)
        actual = normalized_model(images)

    torch.testing.assert_close(actual, expected)


def test_normalize_module():
    normalize = Normalize((0.1, 0.2, 0.3), (0.5, 0.5, 2.0))
    images = torch.rand(2, 3, 4, 4)
    expected = (images - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor(
        [0.5, 0.5, 2.0]
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(normalize(images), expected)
    torch.testing.assert_close(Normalize(None, None, 2)(images[:, :2]), images[:, :2])
    assert normalize.to(torch.float64).mean.dtype == torch.float64


@pytest.mark.parametrize(
    ("mean", "std", "num_channels", "message"),
    [
        ((0.5,), None, 1, "both mean and std"),
        (None, None, None, "num_channels"),
        ((0.5, 0.5), (0.2,), None, "channels"),
        ((0.5,), (0.2,), 3, "3"),
        ((0.5,), (0.0,), 1, "positive"),
    ],
)
def test_normalize_rejects_bad_statistics(mean, std, num_channels, message: str):
    with pytest.raises(ValueError, match=message):
        Normalize(mean, std, num_channels)


def robustbench_wide_resnet_keys(depth: int, widen_factor: int) -> set[str]:
    """State-dict keys of RobustBench's WideResNet, written out from its naming scheme."""

    def batch_norm(prefix: str) -> list[str]:
        names = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
        return [f"{prefix}.{name}" for name in names]

    channels = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
    keys = ["conv1.weight", *batch_norm("bn1"), "fc.weight", "fc.bias"]
    for stage in range(3):
        for index in range((depth - 4) // 6):
            prefix = f"block{stage + 1}.layer.{index}"
            keys += [*batch_norm(f"{prefix}.bn1"), f"{prefix}.conv1.weight"]
            keys += [*batch_norm(f"{prefix}.bn2"), f"{prefix}.conv2.weight"]
            if index == 0 and channels[stage] != channels[stage + 1]:
                keys.append(f"{prefix}.convShortcut.weight")
    return set(keys)


@pytest.mark.parametrize(("depth", "widen_factor"), [(10, 1), (16, 2)])
def test_wide_resnet_keys_match_robustbench(depth: int, widen_factor: int):
    model = build_model(
        "wide_resnet",
        num_classes=10,
        in_channels=3,
        mean=None,
        std=None,
        depth=depth,
        width=widen_factor,
    )
    state = model.state_dict()
    assert set(state) == robustbench_wide_resnet_keys(depth, widen_factor)
    if widen_factor == 2:
        assert state["block1.layer.0.convShortcut.weight"].shape == (32, 16, 1, 1)
        assert state["block3.layer.0.bn1.running_mean"].shape == (64,)
        assert state["block2.layer.1.conv2.weight"].shape == (64, 64, 3, 3)
        assert state["fc.weight"].shape == (10, 128)
        assert "block1.layer.1.convShortcut.weight" not in state
    else:
        # widen factor 1 keeps 16 channels in the first stage: no projection there.
        assert "block1.layer.0.convShortcut.weight" not in state
        assert "block2.layer.0.convShortcut.weight" in state


def test_wide_resnet_state_dict_round_trip():
    torch.manual_seed(0)
    source = small_model("wide_resnet").train()
    source(torch.rand(4, 3, 8, 8))  # moves the running statistics away from their defaults
    target = small_model("wide_resnet", mean=(0.4, 0.5, 0.6), std=(0.2, 0.2, 0.2))
    target.load_state_dict(source.state_dict(), strict=True)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value)


def reference_wide_resnet_logits(state: dict[str, Tensor], images: Tensor) -> Tensor:
    """Eval-mode WideResNet forward written from RobustBench's definition, using the state dict
    only: pre-activation blocks whose projection shortcut takes the activated input."""
    functional = nn.functional

    def batch_norm_relu(prefix: str, inputs: Tensor) -> Tensor:
        normalized = functional.batch_norm(
            inputs,
            state[f"{prefix}.running_mean"],
            state[f"{prefix}.running_var"],
            state[f"{prefix}.weight"],
            state[f"{prefix}.bias"],
        )
        return functional.relu(normalized)

    out = functional.conv2d(images, state["conv1.weight"], padding=1)
    for stage in range(1, 4):
        index = 0
        while f"block{stage}.layer.{index}.conv1.weight" in state:
            prefix = f"block{stage}.layer.{index}"
            stride = 2 if stage > 1 and index == 0 else 1
            activated = batch_norm_relu(f"{prefix}.bn1", out)
            residual = functional.conv2d(
                activated, state[f"{prefix}.conv1.weight"], stride=stride, padding=1
            )
            residual = batch_norm_relu(f"{prefix}.bn2", residual)
            residual = functional.conv2d(residual, state[f"{prefix}.conv2.weight"], padding=1)
            if f"{prefix}.convShortcut.weight" in state:
                out = functional.conv2d(
                    activated, state[f"{prefix}.convShortcut.weight"], stride=stride
                )
            out = out + residual
            index += 1
    out = batch_norm_relu("bn1", out)
    pooled = functional.avg_pool2d(out, out.shape[-1]).flatten(1)
    return functional.linear(pooled, state["fc.weight"], state["fc.bias"])


def test_wide_resnet_forward_matches_reference():
    torch.manual_seed(0)
    model = build_model(
        "wide_resnet", num_classes=10, in_channels=3, mean=None, std=None, depth=16, width=2
    )
    model.train()
    model(torch.rand(8, 3, 32, 32))  # non-trivial running statistics
    model.eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference_wide_resnet_logits(model.state_dict(), images)
        torch.testing.assert_close(model(images), expected)


def test_resnet_keys_follow_kuangliu_naming():
    resnet_state = small_model("resnet18").state_dict()
    for key in (
        "conv1.weight",
        "bn1.running_var",
        "layer1.0.conv1.weight",
        "layer2.0.shortcut.0.weight",
        "layer2.0.shortcut.1.running_mean",
        "layer4.1.bn2.weight",
        "fc.weight",
    ):
        assert key in resnet_state
    assert not any(key.startswith("layer1.0.shortcut") for key in resnet_state)

    preact_state = small_model("preact_resnet18").state_dict()
    for key in ("conv1.weight", "layer3.0.shortcut.0.weight", "bn.running_mean", "fc.bias"):
        assert key in preact_state


def test_wide_resnet_rejects_bad_depth():
    with pytest.raises(ValueError, match=r"\(depth - 4\) % 6 == 0"):
        build_model(
            "wide_resnet", num_classes=10, in_channels=3, mean=None, std=None, depth=20, width=1
        )


@pytest.mark.parametrize(("arch", "depth"), [("resnet18", 34), ("small_cnn", 4)])
def test_depth_rejected_where_not_configurable(arch: str, depth: int):
    with pytest.raises(ValueError, match=f"'{arch}'.*depth={depth}.*accept a depth: wide_resnet"):
        build_model(arch, num_classes=10, in_channels=3, mean=None, std=None, depth=depth)


def test_fixed_depth_may_be_restated():
    model = build_model(
        "resnet18", num_classes=10, in_channels=3, mean=None, std=None, depth=18, width=8
    )
    assert model.feature_dim == 64


@pytest.mark.parametrize(
    ("arch", "width"), [("resnet18", 2.5), ("wide_resnet", 0), ("small_cnn", -8)]
)
def test_bad_width_raises(arch: str, width: float):
    with pytest.raises(ValueError, match="width"):
        build_model(arch, num_classes=10, in_channels=3, mean=None, std=None, width=width)


def test_unknown_architecture_lists_valid_names():
    with pytest.raises(UnknownNameError) as error:
        build_model("resnet81", num_classes=10, in_channels=3, mean=None, std=None)
    assert isinstance(error.value, KeyError)
    message = str(error.value)
    assert "did you mean 'resnet18'" in message
    for name in SMALL_OPTIONS:
        assert name in message


@pytest.mark.parametrize("arch", sorted(SMALL_OPTIONS))
def test_gradients_reach_every_parameter(arch: str):
    torch.manual_seed(0)
    model = small_model(arch).train()
    images = torch.rand(4, 3, 16, 16, requires_grad=True)
    model(images).sum().backward()

    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
    assert images.grad is not None and images.grad.abs().sum() > 0
