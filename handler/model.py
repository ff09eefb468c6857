"""The MRL ResNet50: a torchvision-layout ResNet50 (v1.5) with nested classification heads.

The module names follow torchvision's ``resnet50`` exactly (conv1, bn1, layer1.0.conv1, ... fc),
because checkpoints depend on them. The ``fc`` head is replaced by one of two nested heads:

* ``mrl``:   one linear layer per nesting size m, ``fc.nesting_classifier_{i}`` of shape (C, m);
* ``mrl_e``: one linear layer ``fc.nesting_classifier_0`` of shape (C, 2048) whose first m
             columns (and the one shared bias) serve size m.

Both are the layouts of the official RAIVNLab/MRL checkpoints, so their state dicts load after
the ``module.`` prefix is stripped (see ``handler.checkpoint``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

EMBED_DIM = 2048
DEFAULT_NESTING: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
HEAD_KINDS = ("mrl", "mrl_e")


class BlurConv2d(nn.Module):
    """A strided conv preceded by a fixed 3x3 binomial low-pass filter (anti-aliased downsampling).

    The official checkpoints were trained with this wrapper on every Conv2d with stride > 1 and
    at least 16 input channels; its state-dict keys are ``conv.weight`` and ``blur_filter``.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        taps = torch.tensor([1.0, 2.0, 1.0])
        kernel = torch.outer(taps, taps) / 16.0  # (3, 3), sums to 1
        self.register_buffer("blur_filter", kernel.expand(conv.in_channels, 1, 3, 3).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.blur_filter, padding=1, groups=self.conv.in_channels)
        return self.conv(x)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: the stride sits on the 3x3 conv2."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class NestedLinear(nn.Module):
    """MRL head: an independent linear classifier on the first m dims, for every nesting size m."""

    def __init__(self, nesting: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.nesting = tuple(nesting)
        for i, m in enumerate(self.nesting):
            self.add_module(f"nesting_classifier_{i}", nn.Linear(m, num_classes))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # (B, 2048) -> (B, S, C)
        heads = [getattr(self, f"nesting_classifier_{i}") for i in range(len(self.nesting))]
        return torch.stack([head(z[:, :m]) for head, m in zip(heads, self.nesting)], dim=1)


class EfficientNestedLinear(nn.Module):
    """MRL-E head: one (C, 2048) classifier; size m uses its first m columns and the shared bias."""

    def __init__(self, nesting: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.nesting = tuple(nesting)
        self.nesting_classifier_0 = nn.Linear(self.nesting[-1], num_classes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # Logits at size m are a prefix sum over dimension blocks, so all sizes cost one matmul:
        # block k covers dims [nesting[k-1], nesting[k]); cumsum over blocks gives every prefix.
        w, b = self.nesting_classifier_0.weight, self.nesting_classifier_0.bias
        starts = (0,) + self.nesting[:-1]
        blocks = [z[:, a:m] @ w[:, a:m].t() for a, m in zip(starts, self.nesting)]  # S x (B, C)
        return torch.stack(blocks, dim=1).cumsum(dim=1) + b  # (B, S, C)


class MRLResNet50(nn.Module):
    """ResNet50 backbone with nested (Matryoshka) heads.

    ``forward`` returns logits for every nesting size as one (B, S, C) tensor;
    ``embed`` returns the (B, 2048) embedding whose first m dims feed head m.
    """

    def __init__(self, *, num_classes: int = 1000, nesting: Sequence[int] = DEFAULT_NESTING,
                 head: str = "mrl", blurpool: bool = False) -> None:
        super().__init__()
        nesting = tuple(int(m) for m in nesting)
        if not nesting or list(nesting) != sorted(set(nesting)) or nesting[0] < 1:
            raise ValueError(f"nesting sizes must be strictly increasing positive ints, got {nesting}")
        if nesting[-1] != EMBED_DIM:
            raise ValueError(f"the last nesting size must be {EMBED_DIM}, got {nesting[-1]}")
        if head not in HEAD_KINDS:
            raise ValueError(f"head must be one of {HEAD_KINDS}, got {head!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.nesting, self.head_kind, self.blurpool = nesting, head, blurpool

        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, 3, stride=1)
        self.layer2 = self._make_layer(128, 4, stride=2)
        self.layer3 = self._make_layer(256, 6, stride=2)
        self.layer4 = self._make_layer(512, 3, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = (NestedLinear if head == "mrl" else EfficientNestedLinear)(nesting, num_classes)
        del self.inplanes

        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(mod, nn.BatchNorm2d):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)
        # Zero-init the last BN of each residual branch: each block starts as the identity.
        for mod in self.modules():
            if isinstance(mod, Bottleneck):
                nn.init.zeros_(mod.bn3.weight)
        if blurpool:
            _wrap_strided_convs(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, out, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(out))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = out
        layers += [Bottleneck(out, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    @property
    def num_classes(self) -> int:
        return self.fc.nesting_classifier_0.out_features

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, 2048) embedding."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 2048, H/32, W/32)
        return torch.flatten(self.avgpool(x), 1)  # (B, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, S, C) logits, one row per nesting size."""
        return self.fc(self.embed(x))


def _wrap_strided_convs(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= 16:
            setattr(module, name, BlurConv2d(child))
        else:
            _wrap_strided_convs(child)


def mrl_resnet50(*, num_classes: int = 1000, nesting: Sequence[int] = DEFAULT_NESTING,
                 head: str = "mrl", blurpool: bool = False) -> MRLResNet50:
    """Build an untrained MRL ResNet50 (25.5M backbone parameters, torchvision module names)."""
    return MRLResNet50(num_classes=num_classes, nesting=nesting, head=head, blurpool=blurpool)
