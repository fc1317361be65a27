"""A 3-D U-Net: planned depth, widths, per-axis strides and kernels, instance norm,
leaky ReLU, optional deep supervision (nnU-Net's layout, at any size).

Each stage is two convolutions (3 voxels long on each axis, or 1 across thick
slices; :mod:`medhpc.ct.planner`), each followed by instance norm and a leaky
ReLU (slope 0.01); the encoder downsamples by strided convolution (per axis), the
decoder upsamples by transposed convolution and concatenates the skip.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from medhpc.ct.planner import NetworkLayout


@dataclass(frozen=True)
class UNetConfig:
    """The network's shape; stored with the model so ct-segment rebuilds it."""

    in_channels: int = 1
    classes: int = 4  # background included
    widths: tuple = (8, 16, 32, 64)
    deep_supervision: bool = False
    strides: tuple | None = None  # per stage (z, y, x); None: every axis halved per stage
    kernels: tuple | None = None  # per stage (z, y, x); None: 3^3

    @classmethod
    def from_layout(cls, layout: NetworkLayout, classes: int, deep_supervision: bool = False,
                    in_channels: int = 1) -> "UNetConfig":
        return cls(in_channels, classes, tuple(layout.widths), deep_supervision,
                   tuple(layout.strides), tuple(layout.kernels))

    @property
    def layout(self) -> NetworkLayout:
        if self.strides is None:
            return NetworkLayout.isotropic(self.widths)
        return NetworkLayout(tuple(self.widths), tuple(self.strides), tuple(self.kernels))

    @property
    def depth(self) -> int:
        return len(self.widths)

    @property
    def divisor(self) -> tuple:
        """Patch sizes must be multiples of these (z, y, x)."""
        return self.layout.divisor

    def to_dict(self) -> dict:
        values = {**asdict(self), "widths": list(self.widths)}
        for key in ("strides", "kernels"):
            if values[key] is not None:
                values[key] = [list(v) for v in values[key]]
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "UNetConfig":
        values = {**values, "widths": tuple(values["widths"])}
        for key in ("strides", "kernels"):
            if values.get(key) is not None:
                values[key] = tuple(tuple(int(n) for n in v) for v in values[key])
        return cls(**values)


class ConvBlock(nn.Sequential):
    """Two (conv, instance norm, leaky ReLU); the first conv may stride."""

    def __init__(self, in_channels: int, out_channels: int, kernel=(3, 3, 3), stride=(1, 1, 1)):
        kernel, stride = tuple(kernel), tuple(stride)
        padding = tuple(k // 2 for k in kernel)
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=padding),
            nn.InstanceNorm3d(out_channels, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv3d(out_channels, out_channels, kernel, padding=padding),
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
        layout = config.layout
        widths, strides, kernels = layout.widths, layout.strides, layout.kernels
        self.encoder = nn.ModuleList(
            [ConvBlock(config.in_channels, widths[0], kernels[0])]
            + [ConvBlock(widths[i - 1], widths[i], kernels[i], strides[i])
               for i in range(1, len(widths))])
        self.upsample = nn.ModuleList(
            [nn.ConvTranspose3d(widths[i], widths[i - 1], strides[i], stride=strides[i])
             for i in range(len(widths) - 1, 0, -1)])
        self.decoder = nn.ModuleList(
            [ConvBlock(2 * widths[i - 1], widths[i - 1], kernels[i - 1])
             for i in range(len(widths) - 1, 0, -1)])
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
