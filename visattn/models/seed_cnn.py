"""seed_cnn: the blog post's CIFAR-10 example, fixed so that it runs.

The original multiplied (batch×512) by fc1's (4096×512) weight and never imported
``F``; that line is dropped. Its "attention" is a Linear(512, 512) on a pooled vector,
not attention over positions: kept as written, as the baseline to compare against.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from visattn.models.registry import register_model


@dataclass
class SeedCNNConfig:
    num_classes: int = 10


class SeedCNN(nn.Module):
    def __init__(self, cfg: SeedCNNConfig) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(64 * 8 * 8, 512)
        self.attention = nn.Linear(512, 512)
        self.fc2 = nn.Linear(512, cfg.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = self.attention(x)
        return self.fc2(x)


@register_model("seed_cnn", SeedCNNConfig)
def seed_cnn(cfg: SeedCNNConfig) -> nn.Module:
    return SeedCNN(cfg)
