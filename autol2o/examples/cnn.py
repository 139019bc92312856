"""Example MODEL.py: a small CNN for single-channel images (MNIST IDX files, image folders, or
the 8x8 digits when given as 64 flat features).

    autol2o fit autol2o/examples/cnn.py /path/to/mnist --steps 500

Global average pooling makes it independent of the image size; ``n_classes`` is 10.
"""

import math

import torch
from torch import nn


class Model(nn.Module):
    def __init__(self, channels: int = 1, n_classes: int = 10):
        super().__init__()
        self.channels = channels
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(32, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:  # flat features, e.g. digits' 64 columns -> 1 x 8 x 8 image
            side = math.isqrt(x.shape[1] // self.channels)
            x = x.view(-1, self.channels, side, side)
        return self.head(self.features(x).flatten(1))
