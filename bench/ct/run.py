"""CT benchmark: ct-train throughput at 1 and 2 ranks against a plain PyTorch loop, and
ct-segment time per 256^3 volume on the CPU.

One command: ``python bench/ct/run.py``. Writes ``bench/results/ct-<date>.json`` and prints
Markdown tables for ``docs/performance.md``.

1. Training throughput in patches/s (global) of ``medhpc ct-train`` on phantoms at 1 and
   2 ranks (one thread per rank, gloo), with and without augmentation, against a plain
   single-process PyTorch loop of the same network, loss, optimizer, patch and batch on
   crops of the same volumes, in the same run. Each figure is the median over ``--repeats``
   runs of the mean throughput of the epochs after the first (warm-up and compilation).
   Distributed overhead at 1 rank = 1 - ct-train / plain; scaling efficiency at 2 ranks
   = throughput(2) / (2 x throughput(1)).
2. ct-segment on one 256^3 phantom volume (sliding windows with Gaussian blending, half
   overlap): wall time of the inference stage, median over ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from bench.machine import machine as bench_machine  # noqa: E402
WIDTHS = "4,8,16"
PATCH = 48
BATCH = 2


def machine() -> dict:
    """CPU, cores, load and the versions this benchmark depends on."""
    return bench_machine(("medhpc", "torch", "numpy", "numba", "mpi4py", "mpich", "h5py"))


def medhpc(*args, ranks=None, env=None):
    command = [sys.executable, "-m", "medhpc", *map(str, args)]
    if ranks is not None:
        command = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks), *command]
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return done


def train_throughput(dataset: Path, folder: Path, ranks: int, augment: bool, steps: int,
                     epochs: int, tag: str) -> float:
    out = folder / f"run-{tag}"
    options = ["--widths", WIDTHS, "--patch", PATCH, "--batch", BATCH, "--epochs", epochs,
               "--steps", steps, "--folds", "1", "--threads", "1", "--device", "cpu",
               "--overwrite", "--quiet"]
    if not augment:
        options.append("--no-augment")
    medhpc("ct-train", "--data", dataset, "--out", out, *options, ranks=ranks)
    history = json.loads((out / "log.json").read_text())["epochs_run"]
    return statistics.mean(r["patches_per_s"] for r in history[1:])


PLAIN_LOOP = r"""
import json, sys, time
import numpy as np
import torch
import torch.nn.functional as F
from medhpc.ct.dataset import CtDataset
from medhpc.ct.loss import dice_ce_loss
from medhpc.ct.unet import UNet3D, UNetConfig

torch.set_num_threads(1)
path, widths, patch, batch, steps, epochs = sys.argv[1:7]
patch, batch, steps, epochs = int(patch), int(batch), int(steps), int(epochs)
dataset = CtDataset(path)
stats = dataset.intensity
volumes = []
for name in dataset.names:
    image, labels, _ = dataset.read(name)
    image = (np.clip(image, stats["low"], stats["high"]) - stats["mean"]) / stats["std"]
    volumes.append((image.astype(np.float32), labels.astype(np.int64)))
torch.manual_seed(0)
model = UNet3D(UNetConfig(classes=dataset.n_classes + 1,
                          widths=tuple(int(w) for w in widths.split(","))))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.99, nesterov=True,
                            weight_decay=3e-5)
rng = np.random.default_rng(0)
rates = []
for epoch in range(epochs):
    start = time.perf_counter()
    for step in range(steps):
        images, targets = [], []
        for _ in range(batch):
            image, labels = volumes[rng.integers(len(volumes))]
            corner = [rng.integers(0, n - patch + 1) for n in image.shape]
            window = tuple(slice(c, c + patch) for c in corner)
            images.append(image[window])
            targets.append(labels[window])
        x = torch.from_numpy(np.stack(images)[:, None])
        y = torch.from_numpy(np.stack(targets))
        optimizer.zero_grad(set_to_none=True)
        loss = dice_ce_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
        optimizer.step()
    rates.append(steps * batch / (time.perf_counter() - start))
print(json.dumps(sum(rates[1:]) / len(rates[1:])))
"""


def plain_throughput(dataset: Path, steps: int, epochs: int) -> float:
    done = subprocess.run([sys.executable, "-c", PLAIN_LOOP, str(dataset), WIDTHS, str(PATCH),
                           str(BATCH), str(steps), str(epochs)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return float(done.stdout.strip().splitlines()[-1])


def inference_time(folder: Path, model: Path, repeats: int, threads: int) -> float:
    from medhpc.phantoms.ct import write_ct_phantom

    big = folder / "big"
    if not big.exists():
        write_ct_phantom(big, 1, (256, 256, 256), seed=1)
    times = []
    for repeat in range(repeats):
        timings = folder / f"segment-{repeat}.json"
        medhpc("ct-segment", "--model", model, "--images", big / "images", "--out",
               folder / "segmented", "--threads", threads, "--device", "cpu", "--overwrite",
               "--timings", timings, "--quiet")
        stages = json.loads(timings.read_text())["stages"]
        times.append(sum(s["max"] for s in stages if s["name"] == "inference"))
    return statistics.median(times)


def markdown(results: dict) -> str:
    lines = ["| configuration | patches/s | vs plain PyTorch loop |", "| --- | --- | --- |"]
    plain = results["plain_patches_per_s"]
    lines.append(f"| plain PyTorch loop, 1 process | {plain:.2f} | 1.00 |")
    for row in results["train"]:
        lines.append(f"| ct-train {row['ranks']} rank(s), augmentation "
                     f"{'on' if row['augment'] else 'off'} | {row['patches_per_s']:.2f} | "
                     f"{row['patches_per_s'] / plain:.2f} |")
    lines.append("")
    lines.append(f"- distributed overhead at 1 rank (no augmentation): "
                 f"{100 * results['overhead_1_rank']:.1f}%")
    lines.append(f"- scaling efficiency at 2 ranks (no augmentation): "
                 f"{100 * results['scaling_efficiency_2_ranks']:.0f}%")
    if results.get("inference_256_s") is not None:
        lines.append(f"- ct-segment inference per 256^3 volume, CPU, {results['inference_threads']} "
                     f"thread(s): {results['inference_256_s']:.1f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12, help="Steps per epoch.")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--inference-repeats", type=int, default=1)
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from medhpc.phantoms.ct import write_ct_phantom

    results = {"machine": machine(), "repeats": args.repeats, "steps": args.steps,
               "epochs": args.epochs, "network_widths": WIDTHS, "patch": PATCH,
               "batch_per_rank": BATCH, "train": []}
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        write_ct_phantom(folder / "phantoms", 8, (64, 96, 96), seed=0)
        dataset = folder / "data.h5"
        medhpc("ct-prepare", "--images", folder / "phantoms" / "images", "--labels",
               folder / "phantoms" / "labels", "--out", dataset, "--clip-hu", "-200,500",
               "--quiet")
        plain = []
        measured = {(r, a): [] for r in (1, 2) for a in (False, True)}
        for repeat in range(args.repeats):  # interleaved, so load drifts hit every column
            plain.append(plain_throughput(dataset, args.steps, args.epochs))
            for (ranks, augment), values in measured.items():
                values.append(train_throughput(dataset, folder, ranks, augment, args.steps,
                                               args.epochs, f"{ranks}-{augment}"))
        results["plain_patches_per_s"] = statistics.median(plain)
        results["plain_runs"] = plain
        for (ranks, augment), values in measured.items():
            results["train"].append({"ranks": ranks, "augment": augment,
                                     "patches_per_s": statistics.median(values), "runs": values})
        by_key = {(r["ranks"], r["augment"]): r["patches_per_s"] for r in results["train"]}
        results["overhead_1_rank"] = 1 - by_key[(1, False)] / results["plain_patches_per_s"]
        results["scaling_efficiency_2_ranks"] = by_key[(2, False)] / (2 * by_key[(1, False)])
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ct-training-latest.json").write_text(json.dumps(results, indent=2))
        if not args.skip_inference:
            threads = os.cpu_count()
            results["inference_threads"] = threads
            results["inference_256_s"] = inference_time(
                folder, folder / "run-1-False" / "model.pt", args.inference_repeats, threads)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"ct-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    print(markdown(results))
    print(f"\nresults: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
