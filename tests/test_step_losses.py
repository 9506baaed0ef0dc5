"""`job.step_losses`: losses held on the device between logging points, read back in one transfer."""

import math

import torch

from job.step_losses import StepLosses, logging_interval


class _OneProcess:
    num_processes = 1


def test_the_default_interval_is_every_step_on_cpu_and_ten_on_a_gpu():
    assert logging_interval(None, torch.device("cpu")) == 1
    assert logging_interval(None, torch.device("cuda", 0)) == 10
    assert logging_interval(7, torch.device("cuda", 0)) == 7 and logging_interval(3, torch.device("cpu")) == 3


def test_logging_points_are_step_one_and_every_interval():
    losses = StepLosses(_OneProcess(), every_steps=5)
    assert [s for s in range(1, 21) if losses.due(s)] == [1, 5, 10, 15, 20]


def test_a_read_returns_every_pending_step_in_order_and_empties():
    losses = StepLosses(_OneProcess(), every_steps=3)
    for step, value in [(4, 0.5), (5, float("nan")), (6, 0.25)]:
        losses.add(step, torch.tensor(value), {"instance_loss": torch.tensor(value), "prior_loss": torch.tensor(1.0)})
    read = losses.read()
    assert [r.step for r in read] == [4, 5, 6]
    assert read[0].loss == 0.5 and math.isnan(read[1].loss) and read[2].parts == {"instance_loss": 0.25, "prior_loss": 1.0}
    assert losses.read() == []


def test_a_read_is_one_host_transfer():
    """Many steps, one `.tolist()`: the stacked values cross to the host once."""
    losses = StepLosses(_OneProcess(), every_steps=10)
    for step in range(1, 11):
        losses.add(step, torch.tensor(float(step)), {"instance_loss": torch.tensor(float(step))})
    calls = []
    original = torch.Tensor.tolist

    def counted(self):
        calls.append(tuple(self.shape))
        return original(self)

    torch.Tensor.tolist = counted
    try:
        read = losses.read()
    finally:
        torch.Tensor.tolist = original
    assert calls == [(10, 2)] and [r.loss for r in read] == [float(s) for s in range(1, 11)]
