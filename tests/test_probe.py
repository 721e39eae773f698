"""The linear probe: informative features score high, uninformative ones low, and it is deterministic."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_hyspark.pretraining.probe import ProbeConfig, ProbeData, dice_per_class, run_probe


def _blobs(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Label maps with two classes: a cube (1) and a smaller cube (2) at random places."""
    rng = np.random.default_rng(seed)
    labels = torch.zeros(n, size, size, size, dtype=torch.long)
    for i in range(n):
        a = rng.integers(0, size - 8, 3)
        labels[i, a[0]:a[0] + 8, a[1]:a[1] + 8, a[2]:a[2] + 8] = 1
        b = rng.integers(0, size - 4, 3)
        labels[i, b[0]:b[0] + 4, b[1]:b[1] + 4, b[2]:b[2] + 4] = 2
    return labels


def _data() -> ProbeData:
    train, test = _blobs(3, seed=1), _blobs(2, seed=2)
    return ProbeData(train[:, None].float(), train, test[:, None].float(), test, ["background", "a", "b"],
                     {"train": ["t0", "t1", "t2"], "test": ["v0", "v1"]})


def informative(x: torch.Tensor) -> list[torch.Tensor]:
    """One-hot of the class (the 'image' here is the label map) at full and half resolution, plus noise."""
    onehot = F.one_hot(x[:, 0].long(), 3).permute(0, 4, 1, 2, 3).float()
    gen = torch.Generator().manual_seed(0)
    return [onehot + 0.1 * torch.randn(onehot.shape, generator=gen), F.avg_pool3d(onehot, 2)]


def uninformative(x: torch.Tensor) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(int(x.sum().item()) % 1000)
    return [torch.randn(x.shape[0], 4, *x.shape[2:], generator=gen)]


def test_probe_separates_informative_from_random_features():
    cfg = ProbeConfig(steps=40)
    good = run_probe(informative, _data(), torch.device("cpu"), cfg)
    bad = run_probe(uninformative, _data(), torch.device("cpu"), cfg)
    assert set(good["dice"]) == {"a", "b"}
    assert good["mean_dice"] > 0.9, good
    assert bad["mean_dice"] < 0.5, bad


def test_probe_is_deterministic():
    cfg = ProbeConfig(steps=10)
    assert run_probe(informative, _data(), torch.device("cpu"), cfg) == \
        run_probe(informative, _data(), torch.device("cpu"), cfg)


def test_dice_ignores_ignored_voxels_and_reports_absent_classes_as_nan():
    target = torch.tensor([[0, 1, 1, -1]])
    pred = torch.tensor([[0, 1, 0, 1]])
    d = dice_per_class(pred, target, 3)
    assert math.isclose(d[0], 2 * 1 / (1 + 2), rel_tol=1e-6) and math.isnan(d[1])


def test_point_features_are_the_upsampled_features_at_those_voxels():
    from nnunet_hyspark.pretraining.probe import LinearProbe, _interpolate_at, _sample_points

    gen = torch.Generator().manual_seed(0)
    low = torch.randn(1, 5, 3, 4, 5, generator=gen)
    size = (12, 8, 10)
    points = _sample_points(_blobs(1, 16)[:, :12, :8, :10], 50, seed=0)[0]
    up = F.interpolate(low, size=size, mode="trilinear", align_corners=False)[0]
    assert torch.allclose(_interpolate_at(low, points, size), up[:, points[:, 0], points[:, 1], points[:, 2]],
                          atol=1e-5)
    probe = LinearProbe([5], 3)
    probe.fit_statistics([low])
    full = probe([low], size)[0]  # (K, *size)
    at = probe.point_logits(probe.features_at_points([low], [points], size))
    assert torch.allclose(at, full[:, points[:, 0], points[:, 1], points[:, 2]].T, atol=1e-5)
