"""ct-train: data-parallel 3-D U-Net training over MPI ranks.

One epoch is ``steps`` optimisation steps on a global batch of
``batch * ranks`` patches (:mod:`medhpc.ct.sampler`), each step averaging the
gradients over the ranks (DDP, or one flat MPI all-reduce), then validation:
sliding-window segmentation of the held-out fold's cases, spread over the ranks,
with Dice from TP/FP/FN counts summed over the ranks. After every epoch, and on
SIGTERM/SIGUSR1 after the current step, the state (model, optimizer, LR
schedule position, epoch, step, sampler, RNG, log so far) is written atomically;
``--resume`` continues to the same parameters as a run never stopped.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch

from medhpc import backend
from medhpc.ct import distributed
from medhpc.ct.augment import AugmentSettings
from medhpc.ct.dataset import CtDataset, intensity_fill, normalised_hu
from medhpc.ct.planner import (CPU_WIDTHS, GPU_WIDTHS, given_plan, network_layout,
                                plan_lowres, plan_training)
from medhpc.ct.sampler import TrainingCase, rank_slots
from medhpc.ct.settings import GRAD_SYNCS, OPTIMIZERS, TrainSettings
from medhpc.ct.tasks import task_for
from medhpc.ct.unet import UNet3D, UNetConfig
from medhpc.errors import InputError
from medhpc.io.atomic import atomic_path, publish_together
from medhpc.parallel.geometry import block_range
from medhpc.runtime.checkpoint import (CheckpointStop, StopSignals, plain_data,
                                      read_torch_checkpoint,
                                      write_torch_checkpoint)
from medhpc.runtime.runlog import write_run_log

# A test hook: the rank sends itself SIGTERM after this global step (exercises the stop path).
STOP_AFTER_STEP_VARIABLE = "MEDHPC_CT_SIGTERM_AFTER_STEP"
CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "model.pt"
POLY_EXPONENT = 0.9


def split_folds(names: list[str], folds: int, fold: int) -> tuple[list[str], list[str]]:
    """Training and validation cases of fold ``fold`` of ``folds`` (a fixed shuffle of names).

    ``folds == 1`` trains on every case and validates on none.
    """
    if folds < 1 or not 0 <= fold < folds:
        raise InputError(f"--fold {fold} of --folds {folds}: expected 0 <= fold < folds")
    if folds == 1:
        return list(names), []
    if len(names) < folds:
        raise InputError(f"{len(names)} case(s) cannot make {folds} folds; expected at least "
                         f"as many cases as folds (or --folds 1)")
    order = np.random.default_rng(12345).permutation(len(names))
    start, stop = block_range(len(names), folds, fold)
    validation = sorted(names[i] for i in order[start:stop])
    return [n for n in names if n not in validation], validation


def poly_lr(base: float, step: int, total: int) -> float:
    """nnU-Net's polynomial decay: base * (1 - step / total) ** 0.9."""
    return base * (1 - min(step, total) / total) ** POLY_EXPONENT


class Training:
    """The ct-train run on this rank (collective: every rank builds one and calls execute)."""

    def __init__(self, run, data, out, settings: TrainSettings, resume: bool = False,
                 png: bool = False):
        self.run = run
        self.world = run.world
        self.data = data
        self.out = Path(out)
        self.settings = settings
        self.resume = resume
        self.png = png
        self.task = task_for(settings)

    # -- setup ----------------------------------------------------------------------------
    def validate(self):
        s = self.settings
        if s.optimizer not in OPTIMIZERS:
            raise InputError(f"--optimizer {s.optimizer}: expected {' or '.join(OPTIMIZERS)}")
        if s.grad_sync not in GRAD_SYNCS:
            raise InputError(f"--grad-sync {s.grad_sync}: expected {' or '.join(GRAD_SYNCS)}")
        dataset = CtDataset(self.data)
        self.task.check(dataset, self.data)
        train, validation = split_folds(dataset.names, s.folds, s.fold)
        if not train:
            raise InputError(f"{self.data}: no training cases in fold {s.fold}")
        in_channels, out_channels = self.task.channels(dataset)
        plan = self.memory_plan(out_channels, dataset)
        config = UNetConfig.from_layout(plan.network, out_channels, s.deep_supervision,
                                        in_channels)
        divisor = config.divisor
        if any(p % d for p, d in zip(plan.patch, divisor)):
            raise InputError(f"--patch {','.join(map(str, plan.patch))}: expected multiples of "
                             f"{','.join(map(str, divisor))} (z,y,x) for this network's "
                             f"{config.depth} stages and strides")
        if self.resume and not (self.out / CHECKPOINT_NAME).exists():
            raise InputError(f"{self.out / CHECKPOINT_NAME}: no checkpoint to resume from; "
                             f"run without --resume to start afresh")
        if not self.resume and (self.out / MODEL_NAME).exists() and not self.run.overwrite:
            raise InputError(f"{self.out / MODEL_NAME}: output exists; pass --overwrite or "
                             f"--resume")
        return dataset, train, validation, config, plan

    def memory_plan(self, classes: int, dataset: CtDataset):
        """The network, patch and batch of this run (same on every node for the same flags)."""
        s = self.settings
        # a plan for a GPU (--gpu-mem-gb, or the run's device) uses AMP and nnU-Net's widths
        # unless told otherwise; the same on a CPU login node's --dry-run as in the GPU job
        amp = s.amp if s.amp is not None else self.for_gpu
        rule = self.width_rule
        widths = None if s.widths is None else tuple(s.widths)
        median = dataset.median_shape
        spacing = dataset.median_spacing_zyx
        if s.patch is not None:
            layout = network_layout(spacing, s.patch, widths, rule)
            return given_plan(layout, classes, s.patch, s.batch or 2, amp,
                              bool(s.checkpointing), s.gpu_mem_gb, s.optimizer)
        budget = s.gpu_mem_gb or (16.0 if self.run.device == "cuda" else 4.0)
        plan = plan_training(widths, classes, median, budget, amp, s.checkpointing,
                             s.optimizer, spacing_zyx=spacing, rule=rule)
        if s.batch is not None:
            plan = given_plan(plan.network, classes, plan.patch, s.batch, plan.amp,
                              plan.checkpointing, budget, s.optimizer)
        return plan

    @property
    def for_gpu(self) -> bool:
        """A plan for a GPU: the run's device, or a budget named by --gpu-mem-gb."""
        return self.run.device == "cuda" or self.settings.gpu_mem_gb is not None

    @property
    def width_rule(self):
        return GPU_WIDTHS if self.for_gpu else CPU_WIDTHS

    def lowres_plan(self, plan, dataset: CtDataset) -> dict | None:
        """The low-resolution configuration the dataset calls for (printed, not trained)."""
        s = self.settings
        if s.patch is not None:
            return None
        return plan_lowres(plan, self.task.channels(dataset)[1], dataset.median_shape,
                           dataset.median_spacing_zyx, plan.budget_gb, s.optimizer,
                           None if s.widths is None else tuple(s.widths), self.width_rule)

    def torch_device(self) -> torch.device:
        if self.run.device == "cuda":
            index = self.run.gpu if self.run.gpu is not None else torch.cuda.current_device()
            torch.cuda.set_device(index)
            return torch.device("cuda", index)
        return torch.device("cpu")

    def load_cases(self, dataset: CtDataset, names: list[str]) -> dict:
        stats = dataset.intensity
        cases = {}
        for index, name in names:
            image, labels, _ = dataset.read(name)
            cases[index] = TrainingCase(name, normalised_hu(image, stats), labels,
                                        dataset.n_classes, intensity_fill(stats))
        return cases

    # -- the run --------------------------------------------------------------------------
    def execute(self) -> dict | None:
        run, s = self.run, self.settings
        with run.stage("validate inputs", "io"):
            dataset, train_names, val_names, config, plan = self.world.agree(self.validate)
        batch = plan.batch
        global_batch = batch * self.world.size
        self.task.bind(dataset)
        summary = {"task": self.task.name,
                   "cases": {"train": len(train_names), "validation": len(val_names)},
                   "validation_cases": list(val_names),
                   "network": config.to_dict(), "memory_plan": plan.to_dict(),
                   "global_batch": global_batch, "grad_sync": s.grad_sync,
                   "optimizer": s.optimizer, "lr": s.learning_rate,
                   "epochs": s.epochs, "steps_per_epoch": s.steps,
                   "dataset": dataset_summary(dataset),
                   # printed and logged by rank 0 only
                   "lowres": self.lowres_plan(plan, dataset) if self.world.is_root else None}
        if run.dry_run:
            run.print_plan(summary)
            return None
        run.log.info("plan: " + json.dumps(summary["memory_plan"]))
        torch.set_num_threads(run.threads)
        with run.stage("rendezvous", "comm"):
            ranks = distributed.rendezvous(self.world, run.device)
        try:
            # until the first step ends a stop signal ends the run at once (nothing to save)
            with StopSignals(raise_while_idle=True) as signals:
                return self._train(dataset, train_names, val_names, config, plan, ranks,
                                   summary, signals)
        finally:
            distributed.shutdown(self.world, ranks)

    def _train(self, dataset, train_names, val_names, config, plan, ranks, summary, signals):
        run, s = self.run, self.settings
        device = self.torch_device()
        batch, patch = plan.batch, plan.patch
        global_batch = batch * ranks.size
        total_steps = s.epochs * s.steps
        torch.manual_seed(s.seed)
        model = UNet3D(config, activation_checkpointing=plan.checkpointing)
        self.task.prepare_model(model)
        model = model.to(device)
        if s.optimizer == "sgd":
            optimizer = torch.optim.SGD(model.parameters(), lr=s.learning_rate, momentum=0.99,
                                        nesterov=True, weight_decay=s.weight_decay)
        else:
            optimizer = torch.optim.AdamW(model.parameters(), lr=s.learning_rate,
                                          weight_decay=s.weight_decay)
        scaler = torch.amp.GradScaler("cuda", enabled=plan.amp and device.type == "cuda")

        slots = rank_slots(ranks.rank, batch)
        sampler = self.task.sampler(len(train_names), global_batch, slots, patch,
                                    backend.kernels("medhpc.ct", "cpu", "augment"),
                                    AugmentSettings() if s.augment else AugmentSettings.none())
        with run.stage("load cases", "io"):
            needed = sampler.needed_cases()
            sampler.cases = self.load_cases(dataset, [(i, train_names[i]) for i in needed])
            val_items, val_reads = self.task.validation_items(val_names, ranks)
            val_cases = self.load_cases(dataset, [(name, name) for name in val_reads])

        state = {"epoch": 0, "step": 0, "history": [], "epoch_loss": 0.0, "epoch_seconds": 0.0}
        fingerprint = s.fingerprint(ranks.size)
        fingerprint["global_batch"] = global_batch
        if self.resume:
            with run.stage("read checkpoint", "io"):
                state = self.read_checkpoint(model, optimizer, scaler, fingerprint)
            state["epoch_loss"] /= ranks.size  # the saved partial sum is over every rank
        if ranks.size > 1 and s.grad_sync == "ddp":
            network = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
            sync = None
        else:
            network = model
            sync = distributed.FlatGradientSync(self.world, model.parameters())
            if ranks.launcher == "torchrun" and ranks.size > 1:
                raise InputError("--grad-sync mpi needs an MPI launch (mpiexec/srun)")
        autocast_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        self.out.mkdir(parents=True, exist_ok=True)
        signals.busy()
        for epoch in range(state["epoch"], s.epochs):
            network.train()
            started = time.perf_counter() - state["epoch_seconds"]
            for step in range(state["step"], s.steps):
                global_step = epoch * s.steps + step
                with run.stage("sample and augment", "kernel"):
                    batch_arrays = sampler.batch(global_step)
                for group in optimizer.param_groups:
                    group["lr"] = poly_lr(s.learning_rate, global_step, total_steps)
                with run.stage("forward and backward", "kernel"):
                    optimizer.zero_grad(set_to_none=True)
                    with torch.autocast(device.type, dtype=autocast_dtype, enabled=plan.amp):
                        loss = self.task.loss(network, batch_arrays, device)
                    scaler.scale(loss).backward()
                if sync is not None:
                    with run.stage("gradient all-reduce", "comm"):
                        sync()
                with run.stage("optimizer step", "kernel"):
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
                    scaler.step(optimizer)
                    scaler.update()
                step_loss = float(loss.detach())
                state["epoch_loss"] += step_loss
                run.log.status(f"epoch {epoch + 1}/{s.epochs} step {step + 1}/{s.steps}: "
                               f"loss {step_loss:.4f} (rank 0)")
                if global_step + 1 == _signal_step():
                    os.kill(os.getpid(), signal.SIGTERM)
                stop = distributed.reduce_max(self.world, ranks, signals.received or 0)
                if stop:
                    partial = distributed.reduce_sum(
                        self.world, ranks, np.array([state["epoch_loss"]]))[0]
                    state.update(epoch=epoch, step=step + 1, epoch_loss=float(partial),
                                 epoch_seconds=time.perf_counter() - started)
                    self.write_checkpoint(model, optimizer, scaler, state, fingerprint,
                                          ranks)
                    raise CheckpointStop(int(stop), global_step + 1,
                                         self.out / CHECKPOINT_NAME)
            seconds = time.perf_counter() - started
            run.log.end_status()
            epoch_loss = distributed.reduce_sum(
                self.world, ranks, np.array([state["epoch_loss"]]))[0] / ranks.size
            with run.stage("validation", "kernel"):
                model.eval()
                with torch.no_grad():
                    measured = self.task.validate(self.world, ranks, model, val_items,
                                                  val_cases, dataset, patch, device, plan.amp)
            record = {"epoch": epoch + 1, "loss": float(epoch_loss) / s.steps,
                      "lr": poly_lr(s.learning_rate, (epoch + 1) * s.steps, total_steps),
                      "patches_per_s": s.steps * global_batch / seconds,
                      "seconds": seconds, **measured}
            if device.type == "cuda":
                record["peak_gpu_gb"] = torch.cuda.max_memory_allocated(device) / 1024 ** 3
            state["history"].append(record)
            run.log.info(f"epoch {epoch + 1}/{s.epochs}: loss {record['loss']:.4f}, "
                         f"{record['patches_per_s']:.2f} patches/s, "
                         + self.task.describe(record))
            state.update(epoch=epoch + 1, step=0, epoch_loss=0.0, epoch_seconds=0.0)
            with run.stage("checkpoint", "io"):
                self.write_checkpoint(model, optimizer, scaler, state, fingerprint, ranks)
        with publish_together():  # model, logs, picture and --timings, or none of them
            with run.stage("write model and log", "io"):
                if ranks.rank == 0:
                    self.write_outputs(model, config, plan, dataset, state["history"], summary)
            if state["history"]:
                last = state["history"][-1]
                run.summary.update(epochs=len(state["history"]), loss=last["loss"],
                                   **self.task.summary(last))
            run.finish()
        return {"history": state["history"]}

    # -- state ----------------------------------------------------------------------------
    def write_checkpoint(self, model, optimizer, scaler, state, fingerprint, ranks):
        if ranks.rank != 0:
            return
        step = state["epoch"] * self.settings.steps + state["step"]
        write_torch_checkpoint(self.out / CHECKPOINT_NAME, step, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "torch_rng": torch.get_rng_state()}, state,
            fingerprint)

    def read_checkpoint(self, model, optimizer, scaler, fingerprint) -> dict:
        _, tensors, state = self.world.agree(lambda: read_torch_checkpoint(
            self.out / CHECKPOINT_NAME, fingerprint,
            "the checkpoint.pt of an interrupted ct-train run (or run without --resume)"))
        try:
            model.load_state_dict(tensors["model"])
            optimizer.load_state_dict(tensors["optimizer"])
            scaler.load_state_dict(tensors["scaler"])
            torch.set_rng_state(tensors["torch_rng"])
        except (KeyError, RuntimeError, ValueError) as error:
            raise InputError(f"{self.out / CHECKPOINT_NAME}: not a checkpoint of this network "
                             f"({type(error).__name__}); run without --resume") from None
        return state

    def write_outputs(self, model, config, plan, dataset, history, summary):
        document = {"model": model.state_dict(), **plain_data({
            "network": config.to_dict(), "patch": list(plan.patch), "classes": dataset.classes,
            "intensity": dataset.intensity, "spacing_mm": dataset.spacing_mm,
            "amp": bool(plan.amp), "task": self.task.name, **self.task.document(history)})}
        with atomic_path(self.out / MODEL_NAME, overwrite=True) as tmp:
            torch.save(document, tmp)
        log = {**summary, "epochs_run": history}
        write_run_log(self.out / "log.json", "ct-train", log, overwrite=True)
        with atomic_path(self.out / "log.csv", overwrite=True) as tmp:
            with open(tmp, "w", newline="") as stream:
                writer = csv.writer(stream)
                writer.writerow(["epoch", "loss", "lr", "patches_per_s", "seconds"]
                                + self.task.csv_columns(dataset.classes))
                for r in history:
                    writer.writerow([r["epoch"], f"{r['loss']:.6f}", f"{r['lr']:.6g}",
                                     f"{r['patches_per_s']:.4f}", f"{r['seconds']:.3f}"]
                                    + self.task.csv_values(r, dataset.classes))
        if self.png:
            from medhpc.ct.figures import plot_training_curves

            plot_training_curves(self.out / "curves.png", history, dataset.classes)


def dataset_summary(dataset: CtDataset) -> dict:
    """What the plan was made from: the stored grid and the fingerprint's target spacing."""
    fingerprint = dataset.fingerprint or {}
    target = fingerprint.get("target_spacing_zyx")
    stored = [round(float(v), 4) for v in dataset.median_spacing_zyx]
    return {"median_shape_zyx": [int(v) for v in dataset.median_shape],
            "median_spacing_zyx": stored,
            "target_spacing_zyx": None if target is None else [round(v, 4) for v in target],
            "at_target_spacing": None if target is None else bool(
                np.allclose(stored, target, rtol=0.02)),
            "class_fraction": fingerprint.get("class_fraction")}



def _signal_step() -> int | None:
    value = os.environ.get(STOP_AFTER_STEP_VARIABLE, "").strip()
    return int(value) if value.isdigit() else None
