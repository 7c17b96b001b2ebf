"""TensorBoard scalars of a training run (config `log.tensorboard`), under run_dir/tensorboard/:

- `step/`  (x: global batch index = epoch * batches per epoch + batch): `loss`, `class_loss`,
  `motif_loss`, `supcon_loss` (those the batch computed) and `lr`, per training batch;
- `epoch/` (x: epoch): every number of that epoch's metrics.jsonl record (`train_*`, `val_*`,
  `lr`, `grad_norm`, `time_s`, SupCon fallback counts).

Each lives in a folder of its own (TensorBoard shows them as the runs `step` and `epoch`), so that
each has one x axis. Only the main process writes. Every writer starts by telling TensorBoard to
drop what an earlier session wrote from its first step on: a resumed run continues the same
curves without duplicate steps, even after a crash in the middle of an epoch.
"""
from __future__ import annotations

from pathlib import Path

import torch

from config import ConfigError

FLUSH_STEPS = 50  # batches whose values are read from the device together


def require(config) -> None:
    """At start-up: with log.tensorboard on, the tensorboard package must be importable."""
    if not config.log.tensorboard:
        return
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (imports the tensorboard package)
    except ImportError as err:
        raise ConfigError(f"log.tensorboard is true but the tensorboard package cannot be imported ({err}); "
                          "install it (pip install tensorboard) or set log.tensorboard: false") from None


class Off:
    """No TensorBoard log: every call does nothing."""

    def step(self, global_step: int, loss, losses: dict, lr: float) -> None:
        pass

    def epoch(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


OFF = Off()


class TensorBoardLog(Off):
    """The step and epoch writers of one training session starting at `start_epoch`."""

    def __init__(self, run_dir, start_epoch: int, batches_per_epoch: int):
        from torch.utils.tensorboard import SummaryWriter
        root = Path(run_dir) / "tensorboard"
        # purge_step: TensorBoard's readers drop earlier events at or after this step
        self.steps = SummaryWriter(str(root / "step"), purge_step=start_epoch * batches_per_epoch)
        self.epochs = SummaryWriter(str(root / "epoch"), purge_step=start_epoch)
        self.pending = []  # (global step, names, values on the device, lr) of batches not yet written

    def step(self, global_step: int, loss, losses: dict, lr: float) -> None:
        """One training batch: total loss, its parts ({name: scalar tensor}) and the learning rate. The values stay
        on the device until FLUSH_STEPS batches are pending (or the epoch ends), then reach the host in one
        transfer: one GPU synchronisation per FLUSH_STEPS batches, not one per batch."""
        values = torch.stack([loss.detach().float(), *(v.detach().float() for v in losses.values())])
        self.pending.append((global_step, ["loss", *losses], values, lr))
        if len(self.pending) >= FLUSH_STEPS:
            self.write_steps()

    def write_steps(self) -> None:
        """The pending batches' values, read in one transfer."""
        if not self.pending:
            return
        values = torch.cat([v for _, _, v, _ in self.pending]).tolist()
        for global_step, names, _, lr in self.pending:
            for name in names:
                self.steps.add_scalar(f"step/{name}", values.pop(0), global_step)
            self.steps.add_scalar("step/lr", lr, global_step)
        self.pending = []

    def epoch(self, record: dict) -> None:
        """One metrics.jsonl record (undefined metrics, null there, are left out); on disk before
        the epoch's checkpoint is."""
        self.write_steps()
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.epochs.add_scalar(f"epoch/{key}", value, record["epoch"])
        self.steps.flush()
        self.epochs.flush()

    def close(self) -> None:
        self.write_steps()
        self.steps.close()
        self.epochs.close()


def open_log(config, main_process: bool, start_epoch: int, batches_per_epoch: int) -> Off:
    """TensorBoardLog on the main process with log.tensorboard, else OFF."""
    if not (main_process and config.log.tensorboard):
        return OFF
    return TensorBoardLog(config.run_dir, start_epoch, batches_per_epoch)
