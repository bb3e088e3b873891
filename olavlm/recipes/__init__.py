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

__all__ = ["RECIPES", "get_recipe"]

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
        match = difflib.get_close_matches(str(name), list(RECIPES), n=1, cutoff=0.6)
        hint = f" (did you mean {match[0]!r}?)" if match else ""
        raise ValueError(f"unknown recipe {name!r}{hint}; recipes are: {', '.join(RECIPES)}")
    cfg = RECIPES[name]()
    cfg.recipe = name
    return cfg
