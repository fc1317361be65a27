"""A compact 3-D U-Net: configurable depth and widths, instance norm, leaky ReLU,
optional deep supervision (nnU-Net's layout at a size that trains on a CPU).

Each level is two 3x3x3 convolutions, each followed by instance norm and a
leaky ReLU (slope 0.01); the encoder downsamples by strided convolution, the
decoder upsamples by transposed convolution and concatenates the skip.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class UNetConfig:
    """The network's shape; stored with the model so ct-segment rebuilds it."""

    in_channels: int = 1
    classes: int = 4  # background included
    widths: tuple = (8, 16, 32, 64)
    deep_supervision: bool = False

    @property
    def depth(self) -> int:
        return len(self.widths)

    @property
    def divisor(self) -> int:
        """Patch sizes must be multiples of this (one halving per level below the top)."""
        return 2 ** (self.depth - 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "widths": list(self.widths)}

    @classmethod
    def from_dict(cls, values: dict) -> "UNetConfig":
        return cls(**{**values, "widths": tuple(values["widths"])})


class ConvBlock(nn.Sequential):
    """Two (conv 3^3, instance norm, leaky ReLU); the first conv may stride."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__(
            nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1),
            nn.InstanceNorm3d(out_channels, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv3d(out_channels, out_channels, 3, padding=1),
            nn.InstanceNorm3d(out_channels, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
        )


class UNet3D(nn.Module):
    """3-D U-Net returning class logits at full resolution (and coarser ones with deep
    supervision in training mode: a list, finest first)."""

    def __init__(self, config: UNetConfig, activation_checkpointing: bool = False):
        super().__init__()
        self.config = config
        self.activation_checkpointing = activation_checkpointing
        widths = config.widths
        self.encoder = nn.ModuleList(
            [ConvBlock(config.in_channels, widths[0])]
            + [ConvBlock(widths[i - 1], widths[i], stride=2) for i in range(1, len(widths))])
        self.upsample = nn.ModuleList(
            [nn.ConvTranspose3d(widths[i], widths[i - 1], 2, stride=2)
             for i in range(len(widths) - 1, 0, -1)])
        self.decoder = nn.ModuleList(
            [ConvBlock(2 * widths[i - 1], widths[i - 1]) for i in range(len(widths) - 1, 0, -1)])
        supervised = range(len(widths) - 1, 0, -1) if config.deep_supervision else [1]
        self.heads = nn.ModuleList([nn.Conv3d(widths[i - 1], config.classes, 1)
                                    for i in supervised])

    def _run(self, block, x):
        if self.activation_checkpointing and self.training and x.requires_grad:
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward(self, x):
        skips = []
        for block in self.encoder:
            x = self._run(block, x)
            skips.append(x)
        x = skips.pop()
        features = []
        for up, block in zip(self.upsample, self.decoder):
            x = self._run(block, torch.cat([up(x), skips.pop()], dim=1))
            features.append(x)
        if self.config.deep_supervision and self.training:
            return [head(f) for head, f in zip(self.heads[::-1], features[::-1])]
        return self.heads[-1](features[-1])
