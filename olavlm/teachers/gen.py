# Gen teacher: the unCLIP image encoder (CLIPVisionModelWithProjection) image embeddings.
"""The gen target of SPEC section 3: ``(B, 1, 1024)``, the image embeddings of
``stabilityai/stable-diffusion-2-1-unclip``'s ``image_encoder`` (a CLIP ViT-H/14 with a
1024-d projection).

Seed pipeline, per image: ``pipe.feature_extractor`` (CLIPImageProcessor: resize the short side
to 224 bicubic, centre-crop 224, /255, CLIP mean/std), then ``pipe.image_encoder(...)
.image_embeds`` in fp16 (the pipe was not a registered submodule, so it stayed fp16 on CUDA).
Here the encoder runs in ``dtype``: by default the seed's fp16 on accelerators (the other
teachers' default is bf16, as DeepSpeed cast the seed's registered ones), fp32 on the CPU.
"""
from __future__ import annotations

from pathlib import Path

import torch

from olavlm.data.images import CLIP_MEAN, CLIP_STD, ImageView

from .base import Teacher, device_view, normalize, resolve_weights, weights_fingerprint

__all__ = ["GEN_REPO", "GenTeacher"]

GEN_REPO = "stabilityai/stable-diffusion-2-1-unclip"
_HINT = f'hf download {GEN_REPO} --include "image_encoder/*" --local-dir DIR'


def find_weights(path: str | Path | None = None) -> Path:
    """The local folder of the gen teacher's image encoder (``resolve_weights``); loads
    nothing."""
    return resolve_weights(path, teacher="gen", repo_id=GEN_REPO, subfolder="image_encoder",
                           download_hint=_HINT)


class GenTeacher(Teacher):
    """unCLIP image embeddings: ``{"gen": (B, 1, projection_dim)}``. ``encoder`` is a
    transformers ``CLIPVisionModelWithProjection`` (use ``GenTeacher.load`` for a saved one)."""

    name = "gen"
    tasks = ("gen",)

    def __init__(self, encoder, *, input_size: int | None = None, device=None, dtype=None,
                 seed_compat: bool = True, max_batch: int | None = None):
        if dtype is None and torch.device(device if device is not None else "cpu").type != "cpu":
            dtype = torch.float16  # the seed's unCLIP pipe stayed fp16 (SPEC 3)
        super().__init__(device=device, dtype=dtype, seed_compat=seed_compat,
                         max_batch=max_batch)
        size = encoder.config.image_size if input_size is None else input_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"input_size must be a positive int, got {input_size!r}")
        self.input_size = size
        self.embed_dim = encoder.config.projection_dim
        self.encoder = encoder
        self.to(dtype=self.dtype)
        self._freeze()

    @classmethod
    def load(cls, path: str | Path | None = None, **kwargs) -> GenTeacher:
        """From the unCLIP pipeline folder (its ``image_encoder/`` is used) or the image
        encoder's own folder (or a hub-cache repo id). An fp16-only variant
        (``model.fp16.safetensors``) is loaded too."""
        from transformers import CLIPVisionModelWithProjection

        folder = find_weights(path)
        has_full = any((folder / n).is_file() for n in (
            "model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"))
        variant = None if has_full or not (folder / "model.fp16.safetensors").is_file() else "fp16"
        encoder = CLIPVisionModelWithProjection.from_pretrained(str(folder), variant=variant)
        teacher = cls(encoder, **kwargs)
        teacher.weights = weights_fingerprint(folder)
        return teacher

    def target_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"gen": (1, self.embed_dim)}

    def host_view(self) -> ImageView:
        return ImageView(size=self.input_size, aspect="square", mean=None, std=None)

    def fingerprint(self) -> dict:
        return super().fingerprint() | {"input_size": self.input_size}

    def preprocess(self, images, maps=None) -> torch.Tensor:
        pixels = device_view(images, self.input_size, "square", device=self.device)
        return normalize(pixels, CLIP_MEAN, CLIP_STD, self.dtype)

    def encode(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        embeds = self.encoder(pixel_values=pixels).image_embeds  # (B, projection_dim)
        return {"gen": embeds.unsqueeze(1).to(self.dtype)}
