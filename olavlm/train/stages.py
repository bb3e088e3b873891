# Which parameters a training stage updates (SPEC 5.1), and a per-module report of the split.
"""PT trains the projector, the heads, the task tokens and the logit scales (the LLM and the
vision tower are frozen: the next-token gradient still flows *through* the LLM to the
projector, with no weight-gradient GEMMs). VPT and IFT train the LLM and the projector; the
task tokens stay frozen (still inserted), the heads are unused. The vision tower is always
frozen.

``full`` (not a seed stage) trains everything but the vision tower: the LLM, projector, task
tokens, heads and logit scales, with the next-token and the embedding losses. The demo uses it
because its tiny LLM starts from random weights: frozen, it could never lower the next-token
loss."""
from __future__ import annotations

from torch import nn

__all__ = ["STAGES", "apply_stage", "trainable_report"]

STAGES = ("pt", "vpt", "ift", "full")


def apply_stage(model: nn.Module, stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"train.stage must be one of {STAGES}, got {stage!r}")
    model.requires_grad_(False)
    model.mm_projector.requires_grad_(True)
    if stage in ("pt", "full"):
        model.task_tokens.requires_grad_(True)
        for task in model.tasks:
            model.heads(task).requires_grad_(True)
            model.logit_scale(task).requires_grad_(True)
    if stage != "pt":
        model.llm.requires_grad_(True)
    model.vision_tower.requires_grad_(False)


def trainable_report(model: nn.Module) -> list[tuple[str, int, int]]:
    """[(top-level module, trainable parameters, frozen parameters)], in model order."""
    rows: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        row = rows.setdefault(top, [0, 0])
        row[0 if p.requires_grad else 1] += p.numel()
    return [(k, v[0], v[1]) for k, v in rows.items()]
