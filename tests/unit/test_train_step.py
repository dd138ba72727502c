"""The training loop's device habits, checked on the CPU by structure (never by timing): no host sync per step."""

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.overrides import TorchFunctionMode

from noisy_student_workloads.models import create_model, normalization
from noisy_student_workloads.train import Dist, train_epoch

CPU = Dist(rank=0, world=1, local_world=1, device=torch.device("cpu"))
# Tensor methods that wait for the device to copy a value to the host (copies to the device, and shapes, do not).
HOST_READS = {"item", "__float__", "__int__", "__bool__", "tolist", "numpy", "__index__", "cpu", "nonzero"}


class HostReads(TorchFunctionMode):
    """Counts the tensor calls that would make the host wait for a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def batches(steps: int, n: int = 6, labeled: int = 2) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    g = torch.Generator().manual_seed(steps)
    return [(torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g),
             torch.softmax(torch.randn(n, 10, generator=g), dim=1), labeled) for _ in range(steps)]


def host_reads_of_an_epoch(steps: int) -> list[str]:
    model = create_model("test_resnet", 10, 0.2, 0.1).to(memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(model, opt="sgd", lr=0.01, momentum=0.9)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=1, updates_per_epoch=steps,
                                       step_on_epochs=False)
    mean, std = normalization(model)
    data = batches(steps)
    with HostReads() as reads:
        loss, images = train_epoch(model, data, optimizer, scheduler, 0, mean, std, CPU, 0)
    assert images == 6 * steps and loss > 0
    return reads.calls


def test_the_loop_reads_the_device_once_per_epoch_not_per_step() -> None:
    few, many = host_reads_of_an_epoch(2), host_reads_of_an_epoch(7)
    assert few == many, (few, many)  # the same reads at 2 and 7 steps: none per step
    assert len(many) <= 1  # the epoch's mean loss, read once at its end
