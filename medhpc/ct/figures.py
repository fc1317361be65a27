"""Training curves of ct-train (``--png``)."""

from __future__ import annotations

from medhpc.io.atomic import atomic_path


def plot_training_curves(path, history: list[dict], classes) -> None:
    """Loss and per-organ validation Dice per epoch, side by side, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(epochs, [r["loss"] for r in history], marker="o")
    left.set(xlabel="epoch", ylabel="training loss (Dice + CE)")
    for name in classes:
        values = [r["dice"].get(name) for r in history]
        right.plot(epochs, [float("nan") if v is None else v for v in values], marker="o",
                   label=name)
    right.set(xlabel="epoch", ylabel="validation Dice", ylim=(0, 1))
    right.legend(loc="lower right")
    figure.tight_layout()
    with atomic_path(path, overwrite=True) as tmp:
        figure.savefig(tmp, dpi=100, format="png")
    plt.close(figure)


def plot_sweep_curves(path, folder, records: list[dict]) -> None:
    """One curve per finished configuration of a sweep: mean validation Dice per epoch
    (the training loss when there is no validation), read from each ``log.json``."""
    import json
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    quantity = "loss"
    for record in records:
        log = Path(folder) / record["name"] / "log.json"
        if record["status"] != "ok" or not log.exists():
            continue
        history = json.loads(log.read_text()).get("epochs_run", [])
        means = [[v for v in r["dice"].values() if v is not None] for r in history]
        if all(means):
            quantity = "mean validation Dice"
            values = [sum(m) / len(m) for m in means]
        else:
            values = [r["loss"] for r in history]
        axes.plot([r["epoch"] for r in history], values, marker="o", label=record["name"])
    axes.set(xlabel="epoch", ylabel=quantity)
    axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    with atomic_path(path, overwrite=True) as tmp:
        figure.savefig(tmp, dpi=100, format="png")
    plt.close(figure)


#: The soft-tissue window the overlays show CT in (HU).
OVERLAY_WINDOW_HU = (-160.0, 240.0)


def plot_segmentation_overlay(path, image_hu, labels, classes, spacing_zyx,
                              reference=None) -> None:
    """Axial, coronal and sagittal slices through the segmented organs' centre, CT in a
    soft-tissue window with each class in its colour; a second row shows the reference
    labels when given. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    foreground = np.argwhere(labels > 0)
    centre = foreground.mean(axis=0).round().astype(int) if len(foreground) else \
        np.array(labels.shape) // 2
    colours = plt.get_cmap("tab10")(np.arange(len(classes)) % 10)
    colour_map = ListedColormap(np.vstack([[0, 0, 0, 0], colours]))
    dz, dy, dx = spacing_zyx
    views = [("axial", lambda a: a[centre[0]], dy / dx),
             ("coronal", lambda a: a[:, centre[1]][::-1], dz / dx),
             ("sagittal", lambda a: a[:, :, centre[2]][::-1], dz / dy)]
    rows = [("segmentation", labels)] + ([("reference", reference)] if reference is not None
                                        else [])
    figure, axes = plt.subplots(len(rows), 3, figsize=(10, 3.6 * len(rows)), squeeze=False)
    for row, (title, label_map) in enumerate(rows):
        for column, (name, take, aspect) in enumerate(views):
            axis = axes[row, column]
            axis.imshow(take(image_hu), cmap="gray", vmin=OVERLAY_WINDOW_HU[0],
                        vmax=OVERLAY_WINDOW_HU[1], aspect=aspect, interpolation="nearest")
            masked = np.ma.masked_equal(take(label_map), 0)
            axis.imshow(masked, cmap=colour_map, vmin=0, vmax=len(classes), alpha=0.45,
                        aspect=aspect, interpolation="nearest")
            axis.set_title(f"{title}, {name}", fontsize=9)
            axis.axis("off")
    figure.legend(handles=[Patch(color=colours[i], label=c) for i, c in enumerate(classes)],
                  loc="lower center", ncol=len(classes), fontsize=8)
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    with atomic_path(path, overwrite=True) as tmp:
        figure.savefig(tmp, dpi=90, format="png")
    plt.close(figure)
