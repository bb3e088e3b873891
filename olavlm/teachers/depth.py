# Depth teacher: Depth-Anything-V2's DINOv2 backbone, the mean of four normed block outputs.
"""The depth target of SPEC section 3: ``(B, 576, 1024)`` at 336 px for Depth-Anything-V2-L.

Seed pipeline, per image: PIL ``resize((336, 336))`` (bicubic, aspect not kept), then inside
``infer_image`` a ``cv2.cvtColor(BGR2RGB)`` on an array that is already RGB, so the network
sees **BGR**; /255, ImageNet mean/std; DINOv2-L ``get_intermediate_layers([4, 11, 17, 23],
norm=True)``; CLS dropped; target = the mean of the four patch-token maps.

Here: the transformers port (``DepthAnythingForDepthEstimation``, e.g.
``depth-anything/Depth-Anything-V2-Large-hf``) whose ``Dinov2Backbone`` returns exactly those
maps: its ``out_indices`` ``[5, 12, 18, 24]`` count the embeddings as stage 0, so they are the
outputs of 0-based blocks 4, 11, 17, 23, each passed through the final LayerNorm
(``apply_layernorm``). Only the backbone is kept; the DPT neck and head are dropped.

``seed_compat=True`` (default) keeps the seed's two quirks: the BGR channel order, and the
DINOv2 repository's position-embedding resampling (bicubic with ``scale_factor = (24 + 0.1) /
37``, no antialias) instead of transformers' ``size=(24, 24)`` resampling. The latter is
applied once at load time by storing the resampled 24 x 24 table in the backbone, which then
uses it as is for 336 px inputs. The four maps are averaged in fp32 (the seed summed them in
bf16), then cast to ``dtype``.
"""
from __future__ import annotations

import math
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
    resolve_weights,
    weights_fingerprint,
)

__all__ = ["DEPTH_REPO", "DepthTeacher", "seed_position_embeddings"]

DEPTH_REPO = "depth-anything/Depth-Anything-V2-Large-hf"


def seed_position_embeddings(table: torch.Tensor, grid: int, offset: float = 0.1):
    """The DINOv2 repository's ``interpolate_pos_encoding`` for a square ``grid``.

    ``table``: (1, 1 + N, D) with N a square; returns (1, 1 + grid**2, D) in ``table``'s dtype.
    Bicubic with ``scale_factor = (grid + offset) / sqrt(N)`` and no antialias, in fp32, as in
    Depth-Anything-V2's ``dinov2.py`` (``interpolate_offset=0.1``).
    """
    num = table.shape[1] - 1
    side = int(math.isqrt(num))
    if side * side != num:
        raise ValueError(f"table must hold 1 + a square number of positions, got {num + 1}")
    cls_pos, patch_pos = table[:, :1].float(), table[:, 1:].float()
    dim = table.shape[-1]
    scale = (grid + offset) / math.sqrt(num)
    grid_pos = F.interpolate(patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2),
                             scale_factor=(scale, scale), mode="bicubic", antialias=False)
    if tuple(grid_pos.shape[-2:]) != (grid, grid):
        raise AssertionError(f"resampled to {tuple(grid_pos.shape[-2:])}, not {grid}")
    grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
    return torch.cat([cls_pos, grid_pos], dim=1).to(table.dtype)


def find_weights(path: str | Path | None = None) -> Path:
    """The local folder of the depth teacher's weights (``resolve_weights``); loads nothing."""
    return resolve_weights(path, teacher="depth", repo_id=DEPTH_REPO)


class DepthTeacher(Teacher):
    """Depth-Anything-V2 features: ``{"depth": (B, (S/14)**2, D)}``, (B, 576, 1024) for ViT-L
    at ``input_size=336``. ``backbone`` is a transformers ``Dinov2Backbone`` whose
    ``out_indices`` name the four blocks (use ``DepthTeacher.load`` for a saved model)."""

    name = "depth"
    tasks = ("depth",)

    def __init__(self, backbone, *, input_size: int = 336, device=None, dtype=None,
                 seed_compat: bool = True, max_batch: int | None = None):
        super().__init__(device=device, dtype=dtype, seed_compat=seed_compat,
                         max_batch=max_batch)
        patch = backbone.config.patch_size
        patch = patch if isinstance(patch, int) else patch[0]
        if not isinstance(input_size, int) or input_size < patch or input_size % patch:
            raise ValueError(f"input_size must be a positive multiple of the patch size "
                             f"{patch}, got {input_size!r}")
        if len(backbone.out_features) != 4:
            raise ValueError("backbone must return the 4 intermediate blocks (out_indices), "
                             f"got out_features={backbone.out_features}")
        if not backbone.config.apply_layernorm or backbone.config.reshape_hidden_states:
            raise ValueError("backbone config must have apply_layernorm=True and "
                             "reshape_hidden_states=False (Depth-Anything's), got "
                             f"{backbone.config.apply_layernorm}, "
                             f"{backbone.config.reshape_hidden_states}")
        self.input_size = input_size
        self.grid = input_size // patch
        self.hidden_size = backbone.config.hidden_size
        self.backbone = backbone
        if seed_compat:
            emb = backbone.embeddings.position_embeddings
            if emb.shape[1] - 1 != self.grid * self.grid:
                table = seed_position_embeddings(emb.data, self.grid)
                backbone.embeddings.position_embeddings = torch.nn.Parameter(table)
        self.to(dtype=self.dtype)
        self._freeze()

    @classmethod
    def load(cls, path: str | Path | None = None, **kwargs) -> DepthTeacher:
        """From a saved ``DepthAnythingForDepthEstimation`` folder (or hub-cache repo id)."""
        from transformers import DepthAnythingForDepthEstimation

        folder = find_weights(path)
        model = DepthAnythingForDepthEstimation.from_pretrained(str(folder))
        teacher = cls(model.backbone, **kwargs)
        teacher.weights = weights_fingerprint(folder)
        return teacher

    def target_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"depth": (self.grid * self.grid, self.hidden_size)}

    def host_view(self) -> ImageView:
        return ImageView(size=self.input_size, aspect="stretch", mean=None, std=None)

    def fingerprint(self) -> dict:
        return super().fingerprint() | {"input_size": self.input_size,
                                        "layers": list(self.backbone.out_features)}

    def preprocess(self, images, maps=None) -> torch.Tensor:
        pixels = device_view(images, self.input_size, "stretch", device=self.device)
        if self.seed_compat:
            pixels = pixels.flip(1)  # RGB -> BGR: the seed's double conversion
        return normalize(pixels, IMAGENET_MEAN, IMAGENET_STD, self.dtype)

    def encode(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        maps = self.backbone(pixels).feature_maps  # 4 x (B, 1 + N, D), normed
        total = maps[0][:, 1:].float()
        for m in maps[1:]:
            total = total + m[:, 1:].float()
        return {"depth": (total / len(maps)).to(self.dtype)}
