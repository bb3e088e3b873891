# The vision-to-LLM projector (SPEC 1.2).
"""``mlp2x_gelu``: Linear(mm_hidden, H) -> GELU -> Linear(H, H), with biases, as an
``nn.Sequential`` so its keys are the seed's ``mm_projector.{0,2}.{weight,bias}``. ``linear`` is
the single Linear of LLaVA-1.0."""
from __future__ import annotations

import re

from torch import nn

__all__ = ["PROJECTORS", "build_projector"]

PROJECTORS = ("mlp2x_gelu", "linear", "mlpNx_gelu (N >= 1)")


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"projector must be one of {PROJECTORS}, got {kind!r}")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(int(match.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)
