"""Batch-norm statistics re-estimated after pruning: exactly the statistics of the pruned network, modes kept."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from pqv_lightning.pruning import PruningSpec, prune, recalibrate_batch_norm


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(self.drop(x.mean((2, 3))))


def test_statistics_are_those_of_the_pruned_network_and_modes_are_restored():
    torch.manual_seed(0)
    model = timm.create_model(
        "tiny_vit_5m_224", pretrained=False, num_classes=4, drop_rate=0.5, embed_dims=[16, 24, 32], depths=[1, 1, 1],
        num_heads=[1, 2, 2], window_sizes=[4, 4, 2],
    )  # fmt: skip
    images = [torch.randn(8, 3, 64, 64) for _ in range(4)]
    model.train()
    with torch.no_grad():
        for x in images:  # the dense network's statistics
            model(x)
    model.eval()
    prune(model, PruningSpec(ratio=0.5), images[0][:1])
    norms = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in norms}
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach())) for n, m in norms.items()]
    try:
        assert recalibrate_batch_norm(model, images) == len(norms) > 0
    finally:
        for handle in handles:
            handle.remove()
    for name, norm in norms.items():
        inputs = torch.cat(seen[name])
        assert torch.allclose(norm.running_mean, inputs.mean((0, 2, 3)), atol=1e-5), name
        assert torch.allclose(norm.running_var, inputs.var((0, 2, 3), correction=0), rtol=0.05, atol=1e-5), name
        assert norm.momentum == 0.1
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(images[0]), model(images[0]))  # dropout stayed off while re-estimating


def test_a_model_without_batch_norm_and_an_empty_input():
    assert recalibrate_batch_norm(nn.Sequential(nn.Linear(4, 4)), []) == 0
    with pytest.raises(ValueError, match="at least one batch"):
        recalibrate_batch_norm(_ConvNet(), [])
