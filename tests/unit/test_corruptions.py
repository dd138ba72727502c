"""Corrupted copies of evaluation images: deterministic, each severity further from the clean image."""

import pytest
import torch

from noisy_student_workloads.config import CORRUPTIONS
from noisy_student_workloads.corruptions import corrupt


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(0)
    x = torch.zeros(8, 1, 28, 28, dtype=torch.uint8)
    x[:, :, 6:22, 8:20] = torch.randint(60, 200, (8, 1, 16, 12), generator=generator, dtype=torch.uint8)
    return x


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_each_corruption_is_deterministic_and_grows_with_severity(batch, name):
    distances = []
    for severity in range(1, len(CORRUPTIONS[name]) + 1):
        out = corrupt(batch, name, severity, position=0)
        assert out.dtype == torch.uint8 and out.shape == batch.shape
        assert torch.equal(out, corrupt(batch.clone(), name, severity, position=0))  # the same in every run
        distances.append(float((out.float() - batch.float()).abs().mean()))
    assert 0 < distances[0] < distances[1] < distances[2], distances


def test_noise_depends_on_the_images_position_not_on_the_process(batch):
    assert not torch.equal(corrupt(batch, "gaussian_noise", 2, 0), corrupt(batch, "gaussian_noise", 2, 8))
    with pytest.raises(ValueError, match="severity 4"):
        corrupt(batch, "contrast", 4, 0)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_a_corrupted_image_is_the_same_in_any_batch_so_scores_do_not_depend_on_the_world_size(name):
    """Ranks score contiguous shares of the evaluation images in batches of their own: an image's corruption
    (its noise) must depend on its position in the set only."""
    x = torch.randint(0, 256, (10, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for severity in (1, 2, 3):
        whole = corrupt(x, name, severity, 100)
        # two ranks (5 + 5), three ranks (3 + 3 + 4), smaller batches: the same images
        for cuts in ([5], [3, 6], [1, 2, 7, 9]):
            starts = [0, *cuts]
            pieces = [corrupt(x[a:b], name, severity, 100 + a) for a, b in zip(starts, [*cuts, 10])]
            assert torch.equal(torch.cat(pieces), whole)
    assert not torch.equal(corrupt(x, name, 3, 100), x)  # it does corrupt
