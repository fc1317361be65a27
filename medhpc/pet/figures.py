"""Pictures of a reconstruction: the three central planes and the convergence curve."""

from __future__ import annotations

import numpy as np

from medhpc.io.atomic import atomic_path


def recon_figure(image: np.ndarray, grid, log_likelihood, out_png, subsets: int = 1,
                 overwrite: bool = False, title: str = "") -> None:
    """Write a PNG: transaxial, coronal and sagittal central planes, and the
    log-likelihood per iteration (the sum over its subsets; first frame of a dynamic image)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    volume = image[0] if image.ndim == 4 else image
    history = log_likelihood[0] if log_likelihood and isinstance(log_likelihood[0], list) \
        else log_likelihood
    nz, ny, nx = volume.shape
    spacing_x, spacing_y, spacing_z = grid.spacing_mm
    planes = [
        ("transaxial z = %d" % (nz // 2), volume[nz // 2], spacing_x / spacing_y),
        ("coronal y = %d" % (ny // 2), volume[:, ny // 2, :], spacing_z / spacing_x),
        ("sagittal x = %d" % (nx // 2), volume[:, :, nx // 2], spacing_z / spacing_y),
    ]
    figure = Figure(figsize=(13, 3.6), layout="constrained")
    axes = figure.subplots(1, 4, gridspec_kw={"width_ratios": [1, 1, 1, 1.2]})
    top = float(np.percentile(volume, 99.9)) or 1.0
    for axis, (label, plane, aspect) in zip(axes[:3], planes):
        shown = axis.imshow(plane, cmap="gray_r", vmin=0, vmax=top, origin="lower",
                            aspect=aspect, interpolation="nearest")
        axis.set_title(label, fontsize=10)
        axis.set_xticks([])
        axis.set_yticks([])
    figure.colorbar(shown, ax=axes[:3], shrink=0.8, label="activity (a.u.)")
    per_iteration = np.asarray(history, dtype=np.float64)
    per_iteration = per_iteration[: len(per_iteration) // subsets * subsets]
    per_iteration = per_iteration.reshape(-1, subsets).sum(axis=1)
    if per_iteration.size:
        axes[3].plot(np.arange(1, per_iteration.size + 1), per_iteration, marker="o", lw=1)
    axes[3].set_xlabel("iteration")
    axes[3].set_ylabel("Poisson log-likelihood (sum over subsets)")
    axes[3].set_title("convergence", fontsize=10)
    axes[3].grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    with atomic_path(out_png, overwrite=overwrite) as tmp:
        figure.savefig(tmp, dpi=100, format="png")
