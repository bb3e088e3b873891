# The built-in synthetic dataset: procedural shape scenes, QA about them, exact depth and seg.
"""Procedural scenes with questions and answers, and their exact depth and segmentation.

A scene is a floor-like grey background and 1 to ``max_objects`` flat shapes (circle, square,
triangle) in six colours and two sizes, each a card facing the camera at its own depth; nearer
cards hide farther ones, and about half the scenes place shapes so that they overlap. Because
the scene is drawn from its description, the per-pixel depth (millimetres, uint16) and the
instance segmentation (0 = background, k = ``scene["objects"][k - 1]``) are exact.

Every image sample has a caption turn and one to three questions about colour, size, count,
left/right, and which of two overlapping shapes is in front (asked only when the overlap is
visible). The answers are short and follow from the pixels alone, so a small model can learn
them. A few samples are text-only (facts about shapes), so loaders and models see both
modalities.

Scene ``i`` of split ``s`` uses ``numpy.random.default_rng([seed, s, i])``: the same seed gives
the same bytes whatever ``num`` or the number of worker processes.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import multiprocessing
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = [
    "COLOURS",
    "NUM_CLASSES",
    "SHAPES",
    "SIZES",
    "Scene",
    "SceneObject",
    "load_scene_maps",
    "render_scene",
    "sample_scene",
    "scene_conversation",
    "semantic_class",
    "shape_mask",
    "synth_sample",
    "write_synthetic_dataset",
]

COLOURS = {
    "red": (220, 50, 47), "green": (60, 170, 75), "blue": (40, 90, 220),
    "yellow": (240, 200, 40), "purple": (145, 70, 190), "orange": (245, 130, 40),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.11, "large": 0.19}  # circumradius as a fraction of the image side
# Up to len(COLOURS) * len(SHAPES), the most objects a scene may hold (sample_scene).
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                "seventeen", "eighteen")
# The floor: grey, far (12 m) at the top of the image and nearer (6 m) at the bottom; shapes
# stand between 1 and 5 m, always in front of it.
FLOOR_DEPTH_MM = (12000, 6000)
FLOOR_GREY = (150, 95)
OBJECT_DEPTHS_MM = np.arange(1000, 5001, 50)
SPLITS = {"train": 0, "val": 1}
_CORNERS = {"circle": "zero", "triangle": "three", "square": "four"}
_MIXES = (("red", "yellow", "orange"), ("blue", "red", "purple"), ("blue", "yellow", "green"))
# Semantic classes of the maps' consumers (the synthetic teacher): 0 = floor, then one per
# (colour, shape) pair; instance ids are arbitrary per scene, classes are not.
NUM_CLASSES = 1 + len(COLOURS) * len(SHAPES)


@dataclasses.dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    radius: float
    depth_mm: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    def as_dict(self, instance: int) -> dict:
        return {"instance": instance, "shape": self.shape, "colour": self.colour,
                "size": self.size, "center": [round(self.cx, 3), round(self.cy, 3)],
                "radius": round(self.radius, 3), "depth_mm": self.depth_mm}


@dataclasses.dataclass(frozen=True)
class Scene:
    """``objects[k]`` is instance ``k + 1`` of the segmentation map."""

    size: int
    objects: tuple[SceneObject, ...]

    def as_dict(self) -> dict:
        return {"size": self.size, "floor_depth_mm": list(FLOOR_DEPTH_MM),
                "objects": [o.as_dict(k + 1) for k, o in enumerate(self.objects)]}


@functools.lru_cache(maxsize=8)
def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return xs, ys


def shape_mask(obj: SceneObject, size: int) -> np.ndarray:
    """(size, size) bool: pixels whose centre lies inside ``obj`` (visible or not)."""
    xs, ys = _pixel_centres(size)
    dx, dy, r = xs - obj.cx, ys - obj.cy, obj.radius
    if obj.shape == "circle":
        return dx * dx + dy * dy <= r * r
    if obj.shape == "square":  # axis-aligned, half side 0.8 r
        return (np.abs(dx) <= 0.8 * r) & (np.abs(dy) <= 0.8 * r)
    # Equilateral triangle pointing up with circumradius r.
    return (dy >= -r) & (dy <= 0.5 * r) & (np.abs(dx) <= (dy + r) / math.sqrt(3.0))


def render_scene(scene: Scene) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image (H, W, 3) uint8, depth (H, W) uint16 mm, segmentation (H, W) uint8)."""
    size = scene.size
    rows = (np.arange(size, dtype=np.float64) + 0.5) / size
    far, near = FLOOR_DEPTH_MM
    depth = np.repeat(np.rint(far + (near - far) * rows)[:, None], size, axis=1).astype(np.uint16)
    grey = np.rint(FLOOR_GREY[0] + (FLOOR_GREY[1] - FLOOR_GREY[0]) * rows).astype(np.uint8)
    image = np.repeat(np.repeat(grey[:, None, None], size, axis=1), 3, axis=2)
    seg = np.zeros((size, size), dtype=np.uint8)
    # Painter's order, farthest first: a nearer card overwrites what it hides.
    for k in sorted(range(len(scene.objects)), key=lambda k: -scene.objects[k].depth_mm):
        obj = scene.objects[k]
        mask = shape_mask(obj, size)
        image[mask] = COLOURS[obj.colour]
        depth[mask] = obj.depth_mm
        seg[mask] = k + 1
    return image, depth, seg


def semantic_class(colour: str, shape: str) -> int:
    """The class id of a (colour, shape) pair: 1 + colour index * 3 + shape index."""
    return 1 + list(COLOURS).index(colour) * len(SHAPES) + SHAPES.index(shape)


def load_scene_maps(entry: dict, folder: str | Path) -> dict[str, torch.Tensor]:
    """The exact maps of a synthetic sample: ``{"depth_mm": (H, W) int32 millimetres,
    "seg_class": (H, W) uint8 semantic class}`` (``semantic_class``; 0 = floor).

    ``entry`` is a synthetic dataset entry (its ``depth``/``seg`` paths are relative to
    ``folder``, and ``scene`` maps instance ids to shapes). Raises ``FileNotFoundError`` for a
    missing map, ``ValueError`` for an entry without maps or a map that disagrees with it.
    """
    missing = [k for k in ("depth", "seg", "scene") if not entry.get(k)]
    if missing:
        raise ValueError(f"entry {entry.get('id')!r} must have 'depth', 'seg' and 'scene' (a "
                         f"synthetic dataset entry), missing {missing}")
    paths = {k: Path(folder) / entry[k] for k in ("depth", "seg")}
    for path in paths.values():
        if not path.is_file():
            raise FileNotFoundError(f"map file not found: {path}")
    with Image.open(paths["depth"]) as im:
        depth = np.asarray(im).astype(np.int32)
    with Image.open(paths["seg"]) as im:
        instances = np.asarray(im)
    objects = entry["scene"]["objects"]
    lut = np.zeros(256, dtype=np.uint8)
    for k, obj in enumerate(objects, start=1):
        lut[k] = semantic_class(obj["colour"], obj["shape"])
    if depth.shape != instances.shape or int(instances.max(initial=0)) > len(objects):
        raise ValueError(f"maps of {entry.get('id')!r} disagree with its scene: depth "
                         f"{depth.shape}, seg {instances.shape} with instance ids up to "
                         f"{int(instances.max(initial=0))} for {len(objects)} objects")
    return {"depth_mm": torch.from_numpy(depth), "seg_class": torch.from_numpy(lut[instances])}


def _place(rng: np.random.Generator, size: int, radius: float, placed: list[SceneObject]):
    lo, hi = radius, size - radius
    if placed and rng.random() < 0.5:
        # Near an earlier shape, so that the two overlap.
        other = placed[int(rng.integers(len(placed)))]
        angle = rng.uniform(0.0, 2.0 * math.pi)
        dist = (radius + other.radius) * rng.uniform(0.35, 0.85)
        cx, cy = other.cx + dist * math.cos(angle), other.cy + dist * math.sin(angle)
        return float(np.clip(cx, lo, hi)), float(np.clip(cy, lo, hi))
    return float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))


def _visible_enough(scene: Scene, seg: np.ndarray) -> bool:
    # Every shape keeps at least 30% of its area (and 12 pixels) in view, so every question
    # about it can be answered from the image.
    for k, obj in enumerate(scene.objects):
        area = int(shape_mask(obj, scene.size).sum())
        seen = int((seg == k + 1).sum())
        if seen < max(12, 0.3 * area):
            return False
    return True


def sample_scene(rng: np.random.Generator, size: int = 128, max_objects: int = 4) -> Scene:
    """A random scene whose shapes all stay visible (distinct colour+shape pairs, depths)."""
    if max_objects < 1 or max_objects > len(COLOURS) * len(SHAPES):
        raise ValueError(f"max_objects must be in [1, {len(COLOURS) * len(SHAPES)}], got "
                         f"{max_objects}")
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    for _ in range(100):
        num = int(rng.integers(1, max_objects + 1))
        chosen = rng.choice(len(pairs), size=num, replace=False)
        depths = rng.choice(OBJECT_DEPTHS_MM, size=num, replace=False)
        objects: list[SceneObject] = []
        for j, pair_idx in enumerate(chosen):
            colour, shape = pairs[int(pair_idx)]
            size_name = "large" if rng.random() < 0.5 else "small"
            radius = SIZES[size_name] * size
            cx, cy = _place(rng, size, radius, objects)
            objects.append(SceneObject(shape, colour, size_name, cx, cy, radius, int(depths[j])))
        scene = Scene(size=size, objects=tuple(objects))
        if _visible_enough(scene, render_scene(scene)[2]):
            return scene
    raise RuntimeError("could not place visible shapes in 100 tries; use a larger size")


def _article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _caption(scene: Scene) -> str:
    ordered = sorted(scene.objects, key=lambda o: o.cx)
    described = [_article(f"{o.size} {o.colour} {o.shape}") for o in ordered]
    if len(described) == 1:
        return f"There is one shape: {described[0]}."
    listed = ", ".join(described[:-1]) + " and " + described[-1]
    return f"There are {NUMBER_WORDS[len(described)]} shapes, from left to right: {listed}."


def _occludes(front: int, back: int, scene: Scene, seg: np.ndarray) -> bool:
    """Instance ``front`` visibly covers part of instance ``back``."""
    hidden = shape_mask(scene.objects[back - 1], scene.size) & (seg == front)
    return bool(hidden.any())


def _questions(scene: Scene, seg: np.ndarray) -> dict[str, list[tuple[str, str]]]:
    """Every question the scene answers unambiguously, by kind."""
    objs = scene.objects
    shape_counts = {s: sum(o.shape == s for o in objs) for s in SHAPES}
    out: dict[str, list[tuple[str, str]]] = {k: [] for k in
                                             ("colour", "size", "count", "side", "front")}
    for o in objs:
        if shape_counts[o.shape] == 1:
            out["colour"].append((f"What colour is the {o.shape}?", o.colour))
        out["size"].append((f"Is the {o.name} small or large?", o.size))
    out["count"].append(("How many shapes are there?", NUMBER_WORDS[len(objs)]))
    for colour in COLOURS:
        n = sum(o.colour == colour for o in objs)
        out["count"].append((f"How many {colour} shapes are there?", NUMBER_WORDS[n]))
    for shape in SHAPES:
        out["count"].append((f"How many {shape}s are there?", NUMBER_WORDS[shape_counts[shape]]))
    for i, a in enumerate(objs):
        for j, b in enumerate(objs):
            if i == j:
                continue
            if abs(a.cx - b.cx) >= 0.1 * scene.size:  # clearly apart: no ambiguous answer
                side = "left" if a.cx < b.cx else "right"
                out["side"].append((f"Is the {a.name} to the left or to the right of the "
                                    f"{b.name}?", side))
            front, back = (i, j) if a.depth_mm < b.depth_mm else (j, i)
            if _occludes(front + 1, back + 1, scene, seg):
                out["front"].append((f"Which is in front, the {a.name} or the {b.name}?",
                                     f"the {objs[front].name}"))
    return {k: v for k, v in out.items() if v}


_CAPTION_PROMPTS = ("Describe the image.", "What is in the picture?",
                    "Describe the shapes in the image.")


def scene_conversation(scene: Scene, seg: np.ndarray, rng: np.random.Generator) -> list[dict]:
    """LLaVA turns: a caption, then one to three questions of distinct kinds."""
    prompt = _CAPTION_PROMPTS[int(rng.integers(len(_CAPTION_PROMPTS)))]
    turns = [{"from": "human", "value": "<image>\n" + prompt},
             {"from": "gpt", "value": _caption(scene)}]
    by_kind = _questions(scene, seg)
    kinds = sorted(by_kind)
    num = min(len(kinds), int(rng.integers(1, 4)))
    for k in rng.choice(len(kinds), size=num, replace=False):
        options = by_kind[kinds[int(k)]]
        question, answer = options[int(rng.integers(len(options)))]
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return turns


def _text_only_conversation(rng: np.random.Generator) -> list[dict]:
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    first, second, mixed = _MIXES[int(rng.integers(len(_MIXES)))]
    facts = [(f"How many corners does a {shape} have?", _CORNERS[shape]),
             (f"What colour do you get by mixing {first} and {second}?", mixed),
             ("Which shape is round?", "the circle")]
    turns = []
    for k in rng.choice(len(facts), size=int(rng.integers(1, 3)), replace=False):
        question, answer = facts[int(k)]
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return turns


def synth_sample(seed: int, index: int, *, split: str = "train", size: int = 128,
                 max_objects: int = 4, text_only_fraction: float = 0.05):
    """(entry, arrays) of sample ``index``: ``arrays`` is None for a text-only sample, else
    (image, depth, seg) from ``render_scene``. The entry's image/depth/seg paths are relative
    to the dataset folder (``images/``, ``depth/``, ``seg/``)."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    sample_id = f"{split}-{index:06d}"
    if rng.random() < text_only_fraction:
        return {"id": sample_id, "conversations": _text_only_conversation(rng)}, None
    scene = sample_scene(rng, size=size, max_objects=max_objects)
    arrays = render_scene(scene)
    entry = {
        "id": sample_id,
        "image": f"images/{sample_id}.png",
        "depth": f"depth/{sample_id}.png",
        "seg": f"seg/{sample_id}.png",
        "conversations": scene_conversation(scene, arrays[2], rng),
        "scene": scene.as_dict(),
    }
    return entry, arrays


def _write_range(task: tuple) -> list[dict]:
    """Generate and write samples [start, stop) of a split; returns their entries."""
    out_dir, split, start, stop, options = task
    entries = []
    for index in range(start, stop):
        entry, arrays = synth_sample(options["seed"], index, split=split, size=options["size"],
                                     max_objects=options["max_objects"],
                                     text_only_fraction=options["text_only_fraction"])
        if arrays is not None:
            image, depth, seg = arrays
            # compress_level=1: 3x faster than the default and still lossless; the bytes are
            # a pure function of the arrays, so the same seed gives the same files.
            Image.fromarray(image).save(out_dir / entry["image"], compress_level=1)
            Image.fromarray(depth).save(out_dir / entry["depth"], compress_level=1)
            Image.fromarray(seg).save(out_dir / entry["seg"], compress_level=1)
        entries.append(entry)
    return entries


def _generate_split(out_dir: Path, split: str, num: int, options: dict, workers: int):
    chunk = 256
    tasks = [(out_dir, split, s, min(s + chunk, num), options) for s in range(0, num, chunk)]
    if workers > 1 and len(tasks) > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_write_range, tasks)
    else:
        parts = [_write_range(t) for t in tasks]
    entries = [e for part in parts for e in part]
    with (out_dir / f"{split}.jsonl").open("w", encoding="utf-8") as f:
        for entry in entries:
            f.write(json.dumps(entry, ensure_ascii=True) + "\n")
    return entries


def _tokenizer_texts(entries: list[dict]) -> list[str]:
    """Every template's rendering of the conversations, cut at the image placeholder as the
    tokenization cuts it, so the template text and special tokens are learnt too."""
    from .templates import IMAGE_PLACEHOLDER, TEMPLATES, prepare_turns, render

    texts = []
    for entry in entries:
        has_image = bool(entry.get("image"))
        turns = prepare_turns(entry["conversations"], has_image)
        for name in TEMPLATES:
            chosen = turns[:2] if name == "plain" else turns
            texts += render(name, chosen).text.split(IMAGE_PLACEHOLDER)
    return [t for t in texts if t]


def write_synthetic_dataset(
    out_dir: str | Path,
    num: int,
    *,
    num_val: int = 0,
    seed: int = 0,
    size: int = 128,
    max_objects: int = 4,
    text_only_fraction: float = 0.05,
    vocab_size: int = 512,
    workers: int = 1,
    overwrite: bool = False,
) -> dict:
    """Write the synthetic dataset in LLaVA layout and return its ``meta.json`` content.

    ``out_dir/train.jsonl`` (and ``val.jsonl`` with ``num_val``), ``images/``, ``depth/``
    (uint16 PNG, millimetres), ``seg/`` (uint8 PNG, instance index), ``tokenizer/`` (a BPE
    trained on the conversations rendered with every template, with the templates' special
    tokens; load it with ``AutoTokenizer.from_pretrained``) and ``meta.json``.
    """
    # Every option is checked before anything is written (a bad one found half way would
    # leave a partial dataset that the next run refuses without --overwrite).
    for name, value, low in (("num", num, 1), ("num_val", num_val, 0), ("size", size, 32),
                             ("workers", workers, 1), ("vocab_size", vocab_size, 64)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    most = len(COLOURS) * len(SHAPES)
    if isinstance(max_objects, bool) or not isinstance(max_objects, int) or \
            not 1 <= max_objects <= most:
        raise ValueError(f"max_objects must be an int in [1, {most}], got {max_objects!r}")
    if not 0.0 <= text_only_fraction <= 1.0:
        raise ValueError(f"text_only_fraction must be in [0, 1], got {text_only_fraction!r}")
    out = Path(out_dir)
    if (out / "train.jsonl").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a dataset (train.jsonl); pass overwrite=True "
                              "(--overwrite) to replace it")
    for sub in ("images", "depth", "seg"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    options = {"seed": seed, "size": size, "max_objects": max_objects,
               "text_only_fraction": text_only_fraction}
    train = _generate_split(out, "train", num, options, workers)
    val = _generate_split(out, "val", num_val, options, workers) if num_val else []
    from .tokenizer import train_tokenizer

    train_tokenizer(_tokenizer_texts(train[:5000]), vocab_size=vocab_size,
                    save_dir=out / "tokenizer")
    meta = {
        "generator": "olavlm.data.synthetic", "version": 1, "seed": seed, "image_size": size,
        "max_objects": max_objects, "text_only_fraction": text_only_fraction,
        "num_train": len(train), "num_val": len(val),
        "num_text_only": sum("image" not in e for e in train + val),
        "colours": COLOURS, "shapes": list(SHAPES), "sizes": SIZES,
        "depth": "uint16 PNG, millimetres from the camera",
        "seg": "uint8 PNG, 0 = background, k = entry['scene']['objects'][k - 1]",
        "tokenizer": "tokenizer/", "vocab_size": vocab_size,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return meta
