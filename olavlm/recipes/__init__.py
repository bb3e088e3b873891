# Runs as functions: `olavlm train --recipe NAME` starts from RECIPES[NAME]() (torchtitan style).
"""Named run configurations.

A recipe is a function ``() -> Config`` holding one run's defaults; the command line layers a
config file and ``key=value`` overrides on top (``olavlm.config.resolve_config``). Recipes
touch no files and import no torch: building the Config is all they do.

- ``demo``: a tiny random-weight OLA-VLM on the built-in synthetic data, on CPU (``demo.py``).
- ``{llama3_8b,phi3_mini}_{clip,convnext}_{pt,vpt,ift}``: SPEC 5.1's three stages for each LLM
  and vision tower (``llava.py``); ``pt``, ``vpt`` and ``ift`` are the Llama-3-8B + CLIP ones.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable

from olavlm.config import Config

from .demo import demo
from .llava import LLAVA_RECIPES

__all__ = ["RECIPES", "get_recipe", "recipe_table"]

RECIPES: dict[str, Callable[[], Config]] = {
    "demo": demo,
    **LLAVA_RECIPES,
    "pt": LLAVA_RECIPES["llama3_8b_clip_pt"],
    "vpt": LLAVA_RECIPES["llama3_8b_clip_vpt"],
    "ift": LLAVA_RECIPES["llama3_8b_clip_ift"],
}


def get_recipe(name: str) -> Config:
    """A fresh Config of the recipe ``name`` (its ``recipe`` field set to ``name``)."""
    if name not in RECIPES:
        lower = {r.lower(): r for r in RECIPES}
        match = [lower[str(name).lower()]] if str(name).lower() in lower else \
            difflib.get_close_matches(str(name), list(RECIPES), n=1, cutoff=0.6)
        hint = f" (did you mean {match[0]!r}?)" if match else ""
        raise ValueError(f"unknown recipe {name!r}{hint}; recipes are: {', '.join(RECIPES)}")
    cfg = RECIPES[name]()
    cfg.recipe = name
    return cfg


def recipe_table() -> str:
    """One line per recipe: what it trains and on what (``olavlm train --list-recipes``);
    the aliases (``pt``, ``vpt``, ``ift``) are named once at the end."""
    aliases = {name: next(full for full, fn in LLAVA_RECIPES.items() if fn is RECIPES[name])
               for name in ("pt", "vpt", "ift")}
    rows = [("recipe", "stage", "LLM", "vision tower", "batch x accum", "lr", "data")]
    for name in sorted(set(RECIPES) - set(aliases)):
        cfg = RECIPES[name]()
        rows.append((name, cfg.train.stage, cfg.model.llm, cfg.model.vision_tower,
                     f"{cfg.data.batch_size} x {cfg.optim.grad_accum}", f"{cfg.optim.lr:g}",
                     cfg.data.path or "built-in synthetic"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    lines.append("aliases: " + ", ".join(f"{a} = {full}" for a, full in aliases.items()))
    return "\n".join(lines)
