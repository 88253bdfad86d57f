"""cpu_training_mode: process-wide CPU settings on inside the block, off again afterwards."""

import platform

import torch

from spindle.train.host import cpu_training_mode


def _denormal_survives() -> bool:
    return (torch.tensor([1e-39], dtype=torch.float32) * 1.0).item() != 0.0


def test_flushes_denormals_only_inside_and_reports_the_allocator_setting():
    assert _denormal_survives()
    with cpu_training_mode() as tuned:
        assert not _denormal_survives()
        big = torch.ones(16 << 20)  # 64 MiB: served from the heap, not a fresh mmap, while tuned
        assert big.sum().item() == 16 << 20
        del big
    assert _denormal_survives()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert tuned is True


def test_disabled_changes_nothing():
    with cpu_training_mode(enabled=False) as tuned:
        assert tuned is False and _denormal_survives()
