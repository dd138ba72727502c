"""Train-time image transforms of the workloads."""

import torch

from noisy_student_workloads.images import rand_augment


def test_rand_augment_low_magnitude_never_posterizes_to_zero_bits():
    # At magnitude 0 timm's Posterize asks for 0 bits, which Pillow rejects.
    augment = rand_augment(ops=3, magnitude=0, image_size=28, fill=[73, 73, 73])
    torch.manual_seed(0)
    img = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    for _ in range(200):
        out = augment(img)
        assert out.shape == (3, 28, 28) and out.dtype == torch.uint8
