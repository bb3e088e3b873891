# Segmentation teacher: OneFormer's Swin backbone, last stage resized to 24 x 24.
"""The seg target of SPEC section 3: ``(B, 1536, 24, 24)`` for OneFormer Swin-L (COCO).

Seed pipeline, per image: PIL ``resize((768, 768))``, then ``OneFormerProcessor`` (resize the
shortest edge to 800 with bilinear resampling, so 800 x 800; /255; ImageNet mean/std; it also
tokenizes a task text that is never used), cast to bf16, then the Swin-L backbone's last
feature map (stride 32, 1536 channels, 25 x 25 at 800 px), bilinearly resized to 24 x 24
(``align_corners=False``). The pixel decoder and the transformer decoder are not run, so only
``model.pixel_level_module.encoder`` (a transformers ``SwinBackbone``) is kept.

``seed_compat=True`` (default) keeps the two resizes (768 bicubic, then 800 bilinear);
``False`` resizes once to ``input_size``. [AMBIG] SPEC 3: whether the released checkpoint's
``preprocessor_config.json`` says 800: pass ``input_size`` if it does not.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from olavlm.data.images import ImageView

from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Teacher,
    device_view,
    normalize,
    resize_pixels,
    resolve_weights,
    weights_fingerprint,
)

__all__ = ["SEG_REPO", "SegTeacher"]

SEG_REPO = "shi-labs/oneformer_coco_swin_large"


def find_weights(path: str | Path | None = None) -> Path:
    """The local folder of the seg teacher's weights (``resolve_weights``); loads nothing."""
    return resolve_weights(path, teacher="seg", repo_id=SEG_REPO)


class SegTeacher(Teacher):
    """OneFormer Swin features: ``{"seg": (B, C, grid, grid)}``, (B, 1536, 24, 24) for Swin-L.
    ``backbone`` is a transformers ``SwinBackbone`` (use ``SegTeacher.load`` for a saved
    OneFormer model)."""

    name = "seg"
    tasks = ("seg",)

    def __init__(self, backbone, *, input_size: int = 800, seed_view_size: int = 768,
                 grid: int = 24, device=None, dtype=None, seed_compat: bool = True,
                 max_batch: int | None = None):
        super().__init__(device=device, dtype=dtype, seed_compat=seed_compat,
                         max_batch=max_batch)
        for name, value in (("input_size", input_size), ("seed_view_size", seed_view_size),
                            ("grid", grid)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.input_size = input_size
        self.view_size = seed_view_size if seed_compat else input_size
        self.grid = grid
        self.channels = backbone.num_features[-1]
        self.backbone = backbone
        self.to(dtype=self.dtype)
        self._freeze()

    @classmethod
    def load(cls, path: str | Path | None = None, **kwargs) -> SegTeacher:
        """From a saved ``OneFormerForUniversalSegmentation`` or ``OneFormerModel`` folder (or a
        hub-cache repo id); everything but the Swin backbone is dropped after loading."""
        from transformers import OneFormerModel

        folder = find_weights(path)
        model = OneFormerModel.from_pretrained(str(folder))
        backbone = model.pixel_level_module.encoder
        del model
        teacher = cls(backbone, **kwargs)
        teacher.weights = weights_fingerprint(folder)
        return teacher

    def target_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"seg": (self.channels, self.grid, self.grid)}

    def host_view(self) -> ImageView:
        """The seed's pixels, all with PIL: its resize to 768 (bicubic), then the processor's
        to 800 (bilinear), uint8 between the two; ``preprocess`` only normalizes them."""
        then = self.input_size if self.input_size != self.view_size else None
        return ImageView(size=self.view_size, aspect="stretch", mean=None, std=None,
                         then_size=then)

    def fingerprint(self) -> dict:
        return super().fingerprint() | {"input_size": self.input_size,
                                        "view_size": self.view_size}

    def preprocess(self, images, maps=None) -> torch.Tensor:
        side = (self.input_size, self.input_size)
        if isinstance(images, torch.Tensor) and images.dim() == 4 and \
                tuple(images.shape[-2:]) == side:  # host views: both resizes done (host_view)
            pixels = images.to(self.device, non_blocking=True).float()
        else:
            pixels = device_view(images, self.view_size, "stretch", device=self.device)
            # The processor's resize: bilinear, an upscale from 768 (no antialias either way).
            pixels = resize_pixels(pixels, side, "bilinear")
        return normalize(pixels, IMAGENET_MEAN, IMAGENET_STD, self.dtype)

    def encode(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        last = self.backbone(pixels).feature_maps[-1]  # (B, C, H/32, W/32)
        out = F.interpolate(last.float(), size=(self.grid, self.grid), mode="bilinear",
                            align_corners=False)
        return {"seg": out.to(self.dtype)}
