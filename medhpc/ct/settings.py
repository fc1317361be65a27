"""ct-train's settings: every default of a training run, in one place.

Light on purpose (no torch or numpy): the command line reads its defaults from here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

TASKS = ("segmentation", "registration")
OPTIMIZERS = ("sgd", "adamw")
GRAD_SYNCS = ("ddp", "mpi")
#: Initial learning rate by optimizer when --lr is not given.
DEFAULT_LR = {"sgd": 0.01, "adamw": 3e-4}


@dataclass
class TrainSettings:
    """Everything that defines a training run (its fingerprint for --resume)."""

    task: str = "segmentation"
    epochs: int = 10
    steps: int = 50
    batch: int | None = None
    patch: tuple | None = None
    widths: tuple | None = None  # None: planned (medhpc.ct.planner)
    deep_supervision: bool = False
    optimizer: str = "sgd"
    lr: float | None = None
    weight_decay: float = 3e-5
    grad_sync: str = "ddp"
    amp: bool | None = None
    checkpointing: bool | None = None
    gpu_mem_gb: float | None = None
    folds: int = 5
    fold: int = 0
    augment: bool = True
    foreground_fraction: float = 1 / 3
    seed: int = 0
    smoothness: float = 1.0  # registration: weight of the diffusion regulariser
    label_weight: float = 1.0  # registration: weight of the warped-label Dice (with labels)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    def fingerprint(self, ranks: int) -> dict:
        values = asdict(self)
        values["global_batch"] = None if self.batch is None else self.batch * ranks
        values.pop("batch")
        return json.loads(json.dumps(values, default=list))
