# The synthetic dataset: determinism, exact depth/seg, answers that follow from the pixels, CLI.
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from olavlm.cli import main
from olavlm.data import IMAGE_TOKEN_INDEX, TEMPLATES, ImageView, LlavaDataset, ResumableLoader
from olavlm.data.synthetic import (
    COLOURS,
    FLOOR_DEPTH_MM,
    NUMBER_WORDS,
    Scene,
    SceneObject,
    shape_mask,
    synth_sample,
    write_synthetic_dataset,
)

REPO = Path(__file__).resolve().parents[2]


def _entries(folder: Path, split: str = "train") -> list[dict]:
    return [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]


def _scene(entry: dict) -> Scene:
    objects = [SceneObject(o["shape"], o["colour"], o["size"], *o["center"], o["radius"],
                           o["depth_mm"]) for o in entry["scene"]["objects"]]
    return Scene(size=entry["scene"]["size"], objects=tuple(objects))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_synthetic_dataset(a, 12, num_val=3, size=48, seed=11, workers=1)
    # A bigger run in several processes: its first 12 samples are the same files.
    write_synthetic_dataset(b, 300, num_val=3, size=48, seed=11, workers=2)
    write_synthetic_dataset(c, 12, num_val=3, size=48, seed=12, workers=1)
    files_a, files_b = _files(a), _files(b)
    for name, data in files_a.items():
        if name.startswith(("images/", "depth/", "seg/", "val.jsonl")):
            assert files_b[name] == data, name
    assert _entries(b)[:12] == _entries(a)
    again = tmp_path / "again"
    write_synthetic_dataset(again, 12, num_val=3, size=48, seed=11, workers=1)
    assert _files(again) == files_a  # tokenizer and meta included
    assert _entries(c) != _entries(a)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_synthetic_dataset(a, 12, size=48)


def test_crowded_scenes_have_words_for_their_counts():
    from olavlm.data.synthetic import SHAPES

    most = len(COLOURS) * len(SHAPES)  # the most objects a scene may hold
    assert len(NUMBER_WORDS) == most + 1
    texts = [json.dumps(synth_sample(0, i, size=64, max_objects=most,
                                     text_only_fraction=0.0)[0]) for i in range(12)]
    assert any(word in text for text in texts for word in NUMBER_WORDS[7:])


def test_depth_and_segmentation_match_the_drawn_scene(synth_dir):
    checked = 0
    for entry in _entries(synth_dir) + _entries(synth_dir, "val"):
        if "image" not in entry:
            continue
        scene = _scene(entry)
        image = np.asarray(Image.open(synth_dir / entry["image"]))
        depth = np.asarray(Image.open(synth_dir / entry["depth"])).astype(np.int64)
        seg = np.asarray(Image.open(synth_dir / entry["seg"]))
        size = scene.size
        # Expected maps from the scene description alone: the nearest covering shape wins.
        nearest = np.full((size, size), np.iinfo(np.int64).max)
        owner = np.zeros((size, size), dtype=np.int64)
        for k, obj in enumerate(scene.objects, start=1):
            mask = shape_mask(obj, size) & (obj.depth_mm < nearest)
            nearest[mask], owner[mask] = obj.depth_mm, k
        assert (seg == owner).all()
        rows = (np.arange(size) + 0.5) / size
        floor = np.rint(FLOOR_DEPTH_MM[0] + (FLOOR_DEPTH_MM[1] - FLOOR_DEPTH_MM[0]) * rows)
        expected_depth = np.where(owner > 0, nearest, floor[:, None])
        assert (depth == expected_depth).all()
        for k, obj in enumerate(scene.objects, start=1):
            assert (seg == k).sum() >= 12  # every shape is visible
            assert (image[seg == k] == COLOURS[obj.colour]).all()
        assert (image[seg == 0][:, 0] == image[seg == 0][:, 1]).all()  # grey floor
        checked += 1
    assert checked >= 30


def _answer_from_pixels(question: str, scene: Scene, seg: np.ndarray) -> str | None:
    """Answer the question from the segmentation map and the scene's objects."""
    names = {o.name: k for k, o in enumerate(scene.objects, start=1)}
    if question == "How many shapes are there?":
        return NUMBER_WORDS[len(np.unique(seg[seg > 0]))]
    if question.startswith("Which is in front"):
        a, b = question.removeprefix("Which is in front, the ").rstrip("?").split(" or the ")
        ka, kb = names[a], names[b]
        return f"the {a}" if scene.objects[ka - 1].depth_mm < scene.objects[kb - 1].depth_mm \
            else f"the {b}"
    if question.startswith("Is the") and "left or" in question:
        a, b = question.removeprefix("Is the ").rstrip("?").split(
            " to the left or to the right of the ")
        xa = np.nonzero(shape_mask(scene.objects[names[a] - 1], scene.size))[1].mean()
        xb = np.nonzero(shape_mask(scene.objects[names[b] - 1], scene.size))[1].mean()
        return "left" if xa < xb else "right"
    if question.startswith("What colour is the"):
        shape = question.removeprefix("What colour is the ").rstrip("?")
        (k,) = [k for name, k in names.items() if name.endswith(" " + shape)]
        return scene.objects[k - 1].colour
    return None


def test_answers_follow_from_the_scene_and_are_not_guessable(synth_dir):
    kinds, answers = Counter(), Counter()
    for i in range(200):
        entry, arrays = synth_sample(5, i, size=64)
        if arrays is None:
            assert "image" not in entry and entry["conversations"][0]["from"] == "human"
            kinds["text-only"] += 1
            continue
        scene, seg = _scene(entry), arrays[2]
        turns = entry["conversations"]
        assert turns[0]["value"].startswith("<image>\n") and len(turns) % 2 == 0
        for q, a in zip(turns[2::2], turns[3::2], strict=True):
            expected = _answer_from_pixels(q["value"], scene, seg)
            if expected is not None:
                assert a["value"] == expected, q["value"]
            kind = " ".join(q["value"].split()[:2])
            kinds[kind] += 1
            answers[(kind, a["value"])] += 1
    assert kinds["text-only"] > 0 and kinds["Which is"] > 10 and kinds["What colour"] > 10
    # A blind guess does poorly: no question kind has one dominant answer.
    left, right = answers[("Is the", "left")], answers[("Is the", "right")]
    assert min(left, right) > 0.3 * max(left, right)
    colours = [answers[("What colour", c)] for c in COLOURS]
    assert min(colours) > 0


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_its_tokenizer_loads_and_reads_every_sample(synth_dir, template):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(synth_dir / "tokenizer"))
    assert tokenizer.pad_token_id is not None and tokenizer.bos_token_id is not None
    for special in TEMPLATES[template].special_tokens:
        assert len(tokenizer(special, add_special_tokens=False).input_ids) == 1
    if template == "plain":  # plain takes one question and answer: use the caption turn only
        lines = [json.loads(x) for x in (synth_dir / "train.jsonl").read_text().splitlines()]
        for e in lines:
            e["conversations"] = e["conversations"][:2]
        path = synth_dir.parent / "plain.jsonl"
        path.write_text("".join(json.dumps(e) + "\n" for e in lines))
    else:
        path = synth_dir / "train.jsonl"
    ds = LlavaDataset(path, tokenizer, template=template, image_view=ImageView(size=32),
                      image_folder=synth_dir, keep_raw_image=False)
    loader = ResumableLoader(ds, batch_size=16, shuffle=False)
    batches = list(loader)
    assert "0 rejected" in loader.last_summary
    assert sum(len(b) for b in batches) == 40
    mask = [m for b in batches for m in b.image_mask.tolist()]
    has_img = [(b.input_ids[r] == IMAGE_TOKEN_INDEX).any().item() for b in batches
               for r in range(len(b))]
    assert mask == [int(h) for h in has_img] and 0 in mask and 1 in mask
    # The stand-in a rank runs for a batch rejected whole before it had one (the trainer's
    # _empty_batch): one text-only row under this template, nothing to learn from.
    stand_in = loader.stand_in_batch()
    assert stand_in.stand_in and stand_in.sample_ids == ["stand-in"]
    assert stand_in.input_ids.shape[0] == 1 and stand_in.attention_mask.sum() > 2
    assert not (stand_in.input_ids == IMAGE_TOKEN_INDEX).any()
    assert bool((stand_in.labels == -100).all()) and int(stand_in.image_mask.sum()) == 0
    assert stand_in.images.shape[1:] == batches[0].images.shape[1:]


def test_cli_synth_in_process_and_as_module(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "a"), "--num", "6", "--size", "48",
                 "--workers", "1", "--num-val", "2"]) == 0
    assert "wrote 6 train + 2 val samples" in capsys.readouterr().out
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["num_train"] == 6 and meta["image_size"] == 48
    # A bad option is refused before anything is written.
    for option, value, message in (("--max-objects", "0", "--max-objects must be"),
                                   ("--vocab-size", "3", "--vocab-size must be"),
                                   ("--text-only-fraction", "2", "--text-only-fraction")):
        assert main(["data", "synth", "--out", str(tmp_path / "bad"), "--num", "6",
                     "--workers", "1", option, value]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "olavlm", "data", "synth", "--out",
                           str(tmp_path / "b"), "--num", "4", "--size", "48"],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "b" / "tokenizer" / "tokenizer.json").is_file()
    assert len(_entries(tmp_path / "b")) == 4


def _qa_tensors(num: int, split: str):
    from olavlm.data.images import ImageView

    view = ImageView(size=32, aspect="stretch")
    images, questions, answers = [], [], []
    for i in range(num):
        entry, arrays = synth_sample(0, i, split=split, size=64, text_only_fraction=0.0)
        pixels = view(Image.fromarray(arrays[0]))
        turns = entry["conversations"]
        for q, a in zip(turns[2::2], turns[3::2], strict=True):
            images.append(pixels)
            questions.append(q["value"].lower().rstrip("?").replace(",", "").split())
            answers.append(a["value"])
    return torch.stack(images), questions, answers


def test_a_tiny_model_learns_to_answer_better_than_a_blind_guess():
    # A stand-in for the VLM: a small CNN for the image, a bag of words for the question, and
    # a classifier over the answers. After a few hundred steps its held-out accuracy beats the
    # best guess from the question alone, so the answers are learnt from the pixels.
    train_x, train_q, train_a = _qa_tensors(800, "train")
    val_x, val_q, val_a = _qa_tensors(200, "val")
    words = {w: i for i, w in enumerate(sorted({w for q in train_q + val_q for w in q}))}
    labels = {a: i for i, a in enumerate(sorted(set(train_a + val_a)))}

    def bags(questions):
        out = torch.zeros(len(questions), len(words))
        for row, q in enumerate(questions):
            out[row, [words[w] for w in q]] = 1.0
        return out

    train_b, val_b = bags(train_q), bags(val_q)
    train_y = torch.tensor([labels[a] for a in train_a])
    val_y = torch.tensor([labels[a] for a in val_a])
    cnn = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3, 2, 1),
        torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64 * 8 * 8, 256))
    text = torch.nn.Linear(len(words), 256)
    head = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, len(labels)))
    params = [*cnn.parameters(), *text.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=2e-3)

    def logits(x, b):
        t = text(b)
        return head(cnn(x) * torch.sigmoid(t) + t)

    def accuracy() -> float:
        with torch.no_grad():
            return (logits(val_x, val_b).argmax(1) == val_y).float().mean().item()

    before = accuracy()
    for _ in range(250):
        idx = torch.randint(0, len(train_y), (64,))
        loss = torch.nn.functional.cross_entropy(logits(train_x[idx], train_b[idx]),
                                                 train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = accuracy()
    by_question: dict[str, Counter] = {}
    for q, a in zip(train_q, train_a, strict=True):
        by_question.setdefault(" ".join(q), Counter())[a] += 1
    blind = np.mean([by_question.get(" ".join(q), Counter({"": 1})).most_common(1)[0][0] == a
                     for q, a in zip(val_q, val_a, strict=True)])
    assert after > before + 0.3
    assert after > blind + 0.08, (after, blind)


def test_cli_check_reports_bad_samples(synth_dir, tmp_path, capsys):
    common = ["--tokenizer", str(synth_dir / "tokenizer"), "--workers", "0", "--image-size", "32"]
    assert main(["data", "check", str(synth_dir / "val.jsonl"), *common]) == 0
    assert "8 samples used, 0 rejected" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    lines = (synth_dir / "val.jsonl").read_text().splitlines()
    bad.write_text("\n".join(lines[:3] + ["{not json"]) + "\n")
    rejects = tmp_path / "rejects.jsonl"
    args = ["data", "check", str(bad), "--image-folder", str(synth_dir), "--rejects",
            str(rejects), *common]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "malformed_json=1" in out
    assert json.loads(rejects.read_text())["location"] == f"{bad}:4"
    # where it is, on the screen too (the first few; with or without the file)
    assert f"first 1 of 1 rejects (all in {rejects}):\n  {bad}:4: " in out
    assert main(args[:-2 - len(common)] + common) == 1
    assert f"(--rejects FILE lists all):\n  {bad}:4: sample " in capsys.readouterr().out
    assert main(args) == 1  # a second check replaces the file, not appends to it
    assert len(rejects.read_text().splitlines()) == 1
