# Optimizer groups and the learning-rate schedule (SPEC 5.1: AdamW, cosine with warm-up).
"""AdamW over the trainable parameters, in groups:

- weight decay only on matrices: biases, norm weights, scalars (logit scales) and other 1-D
  parameters get none (LLaVATrainer.create_optimizer's rule, which names norms and biases,
  plus every other 1-D parameter: the logit scales, decayed in the seed; every recipe sets
  weight_decay=0, so this only matters to a user's own decay);
- ``projector_lr`` for ``mm_projector``, ``head_lr`` for the heads, task tokens and logit scales
  (None: the base ``lr``).

The implementation is torch's fused AdamW on CUDA (``fused="auto"|"on"``), apex's FusedAdam
when it is installed and asked for (``fused="apex"``), else the foreach one. The schedule is
linear warm-up over ``ceil(warmup_ratio * total_steps)`` steps, then cosine to 0 (HF's
``get_cosine_schedule_with_warmup``), or constant after warm-up.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["apply_hyperparameters", "build_optimizer", "build_scheduler", "hyperparameters",
           "parameter_groups", "warmup_steps"]

HEAD_PREFIXES = ("image_", "task_tokens", "gen_logit_scale", "depth_logit_scale",
                 "seg_logit_scale")


def _role(name: str) -> str:
    name = name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
    if name.startswith("mm_projector"):
        return "projector"
    if name.startswith(HEAD_PREFIXES):
        return "heads"
    return "llm"


def _no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")


def parameter_groups(model: nn.Module, cfg) -> list[dict]:
    """Trainable parameters grouped by (role, decay). Frozen ones are left out."""
    # (None means "lr"; 0 freezes a group's updates and must stay 0)
    lrs = {"llm": cfg.lr,
           "projector": cfg.lr if cfg.projector_lr is None else cfg.projector_lr,
           "heads": cfg.lr if cfg.head_lr is None else cfg.head_lr}
    groups: dict[tuple[str, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        role, nd = _role(name), _no_decay(name, param)
        group = groups.setdefault((role, nd), {
            "params": [], "names": [], "lr": lrs[role], "role": role,
            "weight_decay": 0.0 if nd else cfg.weight_decay})
        group["params"].append(param)
        group["names"].append(name)
    if not groups:
        raise ValueError("the model has no trainable parameters: check train.stage")
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg)
    for g in groups:
        g.pop("names")
    if cfg.fused not in ("auto", "on", "off", "apex"):
        raise ValueError(f"optim.fused must be auto, on, off or apex, got {cfg.fused!r}")
    if cfg.fused == "apex":
        try:
            from apex.optimizers import FusedAdam
        except ImportError as exc:
            raise ValueError("optim.fused=apex needs NVIDIA apex (not on PyPI; build it from "
                             "github.com/NVIDIA/apex), which is not installed") from exc
        return FusedAdam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                         adam_w_mode=True, weight_decay=cfg.weight_decay)
    fused = device.type == "cuda" and cfg.fused in ("auto", "on")
    if cfg.fused == "on" and device.type != "cuda":
        raise ValueError(f"optim.fused=on needs a CUDA device, the run is on {device}")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=fused or None,
                             foreach=None if fused else True)


def warmup_steps(cfg, total_steps: int) -> int:
    return math.ceil(cfg.warmup_ratio * total_steps)


def schedule_factor(cfg, total_steps: int):
    """The learning-rate multiplier of step k (0-based): linear warm-up, then cosine or
    constant, over ``total_steps``."""
    if cfg.schedule not in ("cosine", "constant"):
        raise ValueError(f"optim.schedule must be cosine or constant, got {cfg.schedule!r}")
    warm = warmup_steps(cfg, total_steps)

    def factor(step: int) -> float:
        if step < warm:  # HF's: the first step runs at lr 0 (it still fills Adam's moments)
            return step / max(1, warm)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, total_steps - warm)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_factor(cfg, total_steps))


def set_schedule_length(scheduler, cfg, total_steps: int) -> None:
    """Give a built scheduler a new length (a resumed epoch-based run whose batch geometry
    changed): its step count stays, the multipliers follow the new total. Call before
    apply_hyperparameters, which sets the current lr from them."""
    scheduler.lr_lambdas = [schedule_factor(cfg, total_steps) for _ in scheduler.lr_lambdas]


_HYPER = ("lr", "betas", "eps", "weight_decay")


def hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each group's base lr, betas, eps and weight decay, as the config built them. The base
    lr is ``initial_lr``: once a scheduler is built, ``lr`` already holds the first step's
    warm-up fraction of it."""
    return [{**{k: g[k] for k in _HYPER if k in g}, "lr": g.get("initial_lr", g["lr"])}
            for g in optimizer.param_groups]


def apply_hyperparameters(optimizer: torch.optim.Optimizer, scheduler, fresh: list[dict]) -> None:
    """After a resume: the config's hyperparameters (``fresh``, read before the checkpoint was
    loaded) replace the checkpoint's, and the schedule continues from its step with the
    config's base lr. Loading alone would keep the saved ones (optimizer groups and the
    scheduler's base_lrs), so an ``optim.lr`` given on the command line would be ignored. With
    an unchanged config every value is the one saved: the run continues bit for bit."""
    if len(fresh) != len(optimizer.param_groups):  # the checkpoint load refuses this already
        raise ValueError(f"{len(fresh)} optimizer groups before the resume, "
                         f"{len(optimizer.param_groups)} after")
    for i, (group, values) in enumerate(zip(optimizer.param_groups, fresh, strict=True)):
        group.update({k: v for k, v in values.items() if k != "lr"})
        group["initial_lr"] = values["lr"]
        scheduler.base_lrs[i] = values["lr"]
        group["lr"] = values["lr"] * scheduler.lr_lambdas[i](scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
