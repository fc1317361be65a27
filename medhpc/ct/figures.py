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
