"""The training monitor inside a Lightning ``Trainer``: :class:`StateMonitorLightningCallback`.

A thin layer over :class:`statelens.monitor.StateMonitor`, the Lightning twin of
:class:`statelens.monitor_hf.StateMonitorCallback`: at the monitor's cadence it measures after the
optimizer step (and once when training starts) and hands the values to every logger of the Trainer
(``logger.log_metrics``, so TensorBoard, W&B or CSV loggers receive them with their own prefixes), under
``prefix``, on the global-zero process only. Lightning is optional: this module needs it installed.
"""
from __future__ import annotations

import lightning.pytorch as pl

from statelens.monitor import StateMonitor, log_values


class StateMonitorLightningCallback(pl.Callback):
    """``lightning.pytorch.Trainer(..., callbacks=[StateMonitorLightningCallback(monitor)])``."""

    def __init__(self, monitor: StateMonitor, *, prefix: str = "statelens/"):
        self.monitor, self.prefix = monitor, prefix
        self.last_step: int | None = None   # with gradient accumulation, several batches end one step

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._measure(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        self._measure(trainer)

    def _measure(self, trainer: pl.Trainer) -> None:
        """At a due optimizer step not yet measured, on global zero: the monitor's rows (appended to its
        CSV when it has one), logged to each of the Trainer's loggers at that step."""
        step = trainer.global_step
        if not trainer.is_global_zero or step == self.last_step or not self.monitor.due(step):
            return
        self.last_step = step
        values = log_values(self.monitor.step(step), self.prefix)
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)
