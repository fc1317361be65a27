"""Pictures of a reconstruction: the three central planes and the convergence curve; with a
known truth (a phantom) the truth's planes, a line profile and the NEMA-style table too."""

from __future__ import annotations

import numpy as np

from medhpc.io.atomic import atomic_path


def truth_scale(image: np.ndarray, truth: np.ndarray) -> float:
    """The least-squares factor that brings the reconstruction to the truth's units."""
    denominator = float(np.sum(image.astype(np.float64) ** 2))
    return float(np.sum(image * truth, dtype=np.float64) / denominator) if denominator else 1.0


def compare_with_truth(image: np.ndarray, truth: np.ndarray, phantom: dict | None) -> dict:
    """NRMSE against the truth after :func:`truth_scale`, and the NEMA-style contrast
    recovery / background variability when the truth is the NEMA-like phantom."""
    volume = image[0] if image.ndim == 4 else image
    scale = truth_scale(volume, truth)
    result = {"scale_to_truth": scale,
              "nrmse": float(np.linalg.norm(scale * volume - truth) / np.linalg.norm(truth))}
    if phantom is not None:
        from medhpc.phantoms.pet import nema_analysis

        analysis = nema_analysis(volume, phantom)
        result["nema"] = {key: analysis[key] for key in
                          ("diameters_mm", "contrast_recovery", "background_variability")}
    return result


def recon_figure(image: np.ndarray, grid, log_likelihood, out_png, subsets: int = 1,
                 overwrite: bool = False, title: str = "", truth: np.ndarray | None = None,
                 comparison: dict | None = None, curves: np.ndarray | None = None) -> None:
    """Write a PNG: transaxial, coronal and sagittal central planes, and the
    log-likelihood per iteration (the sum over its subsets; first frame of a dynamic image).
    With ``truth``: a second row with the truth's planes and a profile along x through the
    centre of the transaxial plane, and the NEMA table of ``comparison`` when it has one.
    With ``curves`` (components x frames, NMF): the factors' time-activity curves."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    volume = image[0] if image.ndim == 4 else image
    history = log_likelihood[0] if log_likelihood and isinstance(log_likelihood[0], list) \
        else log_likelihood
    planes = _central_planes(volume, grid)
    rows = 1 if truth is None else 2
    nema = (comparison or {}).get("nema")
    extra = bool(nema) or curves is not None
    widths = [1, 1, 1, 1.2] + ([1.0] if extra else [])
    figure = Figure(figsize=(13 + 3 * extra, 3.6 * rows), layout="constrained")
    grid_axes = figure.subplots(rows, len(widths), gridspec_kw={"width_ratios": widths},
                                squeeze=False)
    if extra:
        grid_axes[0][4].set_axis_off()
        if curves is not None:
            _curves(grid_axes[0][4], curves)
        if nema:
            _nema_table(grid_axes[1][4], nema)
    axes = grid_axes[0]
    scale = 1.0 if truth is None else (comparison or {}).get("scale_to_truth", 1.0)
    top = float(np.percentile(volume * scale, 99.9)) or 1.0
    _show_planes(figure, axes[:3], planes, scale, top,
                 "activity (truth units)" if truth is not None else "activity (a.u.)")
    if truth is not None:
        _show_planes(figure, grid_axes[1][:3],
                     [(f"truth {label}", plane, aspect) for (label, plane, aspect) in
                      _central_planes(truth, grid)], 1.0, top, "activity (truth units)")
        _profile(grid_axes[1][3], volume * scale, truth, grid, comparison)
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


def _central_planes(volume, grid):
    nz, ny, nx = volume.shape
    spacing_x, spacing_y, spacing_z = grid.spacing_mm
    return [("transaxial z = %d" % (nz // 2), volume[nz // 2], spacing_x / spacing_y),
            ("coronal y = %d" % (ny // 2), volume[:, ny // 2, :], spacing_z / spacing_x),
            ("sagittal x = %d" % (nx // 2), volume[:, :, nx // 2], spacing_z / spacing_y)]


def _show_planes(figure, axes, planes, scale, top, label):
    for axis, (name, plane, aspect) in zip(axes, planes):
        shown = axis.imshow(plane * scale, cmap="gray_r", vmin=0, vmax=top, origin="lower",
                            aspect=aspect, interpolation="nearest")
        axis.set_title(name, fontsize=10)
        axis.set_xticks([])
        axis.set_yticks([])
    figure.colorbar(shown, ax=axes, shrink=0.8, label=label)


def _profile(axis, volume, truth, grid, comparison):
    """Line profile along x through the centre of the central transaxial plane, with the
    NEMA table below it when there is one."""
    nz, ny, nx = volume.shape
    x_mm = grid.origin_mm[0] + grid.spacing_mm[0] * np.arange(nx)
    axis.plot(x_mm, truth[nz // 2, ny // 2], color="0.3", lw=1.5, label="truth")
    axis.plot(x_mm, volume[nz // 2, ny // 2], color="C3", lw=1, label="reconstruction")
    axis.set_xlabel("x (mm)")
    axis.set_ylabel("activity")
    nrmse = (comparison or {}).get("nrmse")
    axis.set_title("profile y = %d, z = %d%s" % (ny // 2, nz // 2,
                   "" if nrmse is None else f"; NRMSE {nrmse:.3f}"), fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="upper right")


def _nema_table(axis, nema):
    """Contrast recovery and background variability per sphere (NEMA NU 2 style)."""
    axis.set_axis_off()
    cells = [[f"{d:.1f}", f"{c:.2f}", f"{100 * b:.1f}"] for d, c, b in
             zip(nema["diameters_mm"], nema["contrast_recovery"],
                 nema["background_variability"])]
    table = axis.table(cellText=cells, colLabels=["sphere mm", "CR", "BV %"], loc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1.0, 1.4)
    axis.set_title("NEMA-style CR and BV", fontsize=10)


def _curves(axis, curves):
    """The time-activity curves of the NMF factors (each factor's weight per frame)."""
    axis.set_axis_on()
    for index, curve in enumerate(np.asarray(curves)):
        axis.plot(np.arange(1, len(curve) + 1), curve, marker="o", lw=1,
                  label=f"factor {index + 1}")
    axis.set_xlabel("frame")
    axis.set_ylabel("weight")
    axis.set_title("time-activity curves", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
