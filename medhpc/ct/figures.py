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
