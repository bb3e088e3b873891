# Helpers for the teacher tests: tiny real-architecture teachers, images, real-size configs.
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

DEPTH_TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                  intermediate_size=64, image_size=56, patch_size=14, out_indices=[1, 2, 3, 4],
                  apply_layernorm=True, reshape_hidden_states=False)
SWIN_TINY = dict(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1],
                 num_heads=[1, 1, 2, 2], window_size=4,
                 out_features=["stage1", "stage2", "stage3", "stage4"])
CLIP_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, image_size=224, patch_size=14, projection_dim=24)
# Real sizes (SPEC 3): Depth-Anything-V2-L's DINOv2-L, OneFormer's Swin-L, unCLIP's ViT-H/14.
DEPTH_REAL = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096, image_size=518, patch_size=14, layerscale_value=1.0,
                  out_indices=[5, 12, 18, 24], apply_layernorm=True, reshape_hidden_states=False)
SWIN_REAL = dict(image_size=384, embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48],
                 window_size=12, out_features=["stage1", "stage2", "stage3", "stage4"])
CLIP_REAL = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=16, image_size=224, patch_size=14, projection_dim=1024,
                 hidden_act="gelu")
TINY_SHAPES = {"depth": (576, 32), "seg": (64, 24, 24), "gen": (1, 24)}


def depth_model(config: dict):
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    cfg = DepthAnythingConfig(backbone_config=Dinov2Config(**config),
                              neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
                              reassemble_hidden_size=config["hidden_size"], head_hidden_size=8)
    return DepthAnythingForDepthEstimation(cfg)


def oneformer_model(config: dict):
    from transformers import OneFormerConfig, OneFormerModel, SwinConfig

    # GroupNorm(32, ...) in the pixel decoder needs widths that are multiples of 32.
    cfg = OneFormerConfig(
        backbone_config=SwinConfig(**config), num_queries=4, hidden_dim=32, conv_dim=32,
        mask_dim=32, encoder_feedforward_dim=32, dim_feedforward=32, decoder_layers=2,
        encoder_layers=1, text_encoder_width=32, text_encoder_num_layers=1,
        text_encoder_context_length=8, text_encoder_proj_layers=1, text_encoder_n_ctx=2,
        num_attention_heads=2, task_seq_len=8, max_seq_len=8, num_labels=3,
        text_encoder_vocab_size=100)
    return OneFormerModel(cfg)


def clip_model(config: dict):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(CLIPVisionConfig(**config))


def save_tiny_teachers(root: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    paths = {"depth": root / "depth-anything-tiny", "seg": root / "oneformer-tiny",
             "gen": root / "unclip-tiny"}
    depth_model(DEPTH_TINY).save_pretrained(paths["depth"])
    oneformer_model(SWIN_TINY).save_pretrained(paths["seg"])
    clip_model(CLIP_TINY).save_pretrained(paths["gen"] / "image_encoder")
    (paths["gen"] / "model_index.json").write_text(json.dumps({"_class_name": "tiny"}))
    return paths


def random_images(sizes, seed: int = 0) -> list[torch.Tensor]:
    """Photo-like uint8 (3, H, W) images: smooth colour fields plus noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for height, width in sizes:
        coarse = rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((width, height),
                                                          Image.Resampling.BICUBIC))
        noisy = field.astype(np.int16) + rng.normal(0, 8, field.shape).astype(np.int16)
        out.append(torch.from_numpy(np.clip(noisy, 0, 255).astype(np.uint8)).permute(2, 0, 1)
                   .contiguous())
    return out
