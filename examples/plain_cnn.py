"""A plain torch model for fedprobe's own simulation: ``model.family = "plain_cnn:small_cnn"`` (with this folder on
PYTHONPATH, or the module in your own installed package).

A plain ``nn.Module`` is called as ``model(x)`` and returns logits; no transformers config, no ``pixel_values``
keyword. fedprobe passes ``model.params`` as keyword arguments and the task (shapes, classes) as ``task``.
"""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks, global average pooling and a linear head: [B, C, H, W] -> logits [B, classes]."""

    def __init__(self, channels: int, classes: int, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),  # [B, w, H, W]
            nn.MaxPool2d(2),  # [B, w, H/2, W/2]
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),  # [B, 2w, H/2, W/2]
            nn.AdaptiveAvgPool2d(1),  # [B, 2w, 1, 1]
        )
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def small_cnn(task, width: int = 16) -> nn.Module:
    """SmallCNN sized to the task: ``task.image_shape[0]`` input channels, ``task.num_classes`` outputs."""
    return SmallCNN(task.image_shape[0], task.num_classes, width)
