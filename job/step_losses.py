"""Per-step losses kept on the device between logging points, then read back in one transfer.

Reading a GPU tensor on the host (`.item()`, `float()`, `.tolist()`) waits for every kernel queued
before it. Done every step, that stops the CPU from queueing step N+1 while the GPU still runs step
N. So the loop hands each step's loss (a 0-d device tensor, and its named parts) to `StepLosses`,
and reads them all at a logging point: one stack, one cross-process mean when there are several
processes, one device-to-host copy for the whole interval.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepLoss:
    step: int
    loss: float  # mean over micro-steps (and processes)
    parts: dict[str, float]  # e.g. instance_loss, prior_loss, on the same footing


def logging_interval(setting: int | None, device: torch.device) -> int:
    """`SDFT_LOG_EVERY_STEPS`, or its default: every step on CPU, every 10 steps on a GPU."""
    if setting is not None:
        return setting
    return 1 if device.type == "cpu" else 10


class StepLosses:
    """The losses of the steps since the last read, on the device they were computed on."""

    def __init__(self, accelerator, every_steps: int):
        self.accelerator = accelerator
        self.every_steps = every_steps
        self._pending: list[tuple[int, torch.Tensor, dict[str, torch.Tensor]]] = []

    def add(self, step: int, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        """Keeps step `step`'s detached 0-d loss tensors; reads nothing."""
        self._pending.append((step, loss, parts))

    def due(self, step: int) -> bool:
        """Whether `step` is a logging point by the interval (step 1 always is: the first feedback).

        The same on every process, so collective reads line up.
        """
        return step == 1 or step % self.every_steps == 0

    def read(self) -> list[StepLoss]:
        """Every pending step's values, in step order; the only host-device synchronisation."""
        if not self._pending:
            return []
        names = sorted(self._pending[0][2])
        values = torch.stack([torch.stack([loss.float(), *(parts[n].float() for n in names)])
                              for _, loss, parts in self._pending])
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="mean")
        rows = values.tolist()
        records = [StepLoss(step, row[0], dict(zip(names, row[1:]))) for (step, _, _), row in zip(self._pending, rows)]
        self._pending.clear()
        return records
