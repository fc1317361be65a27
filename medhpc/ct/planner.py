"""Training planner: network layout, patch, batch, AMP and activation checkpointing for a
GPU budget, from the dataset's voxel spacing and case shapes.

**Layout.** Stage by stage, an axis is halved when its feature map is still at least
``2 * MIN_FEATURE`` voxels and its voxels are less than twice as long as the finest
voxels at that stage, so an anisotropic grid (2.5 x 0.8 x 0.8 mm) first pools only
in plane (stride 1, 2, 2) until its voxels are near cubic; the convolutions are 3
voxels long on an axis once its voxels are within 2x of the finest, else 1 (no
mixing across thick slices). Widths double from a base to a cap per stage
(nnU-Net's rule: 32 to 320 on a GPU).

**Memory.** The estimate counts what training keeps alive (numbers of float elements):

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
the budget; ``bench/ct/memory.py`` checks the estimate against measured peaks.

Every function here depends only on its arguments (no torch, no device query), so a
CPU login node's ``--dry-run`` prints the plan the GPU job will use.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

GIB = 1024 ** 3
CONTEXT_BYTES = 0.8 * GIB
USABLE_FRACTION = 0.85
MIN_BATCH = 2
#: An axis is halved while its feature map stays at least this long.
MIN_FEATURE = 4
#: An axis pools / gets 3-voxel kernels while its voxels are under this many times the finest.
ANISOTROPY_LIMIT = 2.0
#: A low-resolution configuration is planned when the patch covers less of the median case.
LOWRES_COVERAGE = 0.25
LOWRES_STEP = 1.03
#: ... and only when it has at most this fraction of the full-resolution voxels per case.
LOWRES_MAX_VOXEL_FRACTION = 0.5
#: The planned patch shrinks by this factor on one axis at a time until it fits.
SHRINK_STEP = 0.97


@dataclass(frozen=True)
class WidthRule:
    """How planned widths grow: ``base * 2**stage`` up to ``cap``, at most ``max_stages``."""

    base: int
    cap: int
    max_stages: int

    def widths(self, stages: int) -> tuple:
        return tuple(min(self.base * 2 ** s, self.cap) for s in range(stages))


#: nnU-Net's 3-D widths, for plans made for a GPU.
GPU_WIDTHS = WidthRule(32, 320, 7)
#: A network that trains on a CPU in minutes (the default without a GPU or --gpu-mem-gb).
CPU_WIDTHS = WidthRule(8, 64, 5)


@dataclass(frozen=True)
class NetworkLayout:
    """Widths, strides and convolution kernels per stage, axes (z, y, x).

    Stage 0 has stride (1, 1, 1); the stride of stage ``s`` downsamples from stage ``s - 1``.
    """

    widths: tuple
    strides: tuple
    kernels: tuple

    @classmethod
    def isotropic(cls, widths) -> "NetworkLayout":
        """Every axis halved at every stage, 3^3 kernels (the layout of older models)."""
        stages = len(widths)
        return cls(tuple(widths), ((1, 1, 1),) + ((2, 2, 2),) * (stages - 1),
                   ((3, 3, 3),) * stages)

    @property
    def depth(self) -> int:
        return len(self.widths)

    @property
    def divisor(self) -> tuple:
        """Patch sizes must be multiples of these (z, y, x): the product of the strides."""
        return tuple(int(np.prod([s[axis] for s in self.strides])) for axis in range(3))

    def stage_reduction(self, stage: int) -> float:
        """Voxels of the full-resolution patch per voxel at ``stage``."""
        return float(np.prod([np.prod(s) for s in self.strides[:stage + 1]]))

    def to_dict(self) -> dict:
        return {"widths": list(self.widths), "strides": [list(s) for s in self.strides],
                "kernels": [list(k) for k in self.kernels]}


def stage_layout(spacing_zyx, patch, stages: int | None = None,
                 max_stages: int = GPU_WIDTHS.max_stages) -> tuple[tuple, tuple]:
    """Strides and kernels per stage for a patch on voxels of ``spacing_zyx`` mm.

    With ``stages`` given (widths from the command line) the network has exactly that
    many stages; when no axis may pool under the feature-map rule, the axes of the
    finest voxels that can still be halved are.
    """
    spacing = np.asarray(spacing_zyx, dtype=np.float64).copy()
    size = np.asarray(patch, dtype=np.float64).copy()
    limit = stages if stages is not None else max_stages
    kernel = np.where(spacing / spacing.min() < ANISOTROPY_LIMIT, 3, 1)
    strides, kernels = [(1, 1, 1)], []
    while len(strides) < limit:
        pooled = _pooled_axes(spacing, size, 2 * MIN_FEATURE)
        if not pooled.any() and stages is not None:
            pooled = _pooled_axes(spacing, size, 2)
        if not pooled.any() and stages is None:
            break
        kernels.append(tuple(int(k) for k in kernel))
        spacing = np.where(pooled, spacing * 2, spacing)
        size = np.where(pooled, np.ceil(size / 2), size)
        strides.append(tuple(int(v) for v in np.where(pooled, 2, 1)))
        kernel = np.where(spacing / spacing.min() < ANISOTROPY_LIMIT, 3, kernel)
    kernels.append(tuple(int(k) for k in kernel))
    return tuple(strides), tuple(kernels)


def _pooled_axes(spacing, size, shortest) -> np.ndarray:
    candidates = size >= shortest
    if not candidates.any():
        return candidates
    finest = spacing[candidates].min()
    return candidates & (spacing / finest < ANISOTROPY_LIMIT)


def network_layout(spacing_zyx, patch, widths=None, rule: WidthRule = GPU_WIDTHS):
    """The layout for ``patch``: given ``widths`` fix the depth, else ``rule`` plans them."""
    if widths is not None:
        strides, kernels = stage_layout(spacing_zyx, patch, stages=len(widths))
        return NetworkLayout(tuple(widths), strides, kernels)
    strides, kernels = stage_layout(spacing_zyx, patch, max_stages=rule.max_stages)
    return NetworkLayout(rule.widths(len(strides)), strides, kernels)


def as_layout(network) -> NetworkLayout:
    """A :class:`NetworkLayout`, or a widths tuple read as the isotropic layout."""
    return network if isinstance(network, NetworkLayout) else NetworkLayout.isotropic(network)


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
    network: NetworkLayout | None = None

    def to_dict(self) -> dict:
        values = {**asdict(self), "patch": list(self.patch)}
        values["network"] = None if self.network is None else self.network.to_dict()
        return values


def parameter_count(network, classes: int, in_channels: int = 1,
                    deep_supervision=False) -> int:
    """Weights of :class:`~medhpc.ct.unet.UNet3D` of this layout (computed, no torch)."""
    layout = as_layout(network)

    def conv(cin, cout, kernel):
        return cin * cout * int(np.prod(kernel)) + cout

    widths, count, previous = layout.widths, 0, in_channels
    for w, k in zip(widths, layout.kernels):
        count += conv(previous, w, k) + conv(w, w, k) + 4 * w
        previous = w
    for i in range(len(widths) - 1, 0, -1):
        low, high, k = widths[i], widths[i - 1], layout.kernels[i - 1]
        count += (conv(low, high, layout.strides[i]) + conv(2 * high, high, k)
                  + conv(high, high, k) + 4 * high)
    supervised = widths[:-1] if deep_supervision else widths[:1]
    return count + sum(conv(w, classes, (1, 1, 1)) for w in supervised)


def estimate_bytes(network, classes: int, patch, batch: int, amp: bool, checkpointing: bool,
                   optimizer: str = "sgd") -> float:
    """Estimated peak training memory in bytes on one GPU."""
    layout = as_layout(network)
    voxels = float(np.prod(patch))
    per_sample = 6.0 * classes * voxels
    largest_block = 0.0
    for level, width in enumerate(layout.widths):
        level_voxels = voxels / layout.stage_reduction(level)
        decoder = level < layout.depth - 1
        if checkpointing:
            per_sample += width * level_voxels * (1 + (3 if decoder else 0))
            largest_block = max(largest_block, (7 if decoder else 4) * width * level_voxels)
        else:
            per_sample += width * level_voxels * (4 + (7 if decoder else 0))
    activation_bytes = (2.5 if amp else 4.0) * batch * (per_sample + largest_block)
    copies = 3 if optimizer == "sgd" else 4
    return activation_bytes + 4.0 * copies * parameter_count(layout, classes) + CONTEXT_BYTES


def _fits(layout, classes, patch, batch, amp, checkpointing, optimizer, budget_bytes):
    return estimate_bytes(layout, classes, patch, batch, amp, checkpointing,
                          optimizer) <= USABLE_FRACTION * budget_bytes


def _round_up(patch, divisor) -> list:
    return [int(d * np.ceil(p / d - 1e-9)) for p, d in zip(patch, divisor)]


def plan_training(widths, classes: int, case_shape, budget_gb: float, amp: bool | None,
                  checkpointing: bool | None, optimizer: str = "sgd", max_batch: int = 4,
                  max_patch: int = 256, spacing_zyx=None,
                  rule: WidthRule = GPU_WIDTHS) -> MemoryPlan:
    """Choose the network and the largest patch (then batch) that fit ``budget_gb``.

    The patch starts as ``max_patch^3`` voxels shared out in proportion to ``1 / spacing``
    (``spacing_zyx``, mm: the same length in mm on every axis, as nnU-Net v2 starts; 2.5 x
    0.8 x 0.8 mm voxels give 120 x 374 x 374), no longer than the median case shape. Each candidate
    gets its layout (:func:`network_layout`; ``widths`` None plans them by ``rule``) and is
    rounded up to the layout's divisor per axis; the axis spanning the most mm shrinks by
    3 % at a time until batch 2 fits. AMP is used unless ``amp`` is False; activation
    checkpointing is added (unless ``checkpointing`` is False) when the patch would
    otherwise fall below 96 of the finest voxels (in mm) on an axis that is longer.
    """
    budget = budget_gb * GIB
    use_amp = True if amp is None else amp
    spacing = np.ones(3) if spacing_zyx is None else np.asarray(spacing_zyx, np.float64)
    proportional = (1.0 / spacing) * (max_patch ** 3 * np.prod(spacing)) ** (1 / 3)
    start = [max(1, int(round(min(r, n)))) for r, n in zip(proportional, case_shape)]
    options = [False, True] if checkpointing is None else [checkpointing]
    for use_checkpointing in options:
        target = np.array(start, dtype=np.float64)
        while True:
            layout = network_layout(spacing, target, widths, rule)
            patch = _round_up(target, layout.divisor)
            fits = _fits(layout, classes, patch, MIN_BATCH, use_amp, use_checkpointing,
                         optimizer, budget)
            extents = np.where(target > 2 * MIN_FEATURE, target * spacing, 0.0)
            axis = int(np.argmax(extents))
            if fits or extents[axis] == 0.0:
                break
            target[axis] *= SHRINK_STEP
        # "small": an axis shorter than 96 of the finest voxels (in mm), where it was longer
        small = any(p * s < min(96 * spacing.min(), n * s)
                    for p, n, s in zip(patch, start, spacing))
        if fits and (not small or use_checkpointing or len(options) == 1):
            break
    batch = MIN_BATCH
    while batch < max_batch and _fits(layout, classes, patch, batch + 1, use_amp,
                                      use_checkpointing, optimizer, budget):
        batch += 1
    estimate = estimate_bytes(layout, classes, patch, batch, use_amp, use_checkpointing,
                              optimizer)
    return MemoryPlan(tuple(patch), batch, use_amp, use_checkpointing,
                      round(estimate / GIB, 3), budget_gb, bool(fits), "planned", layout)


def given_plan(network, classes: int, patch, batch: int, amp: bool, checkpointing: bool,
               budget_gb: float | None, optimizer: str = "sgd") -> MemoryPlan:
    """The estimate for a patch and batch set on the command line."""
    layout = as_layout(network)
    estimate = estimate_bytes(layout, classes, patch, batch, amp, checkpointing, optimizer)
    fits = True if budget_gb is None else estimate <= USABLE_FRACTION * budget_gb * GIB
    return MemoryPlan(tuple(patch), batch, amp, checkpointing, round(estimate / GIB, 3),
                      budget_gb, bool(fits), "given", layout)


def plan_lowres(fullres: MemoryPlan, classes: int, median_shape, spacing_zyx, budget_gb,
                optimizer: str = "sgd", widths=None, rule: WidthRule = GPU_WIDTHS,
                max_patch: int = 256) -> dict | None:
    """A coarser configuration when the full-resolution patch sees too little of a case.

    When ``fullres``'s patch covers less than :data:`LOWRES_COVERAGE` of the median case,
    the voxels grow by :data:`LOWRES_STEP` per step (the finer axes first, until they reach
    the coarsest) and the network is planned again, until its patch covers that fraction.
    Returns the spacing, median shape and plan, or None when no such configuration is needed
    or when it would keep more than :data:`LOWRES_MAX_VOXEL_FRACTION` of the voxels (too
    close to the full resolution to be worth a second network). This is nnU-Net's
    ``3d_lowres``; medhpc trains it as an ordinary dataset prepared at that spacing
    (``ct-prepare --spacing-mm``), without the cascade.
    """
    median_shape = np.asarray(median_shape, dtype=np.float64)
    spacing = np.asarray(spacing_zyx, dtype=np.float64)
    if np.prod(fullres.patch) >= LOWRES_COVERAGE * np.prod(median_shape):
        return None
    extent_mm = median_shape * spacing
    current = spacing.copy()
    for _ in range(400):
        finer = current < current.max() * (1 - 1e-9)
        current = np.where(finer, current * LOWRES_STEP, current) if finer.any() \
            else current * LOWRES_STEP
        shape = np.maximum(1, np.round(extent_mm / current))
        plan = plan_training(widths, classes, shape, budget_gb, fullres.amp,
                             fullres.checkpointing, optimizer, spacing_zyx=current,
                             max_patch=max_patch, rule=rule)
        if np.prod(plan.patch) >= LOWRES_COVERAGE * np.prod(shape):
            break
    if np.prod(shape) > LOWRES_MAX_VOXEL_FRACTION * np.prod(median_shape):
        return None
    spacing_xyz = [round(float(v), 4) for v in current[::-1]]
    return {"spacing_mm": spacing_xyz, "median_shape_zyx": [int(v) for v in shape],
            "plan": plan.to_dict(),
            "prepare": "ct-prepare --spacing-mm " + ",".join(f"{v:g}" for v in spacing_xyz)}
