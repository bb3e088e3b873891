# Tiny OLA-VLM models and batches for the model tests (real HF classes, random weights).
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from olavlm.models.config import HeadConfig, ModelConfig
from olavlm.models.ola import OlaVLM
from olavlm.models.tiny_llm import build_tiny_llm

VOCAB = 96
IMAGE_SIZE = 32


def tiny_heads() -> dict[str, HeadConfig]:
    # The real heads' structure at toy widths: gen 1 query, depth 16 queries + 3 MLPs
    # (dim = the LLM width), seg a (C, h, w) target map.
    return {
        "gen": HeadConfig(num_queries=1, output_dim=16, target_shape=(1, 16), dim_head=8),
        "depth": HeadConfig(num_queries=16, output_dim=16, target_shape=(16, 16), num_mlps=3,
                            dim_head=8),
        "seg": HeadConfig(num_queries=16, output_dim=12, target_shape=(12, 4, 4), dim_head=8),
    }


class StandInTower(nn.Module):
    """A frozen patch embedding with the VisionTower interface (used only where the real tiny
    tower would add nothing: the splice tests)."""

    def __init__(self, hidden_size: int = 24, patch: int = 8, image_size: int = IMAGE_SIZE):
        super().__init__()
        self.hidden_size, self.patch, self.image_size = hidden_size, patch, image_size
        self.num_tokens = (image_size // patch) ** 2
        self.proj = nn.Conv2d(3, hidden_size, patch, patch)
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, images):
        return self.proj(images.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)


def tiny_tower(tmp: Path):
    """The real tiny CLIP tower from olavlm.models.vision."""
    from olavlm.models.vision import build_tiny_vision_tower, build_vision_tower

    path = build_tiny_vision_tower("clip", tmp / "clip", image_size=IMAGE_SIZE)
    return build_vision_tower(path, kind="clip")


def tiny_model(tmp: Path, *, kind: str = "llama", tower=None, layers: int = 4,
               **overrides) -> OlaVLM:
    llm_dir = tmp / f"llm-{kind}"
    if not (llm_dir / "config.json").exists():
        build_tiny_llm(kind, llm_dir, vocab_size=VOCAB, hidden_size=32, num_layers=layers)
    cfg = dict(llm=str(llm_dir), layer_indices="d2-4_s1-3_g2-3", num_task_tokens=4,
               heads=tiny_heads(), impl="torch")
    cfg.update(overrides)
    torch.manual_seed(0)
    return OlaVLM(ModelConfig(**cfg), vision_tower=tower if tower is not None else tiny_tower(tmp))


def tiny_batch(model: OlaVLM, *, batch: int = 4, length: int = 24, placeholders=None,
               text_only=(), pad_from=None, seed: int = 0, dtype=torch.float32):
    """(input_ids, attention_mask, labels, images, image_mask, targets). placeholders[i]: the
    image position of sample i; text_only: samples without an image; pad_from[i]: where sample
    i's right padding starts."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    placeholders = placeholders or [3 + (i % 3) for i in range(batch)]
    mask = torch.ones(batch, length, dtype=torch.bool)
    for i in range(batch):
        if pad_from and pad_from[i] is not None:
            mask[i, pad_from[i]:] = False
            ids[i, pad_from[i]:] = 0
        if i not in text_only:
            ids[i, placeholders[i]] = -200
    labels = ids.clone()
    labels[:, : max(placeholders) + 4] = -100
    labels[~mask] = -100
    labels[ids == -200] = -100
    size = model.vision_tower.image_size
    images = torch.randn(batch, 3, size, size, generator=g)
    image_mask = torch.tensor([0 if i in text_only else 1 for i in range(batch)])
    targets = {task: torch.randn((batch, *model.config.heads[task].target_shape),
                                 generator=g).to(dtype) for task in model.tasks}
    return ids, mask, labels, images.to(dtype), image_mask, targets
