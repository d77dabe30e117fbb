"""The training monitor inside a Hugging Face ``transformers.Trainer``: :class:`StateMonitorCallback`.

A thin layer over :class:`statelens.monitor.StateMonitor`: at the monitor's cadence it measures after the
optimizer step (and once at the start of training) and hands the values to the Trainer's own ``log``,
so every logger the Trainer reports to (TensorBoard, W&B, its ``log_history``) receives them, under
``prefix``. It measures on the main process only (``state.is_world_process_zero``).
"""
from __future__ import annotations

import transformers

from statelens.errors import ParameterError
from statelens.monitor import StateMonitor, log_values


class StateMonitorCallback(transformers.TrainerCallback):
    """``StateMonitorCallback(monitor, trainer)``, or ``StateMonitorCallback(monitor)`` passed in the
    Trainer's ``callbacks`` and then ``callback.attach(trainer)``: a callback cannot reach the Trainer's
    ``log`` otherwise (transformers hands callbacks the model and optimizer, not the Trainer). Training
    without the Trainer attached is refused when it begins, before any step."""

    def __init__(self, monitor: StateMonitor, trainer: transformers.Trainer | None = None, *,
                 prefix: str = "statelens/"):
        self.monitor, self.prefix, self.trainer = monitor, prefix, None
        if trainer is not None:
            self.attach(trainer)

    def attach(self, trainer: transformers.Trainer) -> transformers.Trainer:
        """Logs through ``trainer`` from now on; adds this callback to it unless it already holds it."""
        self.trainer = trainer
        if not any(callback is self for callback in trainer.callback_handler.callbacks):
            trainer.add_callback(self)
        return trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is None:
            raise ParameterError("trainer", "StateMonitorCallback has no Trainer to log through: pass it, "
                                            "StateMonitorCallback(monitor, trainer), or call callback.attach(trainer)")
        self._measure(state)

    def on_step_end(self, args, state, control, **kwargs):
        self._measure(state)

    def _measure(self, state: transformers.TrainerState) -> None:
        """At a due step on the main process: the monitor's rows (appended to its CSV when it has one),
        logged through the Trainer."""
        if state.is_world_process_zero and self.monitor.due(state.global_step):
            self.trainer.log(log_values(self.monitor.step(state.global_step), self.prefix))
