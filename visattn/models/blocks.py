"""Convolutional building blocks shared by the CNN families (airbench-shaped)."""
from __future__ import annotations

import torch
from torch import Tensor, nn


def conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()]


class ConvGroup(nn.Sequential):
    """conv3×3 → max-pool 2 → BN → GELU → conv3×3 → BN → GELU (airbench's block)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        first = conv_bn(c_in, c_out)
        super().__init__(first[0], nn.MaxPool2d(2), *first[1:], *conv_bn(c_out, c_out))


class WhiteningStem(nn.Module):
    """A fixed 2×2 patch-whitening convolution (±eigenvectors) then GELU.

    Its weights come from the training images (:meth:`fit`); only the bias learns.
    Stride 1: padding 1 makes a 32×32 input 33×33, so the stages below pool to 16, 8 and 4.
    Stride 2: the patches tile the image (no padding), 32×32 becomes 16×16 with nothing
    lost (24 channels hold the 12 pixel values of each patch), and every layer below costs
    a quarter as much.
    """

    def __init__(self, in_chans: int = 3, kernel: int = 2, stride: int = 1) -> None:
        super().__init__()
        d = in_chans * kernel * kernel
        self.conv = nn.Conv2d(in_chans, 2 * d, kernel, stride=stride, padding=1 if stride == 1 else 0, bias=True)
        self.conv.weight.requires_grad_(False)
        self.act = nn.GELU()
        self.out_channels = 2 * d

    @torch.no_grad()
    def fit(self, images: Tensor, eps: float = 5e-4) -> None:
        """Set the filters to whiten the patches of ``images`` (float, normalised, B×C×H×W)."""
        k, stride = self.conv.kernel_size[0], self.conv.stride[0]
        patches = images.unfold(2, k, stride).unfold(3, k, stride)  # the patches the conv sees: (B, C, H', W', k, k)
        patches = patches.transpose(1, 3).reshape(-1, images.shape[1] * k * k).float()
        patches = patches - patches.mean(0)
        cov = patches.T @ patches / len(patches)
        eigval, eigvec = torch.linalg.eigh(cov)
        filters = (eigvec.T / torch.sqrt(eigval + eps)[:, None]).reshape(-1, images.shape[1], k, k)
        self.conv.weight.copy_(torch.cat([filters, -filters]))

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv(x))


class Classifier(nn.Module):
    """Global max-pool then a linear layer, logits scaled down (airbench's head)."""

    def __init__(self, c_in: int, num_classes: int, scale: float = 1 / 9) -> None:
        super().__init__()
        self.fc = nn.Linear(c_in, num_classes, bias=False)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.amax(dim=(2, 3))) * self.scale
