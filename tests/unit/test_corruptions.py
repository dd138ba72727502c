"""Corrupted copies of evaluation images: deterministic, each severity further from the clean image."""

import pytest
import torch

from noisy_student_workloads.corruptions import CORRUPTIONS, SEVERITIES, corrupt


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(0)
    x = torch.zeros(8, 1, 28, 28, dtype=torch.uint8)
    x[:, :, 6:22, 8:20] = torch.randint(60, 200, (8, 1, 16, 12), generator=generator, dtype=torch.uint8)
    return x


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_each_corruption_is_deterministic_and_grows_with_severity(batch, name):
    distances = []
    for severity in range(1, SEVERITIES + 1):
        out = corrupt(batch, name, severity, position=0)
        assert out.dtype == torch.uint8 and out.shape == batch.shape
        assert torch.equal(out, corrupt(batch.clone(), name, severity, position=0))  # the same in every run
        distances.append(float((out.float() - batch.float()).abs().mean()))
    assert 0 < distances[0] < distances[1] < distances[2], distances


def test_noise_depends_on_the_images_position_not_on_the_process(batch):
    assert not torch.equal(corrupt(batch, "gaussian_noise", 2, 0), corrupt(batch, "gaussian_noise", 2, 8))
    with pytest.raises(ValueError, match="severity 4"):
        corrupt(batch, "contrast", 4, 0)
