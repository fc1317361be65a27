"""Doubtful sections, found from measured evidence, and what the reconstruction does with them.

Evidence per section (all measured at the working level while matching):

- tissue area and texture against the stack's median: *blank or damaged*
  (almost no tissue) sections leave the chain and get no warp of their own;
- tissue area against the median of its neighbours (``NEIGHBOURS`` on each
  side): *missing tissue*;
- the accepted fraction and median peak NCC of both of its pairs against the
  neighbouring pairs: *damaged* (tears, folds, bubbles make both pairs of one
  section worse than the pairs around them);
- the mean colour and the direction of the mean optical-density vector (the
  mix of stains) against the stack's robust spread: *stain differs*;
- at most ``min_accepted`` of the patches of both pairs accepted: *unmatched*;
- a compact piece of glass where both rigidly aligned neighbours have tissue
  (:func:`uncovered_tissue`, per pair; a piece wider than :data:`PIECE_OPENING_PX`
  and larger than the stack's robust spread): *missing tissue* (a piece fell off or
  a fold moved it).

Missing-tissue and damaged sections become *leaves*: they leave the chain (their
neighbours are matched directly, so an error in them is not passed on along the
trajectories) but are still warped, from the field of the neighbour towards the
reference section. Every doubtful section counts with :data:`DOUBTFUL_WEIGHT` in the
placement estimate and the smoothing; excluded sections count with 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

BLANK_TISSUE_RATIO = 0.25
BLANK_TEXTURE_RATIO = 0.2
MISSING_TISSUE_DROP = 0.06   # log-ratio below the neighbours' trend (about 6% less area)
MISSING_Z = 4.0
NEIGHBOURS = 3
MATCH_RATIO = 0.75
NCC_DROP = 0.08
STAIN_DISTANCE = 0.12
STAIN_ANGLE_DEG = 2.0
ROBUST_Z = 5.0
DOUBTFUL_WEIGHT = 0.2
STRAIN_MIN_PX = 1.0          # local distortion jump that is never a flag by itself (working px)
STRAIN_QUANTILE = 90.0
PIECE_BLOCK = 4              # uncovered-tissue maps are kept at 1/4 of the working level
PIECE_OPENING_PX = 6         # working px: narrower glass (outline differences) is ignored
PIECE_MIN_FRACTION = 0.015   # of the section's tissue, never a flag below this


@dataclass
class SectionFlags:
    """Reasons per flagged section and the roles that follow from them."""

    reasons: dict = field(default_factory=dict)   # {section: [reason, ...]}
    excluded: set = field(default_factory=set)    # out of the chain, no warp of their own
    leaves: set = field(default_factory=set)      # out of the chain, warped from a neighbour
    pieces: dict = field(default_factory=dict)    # {section: bool map of its missing piece}

    def weights(self, count: int) -> np.ndarray:
        """Weight of every section in the placement estimate and the smoothing (a section
        flagged only for a missing piece keeps 1: :meth:`point_weights` lowers the piece)."""
        weights = np.ones(count)
        for index, reasons in self.reasons.items():
            if index in self.pieces and len(reasons) == 1:
                continue
            weights[index] = DOUBTFUL_WEIGHT
        for index in self.excluded:
            weights[index] = 0.0
        return weights

    def point_weights(self, positions: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """(N, count): :meth:`weights` per section, and :data:`DOUBTFUL_WEIGHT` for the
        trajectories that lie in a section's missing piece (``positions`` (N, count, 2) in
        the sections' working pixels)."""
        weights = np.repeat(self.weights(positions.shape[1])[None, :], positions.shape[0], 0)
        for index, piece in self.pieces.items():
            cell = np.floor(positions[:, index] / PIECE_BLOCK).astype(np.int64)
            inside = valid[:, index] & np.all((cell >= 0) & (cell < piece.shape), axis=1)
            rows = np.flatnonzero(inside)
            hit = piece[cell[rows, 0], cell[rows, 1]]
            weights[rows[hit], index] = min(weights[0, index], DOUBTFUL_WEIGHT)
        return weights

    def chain(self, count: int) -> list[int]:
        return [i for i in range(count) if i not in self.excluded and i not in self.leaves]


def _robust_outliers(values: np.ndarray, floor: float) -> np.ndarray:
    median = np.median(values)
    spread = 1.4826 * np.median(np.abs(values - median))
    return values - median > max(floor, ROBUST_Z * spread)


def _expected_area(tissue: np.ndarray, blank: np.ndarray) -> np.ndarray:
    """Each section's tissue area as its neighbours predict it (a straight line through the
    :data:`NEIGHBOURS` non-blank sections on each side, the section itself left out); 0 where
    fewer than two neighbours are there."""
    count = len(tissue)
    expected = np.zeros(count)
    for i in range(count):
        around = [j for j in range(i - NEIGHBOURS, i + NEIGHBOURS + 1)
                  if 0 <= j < count and j != i and not blank[j]]
        if len(around) < 2:
            continue
        z = np.asarray(around, np.float64)
        if np.ptp(z) == 0:
            expected[i] = float(np.mean(tissue[around]))
            continue
        slope, intercept = np.polyfit(z, tissue[around], 1)
        expected[i] = float(slope * i + intercept)
    return expected


def pair_quality(pairs: dict) -> dict:
    """``{(a, b): (accepted fraction, median NCC of the accepted matches)}``."""
    quality = {}
    for key, result in pairs.items():
        accepted = result.matches.accepted
        ncc = float(np.median(result.matches.ncc[accepted])) if np.any(accepted) else 0.0
        quality[key] = (result.accepted_fraction, ncc)
    return quality


def flag_sections(count: int, statistics: dict, pairs: dict, min_accepted: float) -> SectionFlags:
    """Flag sections from the statistics of every section and the consecutive pairs' matches."""
    flags = SectionFlags(reasons={i: [] for i in range(count)})
    tissue = np.array([statistics[i]["tissue_fraction"] for i in range(count)])
    texture = np.array([statistics[i]["texture"] for i in range(count)])
    colour = np.array([statistics[i]["mean_colour"] for i in range(count)])
    blank = ((tissue < BLANK_TISSUE_RATIO * np.median(tissue))
             | (texture < BLANK_TEXTURE_RATIO * np.median(texture)))
    for i in np.flatnonzero(blank):
        flags.reasons[i].append("blank or damaged: little tissue or texture")
        flags.excluded.add(int(i))
    expected = _expected_area(tissue, blank)
    ratio = np.where(expected > 0, tissue / np.maximum(expected, 1e-12), 1.0)
    usable = ~blank & (expected > 0)
    if np.count_nonzero(usable) >= 5:
        deviation = np.log(np.maximum(ratio[usable], 1e-6))
        spread = 1.4826 * float(np.median(np.abs(deviation - np.median(deviation))))
        limit = np.exp(-max(MISSING_TISSUE_DROP, MISSING_Z * spread))
        for i in np.flatnonzero(usable & (ratio < limit)):
            flags.reasons[i].append(f"missing tissue: area {100 * ratio[i]:.0f}% of what its "
                                    "neighbours predict")
            flags.leaves.add(int(i))
    _flag_missing_pieces(flags, count, pairs, blank)
    _flag_stain(flags, statistics, colour, blank)
    _flag_matches(flags, count, pairs, min_accepted)
    flags.reasons = {i: r for i, r in flags.reasons.items() if r}
    return flags


def uncovered_tissue(mask: np.ndarray, other_mask: np.ndarray, to_other: np.ndarray) -> np.ndarray:
    """Where a section has glass but its rigidly aligned neighbour has tissue.

    ``to_other`` maps the section's working pixels into the neighbour's
    (``rigid.resample`` convention). The glass is opened by a disk of
    :data:`PIECE_OPENING_PX` (outline differences between neighbours are thin) and
    kept block-averaged by :data:`PIECE_BLOCK` (bool).
    """
    from scipy import ndimage

    from medhpc.tnr import rigid

    moved = rigid.resample(other_mask.astype(np.float32), to_other) > 0.5
    uncovered = moved & ~mask
    radius = PIECE_OPENING_PX
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    uncovered = ndimage.binary_opening(uncovered, structure=yy ** 2 + xx ** 2 <= radius ** 2)
    ny, nx = (n // PIECE_BLOCK for n in mask.shape)
    blocks = uncovered[:ny * PIECE_BLOCK, :nx * PIECE_BLOCK].reshape(ny, PIECE_BLOCK, nx,
                                                                      PIECE_BLOCK)
    return blocks.mean(axis=(1, 3)) > 0.5


def missing_pieces(count: int, pairs: dict, blank) -> tuple[np.ndarray, dict]:
    """Per section, the tissue fraction uncovered with respect to both neighbours (0 at the
    ends of the stack and where a pair holds no map), and those maps (dilated by one
    block)."""
    from scipy import ndimage

    fractions, pieces = np.zeros(count), {}
    for i in range(1, count - 1):
        before, after = pairs.get((i - 1, i)), pairs.get((i, i + 1))
        if blank[i] or blank[i - 1] or blank[i + 1] or before is None or after is None:
            continue
        maps = [getattr(before, "uncovered", {}).get(i), getattr(after, "uncovered", {}).get(i)]
        if any(m is None for m in maps) or maps[0].shape != maps[1].shape:
            continue
        tissue = float(after.sections[i]["tissue_fraction"]) * maps[0].size
        both = maps[0] & maps[1]
        fractions[i] = np.count_nonzero(both) / max(tissue, 1.0)
        pieces[i] = ndimage.binary_dilation(both)
    return fractions, pieces


def _flag_missing_pieces(flags: SectionFlags, count: int, pairs: dict, blank) -> None:
    fractions, pieces = missing_pieces(count, pairs, blank)
    inner = [i for i in range(1, count - 1) if not blank[i]]
    if len(inner) < 5:
        return
    values = fractions[inner]
    median = float(np.median(values))
    spread = 1.4826 * float(np.median(np.abs(values - median)))
    limit = median + max(PIECE_MIN_FRACTION, ROBUST_Z * spread)
    for i in inner:
        if fractions[i] > limit and i not in flags.leaves:
            flags.reasons[i].append(f"missing tissue: a piece of {100 * fractions[i]:.1f}% of "
                                    "its tissue is glass where both neighbours have tissue")
            flags.pieces[int(i)] = pieces[i]


def _flag_stain(flags: SectionFlags, statistics: dict, colour: np.ndarray, blank) -> None:
    count = len(colour)
    keep = ~np.asarray(blank)
    if np.count_nonzero(keep) < 3:
        return
    median_colour = np.median(colour[keep], axis=0)
    distance = np.sqrt(np.mean((colour - median_colour) ** 2, axis=1))
    directions = [statistics[i].get("od_direction") for i in range(count)]
    angle = np.zeros(count)
    if all(d is not None and len(d) == len(directions[0]) and len(d) > 1 for d in directions):
        vectors = np.array(directions, np.float64)
        median = np.median(vectors[keep], axis=0)
        median /= max(np.linalg.norm(median), 1e-12)
        angle = np.rad2deg(np.arccos(np.clip(vectors @ median, -1.0, 1.0)))
    odd_angle = np.zeros(count, bool)
    odd_angle[keep] = _robust_outliers(angle[keep], STAIN_ANGLE_DEG)
    for i in range(count):
        if not keep[i]:
            continue
        if distance[i] > STAIN_DISTANCE or odd_angle[i]:
            flags.reasons[i].append(f"stain differs from the stack (colour distance "
                                    f"{distance[i]:.2f}, stain direction {angle[i]:.1f} deg off)")


def _flag_matches(flags: SectionFlags, count: int, pairs: dict, min_accepted: float) -> None:
    quality = pair_quality(pairs)
    consecutive = [quality.get((i, i + 1)) for i in range(count - 1)]
    for i in range(count):
        if i in flags.excluded:
            continue
        sides = [consecutive[p] for p in (i - 1, i) if 0 <= p < count - 1 and consecutive[p]]
        if not sides:
            continue
        if max(s[0] for s in sides) < min_accepted:
            flags.reasons[i].append(f"unmatched: at most {100 * max(s[0] for s in sides):.0f}% "
                                    "of patches matched its neighbours; bridged")
            flags.excluded.add(i)
            flags.leaves.discard(i)
            continue
        others = [consecutive[p] for p in range(i - 1 - NEIGHBOURS, i + NEIGHBOURS + 1)
                  if 0 <= p < count - 1 and p not in (i - 1, i) and consecutive[p]]
        if len(sides) < 2 or len(others) < 2:
            continue
        fraction = float(np.median([o[0] for o in others]))
        ncc = float(np.median([o[1] for o in others]))
        few = all(s[0] < MATCH_RATIO * fraction for s in sides)
        weak = all(s[1] < ncc - NCC_DROP for s in sides)
        if few or weak:
            flags.reasons[i].append(
                f"damaged: its pairs matched {100 * min(s[0] for s in sides):.0f}-"
                f"{100 * max(s[0] for s in sides):.0f}% of patches (median NCC "
                f"{min(s[1] for s in sides):.2f}) where the pairs around it matched "
                f"{100 * fraction:.0f}% ({ncc:.2f})")
            flags.leaves.add(i)


def local_strain(frame: np.ndarray, target: np.ndarray, valid: np.ndarray, seeds: np.ndarray,
                 grid: float) -> np.ndarray:
    """Per section, how abruptly its own distortion changes across the tissue (working px).

    The distortion of section i at trajectory k is ``frame - target`` (what the
    smoothing removes). For every trajectory it is compared with the median of
    its neighbours' (seeds within 1.5 grid steps); a section's strain is the
    :data:`STRAIN_QUANTILE` percentile of that difference. Smooth warps, however
    large, give little strain; tears and folds give much.
    """
    n, count, _ = frame.shape
    distance = np.sqrt(((seeds[:, None, :] - seeds[None, :, :]) ** 2).sum(axis=2))
    neighbours = (distance <= 1.5 * grid + 0.5) & (distance > 0)
    strain = np.zeros(count)
    for i in range(count):
        residual = frame[:, i] - target[:, i]
        ok = valid[:, i] & np.all(np.isfinite(residual), axis=1)
        jumps = []
        for k in np.flatnonzero(ok):
            around = np.flatnonzero(neighbours[k] & ok)
            if around.size >= 2:
                jumps.append(np.hypot(*(residual[k] - np.median(residual[around], axis=0))))
        strain[i] = float(np.percentile(jumps, STRAIN_QUANTILE)) if jumps else 0.0
    return strain


def flag_strain(flags: SectionFlags, strain: np.ndarray) -> list[int]:
    """Flag sections whose strain stands out of the stack's ("damaged: tear or fold");
    returns the newly flagged sections."""
    candidates = [i for i in range(len(strain)) if i not in flags.excluded]
    if len(candidates) < 5:
        return []
    values = strain[candidates]
    median = float(np.median(values))
    spread = 1.4826 * float(np.median(np.abs(values - median)))
    limit = median + max(STRAIN_MIN_PX, ROBUST_Z * spread)
    new = []
    for i in candidates:
        if strain[i] > limit:
            flags.reasons.setdefault(i, []).append(
                f"damaged: tear or fold (local distortion jumps of {strain[i]:.1f} px where "
                f"the stack's median is {median:.1f} px)")
            new.append(i)
    return new
