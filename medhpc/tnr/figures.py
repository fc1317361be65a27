"""The QC picture of tnr-register: orthogonal views before and after, and trajectories."""

from __future__ import annotations

import numpy as np

from medhpc.io.atomic import atomic_path


def qc_figure(path, views_per_rank: list, record: dict, settings, overwrite: bool) -> None:
    """Write the picture: the centre section after registration; the central x-z and y-z
    cuts through the stack before and after; observed and target trajectories (x over z).

    ``views_per_rank`` is the gathered list of ``{section: views}`` dicts.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    views = {}
    for part in views_per_rank:
        views.update(part)
    order = sorted(views)
    stack = {key: np.stack([views[i][key] for i in order])
             for key in ("before_row", "after_row", "before_column", "after_column")}
    figure, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    centre = order[len(order) // 2]
    axes[0, 0].imshow(views[centre]["after_plane"], cmap="gray")
    axes[0, 0].set_title(f"section {centre} after")
    cuts = (("before_row", "x-z cut before"), ("after_row", "x-z cut after"),
            ("before_column", "y-z cut before"), ("after_column", "y-z cut after"))
    for axis, (key, title) in zip((axes[0, 1], axes[0, 2], axes[1, 0], axes[1, 1]), cuts):
        axis.imshow(stack[key], cmap="gray", aspect="auto", interpolation="nearest")
        axis.set_title(title)
        axis.set_ylabel("section")
    axis = axes[1, 2]
    if "observed" in record:
        observed, target = record["observed"], record["target"]
        z = np.arange(observed.shape[1])
        chosen = np.linspace(0, observed.shape[0] - 1, min(12, observed.shape[0])).astype(int)
        for k in chosen:
            line, = axis.plot(observed[k, :, 1], z, lw=0.8, alpha=0.6)
            axis.plot(target[k, :, 1], z, lw=1.6, color=line.get_color())
        axis.invert_yaxis()
        axis.set_xlabel("x (working px): thin observed, thick target")
        axis.set_ylabel("section")
        axis.set_title(f"trajectories ({settings.mode}, sigma {settings.sigma:g})")
    else:
        axis.set_axis_off()
        axis.set_title("mode none: rigid chain only")
    for a in axes.flat[:5]:
        a.tick_params(labelsize=7)
    figure.tight_layout()
    with atomic_path(path, overwrite=overwrite) as tmp:
        figure.savefig(tmp, dpi=90, format="png")
    plt.close(figure)
