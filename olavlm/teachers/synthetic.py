# Synthetic teacher: depth/seg/gen targets from the synthetic dataset's exact maps, no weights.
"""Targets that a predictor can only match by knowing the scene's depth and layout.

The synthetic dataset (``olavlm data synth``) stores exact per-pixel depth and segmentation
beside each image. This teacher pools them to the real targets' grid and projects the pooled
features to the real targets' shapes through fixed matrices, so the demo recipe trains its
embedding predictors on meaningful signals without downloading any weights:

- depth ``(grid**2, depth_dim)``, per cell of the 24 x 24 grid: mean, min and max depth (/12 m),
  inverse mean depth (1/m, like Depth-Anything's relative inverse depth) and sin/cos of the
  mean depth at 4 frequencies: 12 features;
- seg ``(seg_dim, grid, grid)``: the fraction of each semantic class in the cell (floor plus
  one class per colour and shape, ``olavlm.data.synthetic.semantic_class``): 19 features;
- gen ``(1, gen_dim)``: per class the area fraction, presence and mean depth (/12 m), and the
  number of shapes (/4): 58 features.

``target = features @ P * sqrt(dim / num_features)`` where ``P`` has orthonormal rows (a
seeded Rademacher matrix, Gram-Schmidt in float64), so targets have roughly unit-scale
elements and ``features = target @ P.T / sqrt(dim / num_features)`` recovers the pooled maps
exactly (the tests do this). Pooling is ``adaptive_{avg,max}_pool2d``; text-only samples (maps
of zeros) give finite targets and are masked by the loader.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from olavlm.data.synthetic import NUM_CLASSES

from .base import Teacher

__all__ = ["SyntheticTeacher", "orthonormal_rows"]

DEPTH_SCALE_M = 12.0  # the floor's far edge: depths are divided by it
NUM_FREQS = 4
NUM_DEPTH_FEATURES = 4 + 2 * NUM_FREQS
NUM_GEN_FEATURES = 3 * NUM_CLASSES + 1


def orthonormal_rows(num_rows: int, dim: int, seed: int) -> torch.Tensor:
    """(num_rows, dim) float32 with orthonormal rows, the same bits for the same seed on any
    machine up to float64 rounding (numpy's PCG64 stream, plain Gram-Schmidt)."""
    if num_rows > dim:
        raise ValueError(f"num_rows must be <= dim = {dim}, got {num_rows}")
    signs = np.random.default_rng(seed).integers(0, 2, size=(num_rows, dim)) * 2.0 - 1.0
    rows = np.empty((num_rows, dim), dtype=np.float64)
    for i in range(num_rows):
        v = signs[i].copy()
        for j in range(i):
            v -= float(np.dot(rows[j], v)) * rows[j]
        rows[i] = v / np.linalg.norm(v)
    return torch.from_numpy(rows.astype(np.float32))


def _stack_maps(maps, key: str, device) -> list[tuple[list[int], torch.Tensor]]:
    values = maps.get(key) if hasattr(maps, "get") else None
    if values is None:
        raise ValueError(f"maps must have {key!r} ((H, W) tensors), got keys {list(maps)}")
    # Non-blocking copies (a blocking one synchronizes the stream in every training step),
    # per map from the loader's pinned buffers, stacked on the device as ``group_by_size``.
    if isinstance(values, torch.Tensor):
        return [(list(range(values.shape[0])), values.to(device, non_blocking=True))]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(values):
        if not isinstance(t, torch.Tensor) or t.ndim != 2:
            raise ValueError(f"maps[{key!r}][{i}] must be a (H, W) tensor, got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
        groups.setdefault(tuple(t.shape), []).append(i)
    return [(rows, torch.stack([values[i].to(device, non_blocking=True) for i in rows]))
            for rows in groups.values()]


class SyntheticTeacher(Teacher):
    """``{"depth": (B, grid**2, depth_dim), "seg": (B, seg_dim, grid, grid), "gen": (B, 1,
    gen_dim)}`` from ``maps = {"depth_mm": (H, W) int, "seg_class": (H, W) uint8}`` per sample
    (``olavlm.data.synthetic.load_scene_maps``; lists or stacked tensors). Images are not
    used."""

    name = "synthetic"
    tasks = ("depth", "seg", "gen")
    needs_images = False
    needs_maps = True

    def __init__(self, *, grid: int = 24, depth_dim: int = 1024, seg_dim: int = 1536,
                 gen_dim: int = 1024, seed: int = 0, device=None, dtype=None,
                 max_batch: int | None = None):
        super().__init__(device=device, dtype=dtype, seed_compat=False, max_batch=max_batch)
        for name, value, low in (("grid", grid, 1), ("depth_dim", depth_dim, NUM_DEPTH_FEATURES),
                                 ("seg_dim", seg_dim, NUM_CLASSES),
                                 ("gen_dim", gen_dim, NUM_GEN_FEATURES)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.grid, self.seed = grid, seed
        self.dims = {"depth": depth_dim, "seg": seg_dim, "gen": gen_dim}
        sizes = {"depth": NUM_DEPTH_FEATURES, "seg": NUM_CLASSES, "gen": NUM_GEN_FEATURES}
        for k, task in enumerate(self.tasks):
            proj = orthonormal_rows(sizes[task], self.dims[task], seed + k)
            self.register_buffer(f"proj_{task}", proj * math.sqrt(self.dims[task] / sizes[task]))
        self._freeze()

    def target_shapes(self) -> dict[str, tuple[int, ...]]:
        g = self.grid
        return {"depth": (g * g, self.dims["depth"]), "seg": (self.dims["seg"], g, g),
                "gen": (1, self.dims["gen"])}

    def fingerprint(self) -> dict:
        return super().fingerprint() | {"seed": self.seed, "num_classes": NUM_CLASSES}

    def projection(self, task: str) -> torch.Tensor:
        """(num_features, dim) float32: ``target = features @ projection(task)``."""
        return getattr(self, f"proj_{task}")

    def _pool(self, depth_mm: torch.Tensor, classes: torch.Tensor):
        g = self.grid
        depth = (depth_mm.float() / 1000.0).clamp_min(0.1).unsqueeze(1)  # (n, 1, H, W) metres
        mean = F.adaptive_avg_pool2d(depth, g)
        low = -F.adaptive_max_pool2d(-depth, g)
        high = F.adaptive_max_pool2d(depth, g)
        freqs = torch.arange(1, NUM_FREQS + 1, device=depth.device).view(1, -1, 1, 1)
        phase = 2.0 * math.pi * freqs * mean / DEPTH_SCALE_M
        cells = torch.cat([mean / DEPTH_SCALE_M - 0.5, low / DEPTH_SCALE_M - 0.5,
                           high / DEPTH_SCALE_M - 0.5, 1.0 / mean - 0.5, phase.sin(),
                           phase.cos()], dim=1)  # (n, 12, g, g)
        onehot = F.one_hot(classes.long(), NUM_CLASSES).permute(0, 3, 1, 2).float()
        fractions = F.adaptive_avg_pool2d(onehot, g)  # (n, 19, g, g)
        area = onehot.mean(dim=(2, 3))  # (n, 19)
        present = (area > 0).float()
        class_depth = (onehot * depth).sum(dim=(2, 3)) / onehot.sum(dim=(2, 3)).clamp_min(1.0)
        count = present[:, 1:].sum(1, keepdim=True) / 4.0
        scene = torch.cat([area, present, class_depth / DEPTH_SCALE_M, count], dim=1)  # (n, 58)
        return cells, fractions, scene

    def preprocess(self, images=None, maps=None) -> dict[str, torch.Tensor]:
        """Pooled features: {"depth": (B, 12, g, g), "seg": (B, 19, g, g), "gen": (B, 58)}."""
        depth_groups = _stack_maps(maps, "depth_mm", self.device)
        class_groups = _stack_maps(maps, "seg_class", self.device)
        total = sum(len(rows) for rows, _ in depth_groups)
        g = self.grid
        out = {"depth": torch.empty(total, NUM_DEPTH_FEATURES, g, g, device=self.device),
               "seg": torch.empty(total, NUM_CLASSES, g, g, device=self.device),
               "gen": torch.empty(total, NUM_GEN_FEATURES, device=self.device)}
        for (rows, depth_mm), (class_rows, classes) in zip(depth_groups, class_groups,
                                                           strict=True):
            if rows != class_rows or depth_mm.shape != classes.shape:
                raise ValueError("maps['depth_mm'] and maps['seg_class'] must have the same "
                                 f"sizes per sample, got {tuple(depth_mm.shape)} and "
                                 f"{tuple(classes.shape)}")
            for task, value in zip(self.tasks, self._pool(depth_mm, classes), strict=True):
                for j, i in enumerate(rows):  # (no index tensor: a host-to-device copy)
                    out[task][i].copy_(value[j])
        return out

    def encode(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # One sample per product: a BLAS picks its blocking (and so its summation order) from
        # the batch size, which moved a few values by an ulp between a batched extraction and
        # a one-at-a-time read (a bf16 cache is compared bit for bit). Same shapes, same bits.
        out: dict[str, list[torch.Tensor]] = {"depth": [], "seg": [], "gen": []}
        for depth, seg, gen in zip(features["depth"], features["seg"], features["gen"],
                                   strict=True):
            out["depth"].append(depth.flatten(1).T @ self.proj_depth)  # (g*g, D)
            out["seg"].append((seg.flatten(1).T @ self.proj_seg).T.reshape(
                -1, *seg.shape[1:]))  # (C, g, g)
            out["gen"].append((gen @ self.proj_gen).unsqueeze(0))  # (1, D)
        if not out["gen"]:  # an empty batch
            return {task: torch.empty(0, *shape, device=self.device, dtype=self.dtype)
                    for task, shape in self.target_shapes().items()}
        return {task: torch.stack(values).to(self.dtype) for task, values in out.items()}
