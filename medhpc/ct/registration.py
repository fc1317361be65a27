"""Unsupervised deformable registration of CT volumes by a network (ct-train --task registration).

A U-Net (:mod:`medhpc.ct.unet`, two input channels: moving and fixed) predicts a stationary
velocity field ``v`` in voxels (components z, y, x) on the fixed grid; scaling and squaring
integrates it into the displacement of the diffeomorphism ``exp(v)``: ``u = v / 2^K``, then
``K`` times ``u <- u + u o (id + u)``. The fixed voxel ``y`` corresponds to the moving voxel
``y + u(y)`` (lddmm's forward displacement, :mod:`medhpc.lddmm.transform`); ``exp(-v)`` is
the inverse. The loss is ``1 - local NCC`` (squared, 9-voxel windows) of the fixed image and
the warped moving image, plus ``smoothness`` times the diffusion energy (mean squared forward
differences) of ``u``, plus ``label_weight`` times ``1 - soft Dice`` of the warped moving
labels and the fixed labels when labels exist. Every term is a mean over each sample, then
over the batch, so a batch split over ranks averages to the whole batch's gradient.

Training pairs come from :class:`PairSampler`: global batch slot ``s`` at ``step`` draws an
ordered pair of different training cases and one patch window (with the same augmentation
for both images), a pure function of ``(seed, step, s)`` like the segmentation patches.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from medhpc.ct.augment import draw_transform, extract_patch
from medhpc.ct.loss import mean_soft_dice
from medhpc.ct.sampler import slot_cases, uniform_centre

INTEGRATION_STEPS = 7
NCC_WINDOW = 9
HEAD_INIT_STD = 1e-2  # the velocity head starts small: near the identity map


def voxel_grid(shape, like: torch.Tensor) -> torch.Tensor:
    """Voxel positions ``(3, z, y, x)`` of a grid of ``shape``."""
    axes = [torch.arange(n, device=like.device, dtype=like.dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def sample_at(volume: torch.Tensor, displacement: torch.Tensor, mode: str = "bilinear"):
    """``volume`` (B, C, z, y, x) at the voxels ``y + displacement(y)`` (B, 3, z, y, x),
    trilinear (or nearest), positions beyond the volume clamped to its border."""
    shape = volume.shape[2:]
    points = voxel_grid(displacement.shape[2:], displacement)[None] + displacement
    scale = [2.0 / (n - 1) if n > 1 else 0.0 for n in shape]
    normalised = torch.stack([points[:, axis] * scale[axis] - 1 for axis in (2, 1, 0)], dim=-1)
    return F.grid_sample(volume, normalised, mode=mode, padding_mode="border",
                         align_corners=True)


def integrate_velocity(velocity: torch.Tensor, steps: int = INTEGRATION_STEPS) -> torch.Tensor:
    """Displacement of ``exp(velocity)`` by scaling and squaring (``steps`` squarings)."""
    displacement = velocity / (2 ** steps)
    for _ in range(steps):
        displacement = displacement + sample_at(displacement, displacement)
    return displacement


def local_ncc(fixed: torch.Tensor, warped: torch.Tensor, window: int = NCC_WINDOW,
              eps: float = 1e-5) -> torch.Tensor:
    """Mean squared local normalised cross-correlation per sample (B,), windows of ``window``
    voxels on each axis (shortened at the borders, and on axes shorter than the window)."""
    kernel = tuple(min(window, n if n % 2 else n - 1) for n in fixed.shape[2:])
    padding = tuple(k // 2 for k in kernel)

    def mean(x):
        return F.avg_pool3d(x, kernel, stride=1, padding=padding, count_include_pad=False)

    mf, mw = mean(fixed), mean(warped)
    cross = mean(fixed * warped) - mf * mw
    var_f = (mean(fixed * fixed) - mf * mf).clamp(min=0)
    var_w = (mean(warped * warped) - mw * mw).clamp(min=0)
    return (cross * cross / (var_f * var_w + eps)).flatten(1).mean(1)


def diffusion_energy(displacement: torch.Tensor) -> torch.Tensor:
    """Mean squared forward difference of the displacement per sample (B,)."""
    total = 0.0
    for axis in (2, 3, 4):
        difference = torch.diff(displacement, dim=axis)
        total = total + (difference * difference).flatten(1).mean(1)
    return total


def one_hot(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """(B, z, y, x) integer labels as (B, classes, z, y, x) float."""
    return F.one_hot(labels.long(), classes).permute(0, 4, 1, 2, 3).float()


def registration_loss(network, moving, fixed, moving_labels=None, fixed_labels=None,
                      classes: int = 0, smoothness: float = 1.0, label_weight: float = 1.0):
    """The training loss of a batch and its terms (for the log).

    ``moving``, ``fixed``: (B, 1, z, y, x) normalised images; labels (B, z, y, x) or None.
    """
    velocity = network(torch.cat([moving, fixed], dim=1)).float()
    displacement = integrate_velocity(velocity)
    warped = sample_at(moving.float(), displacement)
    similarity = local_ncc(fixed.float(), warped)
    smooth = diffusion_energy(displacement)
    loss = (1 - similarity) + smoothness * smooth
    if moving_labels is not None and label_weight > 0:
        warped_labels = sample_at(one_hot(moving_labels, classes), displacement)
        dice = mean_soft_dice(warped_labels, one_hot(fixed_labels, classes))
        loss = loss + label_weight * (1 - dice)
    return loss.mean()


def initialise_velocity_head(model) -> None:
    """Small weights of the output convolution, so training starts near the identity."""
    with torch.no_grad():
        for head in model.heads:
            head.weight.normal_(0.0, HEAD_INIT_STD)
            head.bias.zero_()


def pad_to_divisor(image: np.ndarray, divisor, fill: float) -> tuple[np.ndarray, tuple]:
    """``image`` padded at the far end of each axis to a multiple of ``divisor``; the pad."""
    pad = tuple((-n) % d for n, d in zip(image.shape, divisor))
    if not any(pad):
        return image, pad
    return np.pad(image, [(0, p) for p in pad], constant_values=fill), pad


@torch.no_grad()
def predict_velocity(model, moving: np.ndarray, fixed: np.ndarray, divisor, fill: float,
                     device) -> np.ndarray:
    """The velocity field (3, z, y, x) float32 of a whole-volume pair on the fixed grid
    (``moving`` already resampled there, both normalised)."""
    shape = fixed.shape
    padded = [pad_to_divisor(np.asarray(a, np.float32), divisor, fill)[0] for a in (moving, fixed)]
    x = torch.from_numpy(np.stack(padded)[None]).to(device)
    velocity = model(x).float()[0, :, :shape[0], :shape[1], :shape[2]]
    return velocity.contiguous().cpu().numpy()


@torch.no_grad()
def exponential(velocity: np.ndarray, device="cpu") -> np.ndarray:
    """The displacement (3, z, y, x) float32 of ``exp(velocity)`` (:func:`integrate_velocity`)."""
    field = torch.from_numpy(np.ascontiguousarray(velocity, np.float32))[None].to(device)
    return integrate_velocity(field)[0].cpu().numpy()


def predict_displacements(model, moving: np.ndarray, fixed: np.ndarray, divisor, fill: float,
                          device, inverse: bool = True):
    """Forward (and inverse: ``exp(-v)``) displacement of a pair on the fixed grid."""
    velocity = predict_velocity(model, moving, fixed, divisor, fill, device)
    return (exponential(velocity, device),
            exponential(-velocity, device) if inverse else None)


REFINE_LEARNING_RATE = 0.1  # voxels per Adam step


def refine_velocity(velocity: np.ndarray, moving: np.ndarray, fixed: np.ndarray,
                    iterations: int, smoothness: float, device="cpu") -> np.ndarray:
    """The network's velocity refined for one pair: ``iterations`` Adam steps on ``v`` of
    ``1 - local NCC + smoothness * diffusion`` (the training loss without labels), on the
    grid of ``fixed`` (``moving`` resampled there, both normalised)."""
    field = torch.from_numpy(np.ascontiguousarray(velocity, np.float32))[None].to(device)
    field.requires_grad_(True)
    moving_t = torch.from_numpy(np.ascontiguousarray(moving, np.float32))[None, None].to(device)
    fixed_t = torch.from_numpy(np.ascontiguousarray(fixed, np.float32))[None, None].to(device)
    optimizer = torch.optim.Adam([field], lr=REFINE_LEARNING_RATE)
    for _ in range(iterations):
        optimizer.zero_grad(set_to_none=True)
        displacement = integrate_velocity(field)
        loss = (1 - local_ncc(fixed_t, sample_at(moving_t, displacement))
                + smoothness * diffusion_energy(displacement)).mean()
        loss.backward()
        optimizer.step()
    return field.detach()[0].cpu().numpy()


def warp_numpy(volume: np.ndarray, displacement: np.ndarray, labels: bool = False) -> np.ndarray:
    """A volume on the fixed grid warped by a displacement (trilinear, nearest for labels)."""
    tensor = torch.from_numpy(np.asarray(volume, np.float32))[None, None]
    field = torch.from_numpy(np.asarray(displacement, np.float32))[None]
    warped = sample_at(tensor, field, mode="nearest" if labels else "bilinear")[0, 0].numpy()
    return warped.astype(np.uint8) if labels else warped


def folding_fraction(displacement: np.ndarray) -> float:
    """Fraction of voxels where ``det(I + Du) <= 0`` (central differences)."""
    return float(np.mean(jacobian_determinant(displacement) <= 0))


def jacobian_determinant(displacement: np.ndarray) -> np.ndarray:
    """``det(I + Du)`` on the grid (lddmm's kernel, one slab of every plane)."""
    from medhpc.lddmm import kernels_cpu

    u = np.ascontiguousarray(displacement, np.float32)
    out = np.empty(u.shape[1:], np.float32)
    kernels_cpu.jacobian_determinant(u, 0, 0, u.shape[1], out)
    return out


class PairSampler:
    """Draws the (moving, fixed) patch pairs of the global batch slots this rank fills.

    Slot ``s`` draws from its block of the ``n (n - 1)`` ordered pairs of different training
    cases (:func:`medhpc.ct.sampler.slot_cases` over pairs); a patch window is centred
    uniformly at random and both images read it through the same augmentation.
    """

    def __init__(self, cases: dict, n_training_cases: int, global_batch: int, slots,
                 patch_shape, seed: int, kernels, augment):
        if n_training_cases < 2:
            raise ValueError("registration pairs need at least two training cases")
        self.cases = cases
        self.pairs = [(m, f) for m in range(n_training_cases) for f in range(n_training_cases)
                      if m != f]
        self.global_batch = global_batch
        self.slots = list(slots)
        self.patch_shape = tuple(patch_shape)
        self.seed = seed
        self.kernels = kernels
        self.augment = augment

    def slot_pairs(self, slot: int) -> range:
        return slot_cases(len(self.pairs), self.global_batch, slot)

    def needed_cases(self) -> list[int]:
        return sorted({case for s in self.slots for p in self.slot_pairs(s)
                       for case in self.pairs[p]})

    def patch(self, step: int, slot: int):
        """(moving image, fixed image, moving labels, fixed labels) of ``slot`` at ``step``."""
        rng = np.random.default_rng([self.seed, step, slot])
        choices = self.slot_pairs(slot)
        moving_index, fixed_index = self.pairs[choices[rng.integers(len(choices))]]
        moving, fixed = self.cases[moving_index], self.cases[fixed_index]
        centre = uniform_centre(rng, self.patch_shape, fixed.image.shape)
        transform = draw_transform(rng, centre, self.patch_shape, self.augment)
        m_image, m_labels = extract_patch(self.kernels, moving.image, moving.labels, transform,
                                          self.patch_shape, moving.fill, rng)
        f_image, f_labels = extract_patch(self.kernels, fixed.image, fixed.labels, transform,
                                          self.patch_shape, fixed.fill, rng)
        return m_image, f_image, m_labels, f_labels

    def batch(self, step: int):
        """This rank's pairs at ``step``: moving and fixed images (B, 1, z, y, x) float32,
        moving and fixed labels (B, z, y, x) int64, or None without labels."""
        draws = [self.patch(step, slot) for slot in self.slots]
        images = [np.stack([d[i] for d in draws])[:, None] for i in (0, 1)]
        if any(d[2] is None for d in draws):
            return images[0], images[1], None, None
        labels = [np.stack([d[i] for d in draws]).astype(np.int64) for i in (2, 3)]
        return images[0], images[1], labels[0], labels[1]
