# Helpers shared by the data tests: conversations, a tokenizer corpus, small files to read.
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from olavlm.data.templates import IMAGE_PLACEHOLDER, TEMPLATES, prepare_turns, render

# Multi-turn conversations used across the tests (and as the tokenizers' training text).
CONVERSATIONS = [
    [{"from": "human", "value": "What colour is the circle?\n<image>"},
     {"from": "gpt", "value": "red"},
     {"from": "human", "value": "And the square?"},
     {"from": "gpt", "value": "The square is blue."}],
    [{"from": "human", "value": "<image>\nDescribe the image."},
     {"from": "gpt", "value": "A small green triangle left of a large yellow circle."}],
    [{"from": "human", "value": "How many corners does a square have?"},
     {"from": "gpt", "value": "four"},
     {"from": "human", "value": "And a triangle?"},
     {"from": "gpt", "value": "three"},
     {"from": "human", "value": "Which shape is round?"},
     {"from": "gpt", "value": "the circle"}],
]


def corpus(repeat: int = 30) -> list[str]:
    texts = []
    for conv in CONVERSATIONS:
        for name in TEMPLATES:
            turns = prepare_turns(conv, has_image=True)
            chosen = turns[:2] if name == "plain" else turns
            texts += render(name, chosen).text.split(IMAGE_PLACEHOLDER)
    return [t for t in texts if t] * repeat


def write_jsonl(path: Path, entries: list) -> Path:
    """One line per entry; a str entry is written verbatim (to make malformed lines)."""
    with path.open("w", encoding="utf-8") as f:
        for entry in entries:
            f.write((entry if isinstance(entry, str) else json.dumps(entry)) + "\n")
    return path


def write_image(path: Path, size=(40, 30), colour=(200, 30, 30), fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


def random_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def entry(i: int, image: str | None = "img.png", turns: int = 1) -> dict:
    conv = []
    for t in range(turns):
        conv += [{"from": "human", "value": f"question {i} {t}?"},
                 {"from": "gpt", "value": f"answer {i} {t}."}]
    if image is not None:
        conv[0]["value"] = "<image>\n" + conv[0]["value"]
    out = {"id": f"s{i}", "conversations": conv}
    if image is not None:
        out["image"] = image
    return out
