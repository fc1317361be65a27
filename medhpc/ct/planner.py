"""Memory planner: patch size, batch size, AMP and activation checkpointing for a GPU budget.

The estimate counts what training keeps alive (numbers of float elements):

- activations saved for the backward pass: per encoder level about 4 feature
  maps of the level's width (two convolutions and two norms; the leaky ReLU is
  in place), per decoder level about 7 (transposed convolution, the
  concatenation counted twice, two convolutions and two norms), plus about 6
  maps of the class count at full resolution (logits, softmax, one-hot, loss
  terms). With activation checkpointing only each block's input stays
  (1 map per level, 3 for decoder inputs), and one block is recomputed at a time.
- weights, gradients and optimizer state (1 or 2 more copies).
- a fixed allowance for the CUDA context and convolution workspaces.

AMP stores activations in half precision (counted as 2.5 bytes per element, as
some stay in float32). nnU-Net's reference point: 5.6e8 feature-map elements at
8 GB with batch 2. The plan keeps the estimate below ``usable_fraction`` of
the budget; the peak actually allocated is logged after the first epoch on a GPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

GIB = 1024 ** 3
CONTEXT_BYTES = 0.8 * GIB
USABLE_FRACTION = 0.85
MIN_BATCH = 2


@dataclass(frozen=True)
class MemoryPlan:
    """The chosen training shape and its memory estimate."""

    patch: tuple
    batch: int
    amp: bool
    checkpointing: bool
    estimated_gb: float
    budget_gb: float | None
    fits: bool
    source: str  # "planned" or "given"

    def to_dict(self) -> dict:
        return {**asdict(self), "patch": list(self.patch)}


def parameter_count(widths, classes: int, in_channels: int = 1, deep_supervision=False) -> int:
    """Weights of :class:`~medhpc.ct.unet.UNet3D` with these widths (computed, no torch)."""
    def conv(cin, cout, k):
        return cin * cout * k ** 3 + cout

    count, previous = 0, in_channels
    for w in widths:
        count += conv(previous, w, 3) + conv(w, w, 3) + 4 * w
        previous = w
    for i in range(len(widths) - 1, 0, -1):
        low, high = widths[i], widths[i - 1]
        count += conv(low, high, 2) + conv(2 * high, high, 3) + conv(high, high, 3) + 4 * high
    supervised = widths[:-1] if deep_supervision else widths[:1]
    return count + sum(conv(w, classes, 1) for w in supervised)


def estimate_bytes(widths, classes: int, patch, batch: int, amp: bool, checkpointing: bool,
                   optimizer: str = "sgd") -> float:
    """Estimated peak training memory in bytes on one GPU."""
    voxels = float(np.prod(patch))
    per_sample = 6.0 * classes * voxels
    largest_block = 0.0
    for level, width in enumerate(widths):
        level_voxels = voxels / 8 ** level
        decoder = level < len(widths) - 1
        if checkpointing:
            per_sample += width * level_voxels * (1 + (3 if decoder else 0))
            largest_block = max(largest_block, (7 if decoder else 4) * width * level_voxels)
        else:
            per_sample += width * level_voxels * (4 + (7 if decoder else 0))
    activation_bytes = (2.5 if amp else 4.0) * batch * (per_sample + largest_block)
    copies = 3 if optimizer == "sgd" else 4
    return activation_bytes + 4.0 * copies * parameter_count(widths, classes) + CONTEXT_BYTES


def _fits(widths, classes, patch, batch, amp, checkpointing, optimizer, budget_bytes):
    return estimate_bytes(widths, classes, patch, batch, amp, checkpointing,
                          optimizer) <= USABLE_FRACTION * budget_bytes


def plan_training(widths, classes: int, case_shape, budget_gb: float, amp: bool | None,
                  checkpointing: bool | None, optimizer: str = "sgd", max_batch: int = 4,
                  max_patch: int = 192, spacing_zyx=None) -> MemoryPlan:
    """Choose the largest patch (then batch) that fits ``budget_gb``.

    The patch starts as ``max_patch^3`` voxels shared out in proportion to ``1 / spacing``
    (``spacing_zyx``, mm: the same length in mm on every axis, as nnU-Net starts; 2.5 x 0.8 x
    0.8 mm voxels give 96 x 288 x 288), no longer than the median case shape, each axis
    rounded up to the network's divisor; then the axis spanning the most mm shrinks by one
    divisor at a time until batch 2 fits. AMP is used unless ``amp`` is
    False; activation checkpointing is added (unless ``checkpointing`` is False) when the
    patch would otherwise fall below 96 of the finest voxels (in mm) on an axis that is
    longer. The plan depends only on its arguments, not on the node that computes it.
    """
    divisor = 2 ** (len(widths) - 1)
    budget = budget_gb * GIB
    use_amp = True if amp is None else amp
    spacing = np.ones(3) if spacing_zyx is None else np.asarray(spacing_zyx, np.float64)
    proportional = (1.0 / spacing) * (max_patch ** 3 * np.prod(spacing)) ** (1 / 3)
    caps = [max(divisor, divisor * int(np.ceil(r / divisor - 1e-9))) for r in proportional]
    start = [int(min(cap, divisor * np.ceil(n / divisor))) for n, cap in zip(case_shape, caps)]
    options = [False, True] if checkpointing is None else [checkpointing]
    for use_checkpointing in options:
        patch = list(start)
        while not _fits(widths, classes, patch, MIN_BATCH, use_amp, use_checkpointing,
                        optimizer, budget):
            extents = [p * s if p > divisor else 0.0 for p, s in zip(patch, spacing)]
            axis = int(np.argmax(extents))
            if extents[axis] == 0.0:
                break
            patch[axis] -= divisor
        fits = _fits(widths, classes, patch, MIN_BATCH, use_amp, use_checkpointing, optimizer,
                     budget)
        # "small": an axis shorter than 96 of the finest voxels (in mm), where it was longer
        small = any(p * s < min(96 * spacing.min(), n * s)
                    for p, n, s in zip(patch, start, spacing))
        if fits and (not small or use_checkpointing or len(options) == 1):
            break
    batch = MIN_BATCH
    while batch < max_batch and _fits(widths, classes, patch, batch + 1, use_amp,
                                      use_checkpointing, optimizer, budget):
        batch += 1
    estimate = estimate_bytes(widths, classes, patch, batch, use_amp, use_checkpointing,
                              optimizer)
    return MemoryPlan(tuple(patch), batch, use_amp, use_checkpointing,
                      round(estimate / GIB, 3), budget_gb, bool(fits), "planned")


def given_plan(widths, classes: int, patch, batch: int, amp: bool, checkpointing: bool,
               budget_gb: float | None, optimizer: str = "sgd") -> MemoryPlan:
    """The estimate for a patch and batch set on the command line."""
    estimate = estimate_bytes(widths, classes, patch, batch, amp, checkpointing, optimizer)
    fits = True if budget_gb is None else estimate <= USABLE_FRACTION * budget_gb * GIB
    return MemoryPlan(tuple(patch), batch, amp, checkpointing, round(estimate / GIB, 3),
                      budget_gb, bool(fits), "given")
