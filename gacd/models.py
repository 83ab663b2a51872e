"""Image classifiers for teachers and students: a registry of architectures and `build_model`.

Every model maps pixels in [0, 1] of shape [B, C, H, W] (any C, H and W >= 8) to logits
[B, num_classes]. Normalisation is the model's first layer so that attacks operate in pixel space,
and the penultimate (pooled) features are exposed through `forward_features` for distillation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from gacd.registry import Registry

if TYPE_CHECKING:
    from gacd.config import ModelConfig, TeacherConfig
    from gacd.data import DatasetSpec

MODELS = Registry("model")


class Normalize(nn.Module):
    """Per-channel `(x - mean) / std`: [B, C, H, W] -> [B, C, H, W].

    `mean` and `std` are non-persistent buffers: they follow `.to(device)` but stay out of state
    dicts, so checkpoints of models that take raw pixels (RobustBench) load strictly.
    `mean=None, std=None` is the identity on `num_channels` channels.
    """

    def __init__(
        self,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        num_channels: int | None = None,
    ) -> None:
        super().__init__()
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither (identity normalisation)")
        if mean is None or std is None:
            if num_channels is None:
                raise ValueError("identity normalisation (mean=std=None) needs num_channels")
            mean, std = (0.0,) * num_channels, (1.0,) * num_channels
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if num_channels is not None and len(mean) != num_channels:
            raise ValueError(
                f"mean/std have {len(mean)} channels but the images have {num_channels}"
            )
        if any(value <= 0 for value in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.register_buffer("mean", _channel_tensor(mean), persistent=False)
        self.register_buffer("std", _channel_tensor(std), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        return (images - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def _channel_tensor(values: Sequence[float]) -> Tensor:
    """[C] values -> [1, C, 1, 1] float tensor that broadcasts over [B, C, H, W]."""
    return torch.tensor([float(value) for value in values], dtype=torch.float32).view(1, -1, 1, 1)


class ImageClassifier(nn.Module):
    """Normalise -> backbone -> global average pool -> linear head `fc`.

    Subclasses keep their layers as direct attributes, so that state-dict keys are those of the
    reference implementations, and implement `build_backbone` (the layers; the base class adds
    the `fc` head and initialises) and `forward_backbone`. Adaptive pooling makes every
    architecture accept any image size.
    """

    # The depth build_model accepts when `depth_is_configurable` is False (None: none at all).
    default_depth: ClassVar[int | None] = None
    depth_is_configurable: ClassVar[bool] = False
    default_width: ClassVar[float]
    fc: nn.Linear
    # The memory layout of the weights and of the images they take: `set_memory_format`.
    memory_format: torch.memory_format = torch.contiguous_format
    # `eager_features` compiled by `torch.compile`, called with the model as its first argument
    # (so a deep copy calls it on itself, not on the original); None: eager.
    compiled_features: Callable[[nn.Module, Tensor], Tensor] | None = None

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        width: float,
        depth: int | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            raise ValueError(
                f"num_classes and in_channels must be positive, got {num_classes}, {in_channels}"
            )
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.normalize = Normalize(mean, std, in_channels)
        self.feature_dim = self.build_backbone(in_channels, width, depth)
        self.fc = nn.Linear(self.feature_dim, num_classes)
        _initialize(self)

    def build_backbone(self, in_channels: int, width: float, depth: int | None) -> int:
        """Create the backbone's layers as attributes; returns feature_dim. `depth` is None
        unless the architecture's depth is configurable."""
        raise NotImplementedError

    def forward_backbone(self, normalized: Tensor) -> Tensor:
        """Normalised images [B, C, H, W] -> feature map [B, feature_dim, H', W']."""
        raise NotImplementedError

    def forward_features(self, images: Tensor) -> Tensor:
        """Pixels [B, C, H, W] in [0, 1] -> pooled penultimate features [B, feature_dim]."""
        images = images.contiguous(memory_format=self.memory_format)
        if self.compiled_features is not None:
            return self.compiled_features(self, images)
        return self.eager_features(images)

    def eager_features(self, images: Tensor) -> Tensor:
        feature_map = self.forward_backbone(self.normalize(images))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(feature_map, 1), 1)

    def set_memory_format(self, memory_format: torch.memory_format) -> ImageClassifier:
        """Weights and input images in `memory_format` (channels-last: faster convolutions on
        CPUs and tensor-core GPUs); state dict keys and results are unchanged, up to float
        rounding."""
        self.memory_format = memory_format
        return self.to(memory_format=memory_format)

    def compile_features(self) -> ImageClassifier:
        """Run `forward_features` through `torch.compile` (compiled on the first call of each
        mode and input shape); `forward` and attacks use it too."""
        # Every model shares this one function's code, and each mode it meets (train or eval,
        # grad, no_grad or inference, input gradients or not, a new batch size) compiles a graph
        # of its own: 7 in a final GACD run on digits, next to Dynamo's default limit of 8, past
        # which it would quietly run eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.compiled_features = torch.compile(type(self).eager_features)
        return self

    def forward_head(self, features: Tensor) -> Tensor:
        """Features [B, feature_dim] -> logits [B, num_classes]."""
        return self.fc(features)

    def forward(self, images: Tensor) -> Tensor:
        """Pixels [B, C, H, W] in [0, 1] -> logits [B, num_classes]."""
        return self.forward_head(self.forward_features(images))


def _initialize(model: nn.Module) -> None:
    """He initialisation for convolutions (fan_out, as RobustBench's WideResNet and torchvision's
    ResNet), unit/zero batch norms and zero classifier biases."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


def _positive_int(value: float, description: str) -> int:
    """`value` as an int; ValueError unless it is a positive whole number (16.0 is fine)."""
    if value <= 0 or value != int(value):
        raise ValueError(f"{description} must be a positive whole number, got {value}")
    return int(value)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        _conv3x3(in_channels, out_channels), nn.BatchNorm2d(out_channels), nn.ReLU()
    )


@MODELS.register("small_cnn")
class SmallCNN(ImageClassifier):
    """Four 3x3 conv-BN-ReLU layers with one 2x2 max pool; feature_dim = 2 * width.

    Meant for 8x8 digits and fast tests.
    """

    default_width = 32

    def build_backbone(self, in_channels: int, width: float, depth: int | None) -> int:
        channels = _positive_int(width, "small_cnn width")
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, channels),
            _conv_bn_relu(channels, channels),
            nn.MaxPool2d(2),
            _conv_bn_relu(channels, 2 * channels),
            _conv_bn_relu(2 * channels, 2 * channels),
        )
        return 2 * channels

    def forward_backbone(self, normalized: Tensor) -> Tensor:
        return self.features(normalized)


class BasicBlock(nn.Module):
    """Post-activation residual block (kuangliu/pytorch-cifar naming):
    [B, in, H, W] -> [B, out, H / stride, W / stride]."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        # An empty Sequential is the identity and keeps the reference's `shortcut.*` keys.
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                _conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels)
            )

    def forward(self, inputs: Tensor) -> Tensor:
        out = nn.functional.relu(self.bn1(self.conv1(inputs)))
        out = self.bn2(self.conv2(out))
        return nn.functional.relu(out + self.shortcut(inputs))


class PreActBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016, as in Wong et al. / Rice et al.):
    [B, in, H, W] -> [B, out, H / stride, W / stride]."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.shortcut: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(_conv1x1(in_channels, out_channels, stride))

    def forward(self, inputs: Tensor) -> Tensor:
        activated = nn.functional.relu(self.bn1(inputs))
        # The projection sees the pre-activated input; the identity path stays untouched.
        shortcut = inputs if self.shortcut is None else self.shortcut(activated)
        out = self.conv1(activated)
        out = self.conv2(nn.functional.relu(self.bn2(out)))
        return out + shortcut


def _residual_stages(
    block: type[BasicBlock] | type[PreActBlock], base_channels: int
) -> tuple[nn.Sequential, nn.Sequential, nn.Sequential, nn.Sequential]:
    """ResNet-18 stages: two blocks each, channels base * (1, 2, 4, 8), strides (1, 2, 2, 2)."""
    stages = []
    in_channels = base_channels
    for multiplier, stride in ((1, 1), (2, 2), (4, 2), (8, 2)):
        out_channels = base_channels * multiplier
        stages.append(
            nn.Sequential(
                block(in_channels, out_channels, stride), block(out_channels, out_channels, 1)
            )
        )
        in_channels = out_channels
    return stages[0], stages[1], stages[2], stages[3]


@MODELS.register("resnet18")
class ResNet18(ImageClassifier):
    """CIFAR ResNet-18 (3x3 stride-1 stem, no max pool); feature_dim = 8 * width (512).

    Keys follow kuangliu/pytorch-cifar except that the head is `fc` instead of `linear`.
    """

    default_depth = 18
    default_width = 64

    def build_backbone(self, in_channels: int, width: float, depth: int | None) -> int:
        channels = _positive_int(width, "resnet18 width")
        self.conv1 = _conv3x3(in_channels, channels)
        self.bn1 = nn.BatchNorm2d(channels)
        self.layer1, self.layer2, self.layer3, self.layer4 = _residual_stages(BasicBlock, channels)
        return 8 * channels

    def forward_backbone(self, normalized: Tensor) -> Tensor:
        out = nn.functional.relu(self.bn1(self.conv1(normalized)))
        return self.layer4(self.layer3(self.layer2(self.layer1(out))))


@MODELS.register("preact_resnet18")
class PreActResNet18(ImageClassifier):
    """CIFAR pre-activation ResNet-18 with a final BN-ReLU; feature_dim = 8 * width (512).

    Keys follow Rice et al. ('Overfitting in adversarially robust deep learning'): conv1,
    layer1..4, bn; the head is `fc` instead of `linear`.
    """

    default_depth = 18
    default_width = 64

    def build_backbone(self, in_channels: int, width: float, depth: int | None) -> int:
        channels = _positive_int(width, "preact_resnet18 width")
        self.conv1 = _conv3x3(in_channels, channels)
        self.layer1, self.layer2, self.layer3, self.layer4 = _residual_stages(PreActBlock, channels)
        self.bn = nn.BatchNorm2d(8 * channels)
        return 8 * channels

    def forward_backbone(self, normalized: Tensor) -> Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(normalized)))))
        return nn.functional.relu(self.bn(out))


class WideBasicBlock(nn.Module):
    """WideResNet block with RobustBench/TRADES attribute names:
    [B, in, H, W] -> [B, out, H / stride, W / stride]."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.convShortcut: nn.Conv2d | None = None
        if in_channels != out_channels:
            self.convShortcut = _conv1x1(in_channels, out_channels, stride)

    def forward(self, inputs: Tensor) -> Tensor:
        activated = self.relu1(self.bn1(inputs))
        # As in the reference, the projection shortcut sees the pre-activated input.
        shortcut = inputs if self.convShortcut is None else self.convShortcut(activated)
        out = self.conv1(activated)
        out = self.conv2(self.relu2(self.bn2(out)))
        return out + shortcut


class NetworkBlock(nn.Module):
    """A stage of `num_blocks` WideBasicBlocks held in `layer` (the reference's key prefix)."""

    def __init__(self, num_blocks: int, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            WideBasicBlock(in_channels, out_channels, stride),
            *(WideBasicBlock(out_channels, out_channels, 1) for _ in range(num_blocks - 1)),
        )

    def forward(self, inputs: Tensor) -> Tensor:
        return self.layer(inputs)


@MODELS.register("wide_resnet")
class WideResNet(ImageClassifier):
    """WideResNet-depth-width (Zagoruyko & Komodakis); feature_dim = 64 * width.

    Parameter and buffer names equal RobustBench's `WideResNet` (without `sub_block1`), so its
    CIFAR state dicts load with `strict=True`.
    """

    default_depth = 34
    depth_is_configurable = True
    default_width = 10

    def build_backbone(self, in_channels: int, width: float, depth: int | None) -> int:
        if depth is None or depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(
                f"wide_resnet depth must satisfy (depth - 4) % 6 == 0 with depth >= 10 "
                f"(e.g. 16, 28, 34, 70), got {depth}"
            )
        widen_factor = _positive_int(width, "wide_resnet width (widen factor)")
        channels = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        blocks_per_stage = (int(depth) - 4) // 6
        self.conv1 = _conv3x3(in_channels, channels[0])
        self.block1 = NetworkBlock(blocks_per_stage, channels[0], channels[1], 1)
        self.block2 = NetworkBlock(blocks_per_stage, channels[1], channels[2], 2)
        self.block3 = NetworkBlock(blocks_per_stage, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU()
        return channels[3]

    def forward_backbone(self, normalized: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(normalized))))
        return self.relu(self.bn1(out))


def _round_channels(channels: float, divisor: int = 8) -> int:
    """Nearest multiple of `divisor` (at least `divisor`), but never more than 10% below
    `channels`: the MobileNet convention for width multipliers."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


class InvertedResidual(nn.Module):
    """MobileNetV2 block, expand 1x1 -> depthwise 3x3 -> linear 1x1 (kuangliu naming):
    [B, in, H, W] -> [B, out, H / stride, W / stride]."""

    def __init__(self, in_channels: int, out_channels: int, expansion: int, stride: int) -> None:
        super().__init__()
        hidden = expansion * in_channels
        self.stride = stride
        self.conv1 = _conv1x1(in_channels, hidden)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(
            hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False
        )
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv3 = _conv1x1(hidden, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        # The CIFAR reference keeps a residual on every stride-1 block, projecting when the
        # channel count changes.
        self.shortcut = nn.Sequential()
        if stride == 1 and in_channels != out_channels:
            self.shortcut = nn.Sequential(
                _conv1x1(in_channels, out_channels), nn.BatchNorm2d(out_channels)
            )

    def forward(self, inputs: Tensor) -> Tensor:
        out = nn.functional.relu(self.bn1(self.conv1(inputs)))
        out = nn.functional.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return (out + self.shortcut(inputs)) if self.stride == 1 else out


@MODELS.register("mobilenet_v2")
class MobileNetV2(ImageClassifier):
    """CIFAR MobileNetV2 (stride-1 stem and second stage, as kuangliu/pytorch-cifar);
    `width` multiplies the channels; feature_dim = 1280 * max(1, width)."""

    default_width = 1.0
    # (expansion, out_channels, num_blocks, stride of the first block)
    stages: ClassVar[tuple[tuple[int, int, int, int], ...]] = (
        (1, 16, 1, 1),
        (6, 24, 2, 1),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def build_backbone(self, in_channels: int, width: float, depth: int | None) -> int:
        if width <= 0:
            raise ValueError(f"mobilenet_v2 width (multiplier) must be positive, got {width}")
        feature_dim = _round_channels(1280 * max(1.0, width))
        stem_channels = _round_channels(32 * width)
        self.conv1 = _conv3x3(in_channels, stem_channels)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        blocks = []
        block_in = stem_channels
        for expansion, stage_channels, num_blocks, first_stride in self.stages:
            block_out = _round_channels(stage_channels * width)
            for index in range(num_blocks):
                stride = first_stride if index == 0 else 1
                blocks.append(InvertedResidual(block_in, block_out, expansion, stride))
                block_in = block_out
        self.layers = nn.Sequential(*blocks)
        self.conv2 = _conv1x1(block_in, feature_dim)
        self.bn2 = nn.BatchNorm2d(feature_dim)
        return feature_dim

    def forward_backbone(self, normalized: Tensor) -> Tensor:
        out = nn.functional.relu(self.bn1(self.conv1(normalized)))
        out = self.layers(out)
        return nn.functional.relu(self.bn2(self.conv2(out)))


def build_model(
    arch: str,
    *,
    num_classes: int,
    in_channels: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    depth: int | None = None,
    width: float | None = None,
) -> ImageClassifier:
    """The registered architecture `arch` for pixels [B, in_channels, H, W] in [0, 1].

    `depth`/`width` of None take the architecture's default. A depth is only accepted by
    architectures whose depth is configurable, or when it equals a fixed depth (resnet18: 18).
    Raises the registry's UnknownNameError for an unknown `arch` and ValueError for bad options.
    """
    model_class: type[ImageClassifier] = MODELS.get(arch)
    width = model_class.default_width if width is None else width
    if model_class.depth_is_configurable:
        depth = model_class.default_depth if depth is None else depth
    elif depth is not None and depth != model_class.default_depth:
        configurable = [name for name in MODELS.names() if MODELS.get(name).depth_is_configurable]
        fixed = (
            f"has a fixed depth of {model_class.default_depth}"
            if model_class.default_depth is not None
            else "takes no depth"
        )
        raise ValueError(
            f"model '{arch}' {fixed}, got depth={depth}; "
            f"architectures that accept a depth: {', '.join(configurable)}"
        )
    else:
        depth = None
    return model_class(
        num_classes=num_classes,
        in_channels=in_channels,
        mean=mean,
        std=std,
        width=width,
        depth=depth,
    )


def build_classifier(model: ModelConfig | TeacherConfig, spec: DatasetSpec) -> ImageClassifier:
    """A model for a data set, normalising with the data set's statistics unless told not to."""
    return build_model(
        model.arch,
        num_classes=spec.num_classes,
        in_channels=spec.in_channels,
        mean=spec.mean if model.normalize else None,
        std=spec.std if model.normalize else None,
        depth=model.depth,
        width=model.width,
    )


def classifier_from_checkpoint(state: dict) -> ImageClassifier:
    """The student of a project checkpoint, weights loaded, in eval mode, without its data:
    the data set's spec (classes, channels, normalisation) is in checkpoints written since
    2026-12; older ones raise CheckpointError (evaluate them with `gacd.evaluate`)."""
    from gacd.checkpoint import CheckpointError
    from gacd.config import Config, flatten
    from gacd.data import DatasetSpec

    if state.get("data_spec") is None:
        raise CheckpointError(
            "checkpoint holds no data_spec (written before 2026-12): the student cannot be "
            "rebuilt without its data set; python -m gacd.evaluate loads the data instead"
        )
    config = Config.from_dict(flatten(state["config"]))
    spec = DatasetSpec(**state["data_spec"])
    model = build_classifier(config.student, spec)
    model.load_state_dict(state["student"])
    return model.eval()
