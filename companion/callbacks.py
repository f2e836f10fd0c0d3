"""The hooks of ``fit`` (``Callback``): extras such as checkpoints or an average of the weights plug in here."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from companion.train import FitState

__all__ = ["Callback"]


class Callback:
    """An extra for ``fit``: override the hooks you need (minGPT's callbacks; Lightning's, much reduced).

    Hooks run on every rank under torchrun. ``state_dict``/``load_state_dict`` carry a callback's own state in
    checkpoints, so that a resumed run continues it.
    """

    def on_fit_start(self, state: FitState) -> None:
        """Once, after the set-up and before the first step (after loading a checkpoint when resuming)."""

    def on_step_end(self, state: FitState) -> None:
        """After every optimiser step."""

    def on_epoch_end(self, state: FitState) -> None:
        """After every epoch's figures are in ``state.history``."""

    def on_stop(self, state: FitState) -> None:
        """When a signal stopped the run at the end of a step, before ``fit`` raises ``TrainingInterrupted``."""

    def on_fit_end(self, state: FitState) -> None:
        """Once, after the last epoch."""

    def state_dict(self) -> dict:
        """This callback's state for a checkpoint (nothing by default)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""
