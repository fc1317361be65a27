"""Dice + cross-entropy loss, and Dice as true/false positive/negative counts.

The soft Dice is computed per sample and class, then averaged, so a batch's loss
is the mean of its samples' losses: the gradient of a batch split over ranks,
averaged, is the gradient of the whole batch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def dice_ce_loss(logits, labels, smooth: float = 1e-5):
    """Mean over samples of (cross-entropy + 1 - mean soft Dice of the foreground classes
    present in the sample; no Dice term for a sample of background only).

    ``logits`` (B, C, z, y, x); ``labels`` (B, z, y, x) integer classes 0..C-1.
    """
    cross_entropy = F.cross_entropy(logits, labels, reduction="none").flatten(1).mean(1)
    probabilities = torch.softmax(logits, dim=1)
    onehot = F.one_hot(labels, logits.shape[1]).permute(0, 4, 1, 2, 3).to(probabilities.dtype)
    present = (onehot.sum((2, 3, 4)) > 0)[:, 1:].to(probabilities.dtype)
    mean_dice = mean_soft_dice(probabilities, onehot, smooth)
    return (cross_entropy + present.amax(1) * (1 - mean_dice)).mean()


def mean_soft_dice(probabilities, onehot, smooth: float = 1e-5):
    """Soft Dice per sample (B,), averaged over the foreground classes (1..C-1) present in
    the reference ``onehot``; both (B, C, z, y, x)."""
    axes = (2, 3, 4)
    intersection = (probabilities * onehot).sum(axes)
    denominator = probabilities.sum(axes) + onehot.sum(axes)
    dice = (2 * intersection + smooth) / (denominator + smooth)
    # classes absent from a sample's reference would only reward predicting nothing of them
    # (cross-entropy already does), so each sample averages Dice over the classes it holds
    present = (onehot.sum(axes) > 0)[:, 1:].to(dice.dtype)
    return (dice[:, 1:] * present).sum(1) / present.sum(1).clamp(min=1)


def deep_supervision_loss(outputs, labels):
    """Weighted loss over a deep-supervision pyramid (finest first, weights 1, 1/2, 1/4 ...,
    normalised to sum 1; every output takes part, so DDP sees every parameter used).

    Coarser outputs are compared with labels downsampled by nearest neighbour.
    """
    if not isinstance(outputs, (list, tuple)):
        return dice_ce_loss(outputs, labels)
    weights = np.array([0.5 ** i for i in range(len(outputs))])
    weights /= weights.sum()
    total = 0.0
    for weight, logits in zip(weights, outputs):
        target = labels
        if logits.shape[2:] != labels.shape[1:]:
            target = F.interpolate(labels[:, None].float(), size=logits.shape[2:],
                                   mode="nearest")[:, 0].long()
        total = total + float(weight) * dice_ce_loss(logits, target)
    return total


def confusion_counts(prediction: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, 3) array of TP, FP, FN voxel counts of classes 1..n_classes."""
    counts = np.zeros((n_classes, 3), dtype=np.float64)
    for c in range(1, n_classes + 1):
        predicted, truth = prediction == c, labels == c
        counts[c - 1] = (np.count_nonzero(predicted & truth), np.count_nonzero(predicted & ~truth),
                         np.count_nonzero(~predicted & truth))
    return counts


def dice_from_counts(counts: np.ndarray) -> np.ndarray:
    """Dice per class from summed TP/FP/FN counts (NaN where a class is absent everywhere)."""
    tp, fp, fn = counts[:, 0], counts[:, 1], counts[:, 2]
    denominator = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * tp / denominator, np.nan)
