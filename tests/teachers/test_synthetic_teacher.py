# The synthetic teacher: its targets encode the scene's exact depth and layout, recoverably.
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from olavlm.data.synthetic import NUM_CLASSES, load_scene_maps, semantic_class
from olavlm.teachers import SyntheticTeacher
from olavlm.teachers.synthetic import NUM_DEPTH_FEATURES, orthonormal_rows


def _image_entries(folder):
    entries = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    return [e for e in entries if "image" in e]


def _maps(folder, entries):
    loaded = [load_scene_maps(e, folder) for e in entries]
    return {k: [m[k] for m in loaded] for k in ("depth_mm", "seg_class")}


def _features(teacher, target, task):
    """Invert the fixed projection: target @ P.T / gain (P has orthonormal rows)."""
    proj = teacher.projection(task)
    gain = proj.norm(dim=1, keepdim=True)  # each row is unit-norm times the gain
    return target.float() @ (proj / gain.square()).T


def test_targets_reflect_the_maps(teacher_synth_dir):
    entries = _image_entries(teacher_synth_dir)[:6]
    maps = _maps(teacher_synth_dir, entries)
    teacher = SyntheticTeacher()
    out = teacher(maps=maps)
    assert {k: tuple(v.shape[1:]) for k, v in out.items()} == {
        "depth": (576, 1024), "seg": (1536, 24, 24), "gen": (1, 1024)}
    depth_m = torch.stack(maps["depth_mm"]).float().unsqueeze(1) / 1000.0
    onehot = F.one_hot(torch.stack(maps["seg_class"]).long(), NUM_CLASSES).permute(0, 3, 1, 2)
    # Depth: each cell's mean depth comes back from its 1024-d token.
    cells = _features(teacher, out["depth"], "depth")  # (B, 576, 12)
    mean_depth = (cells[..., 0] + 0.5) * 12.0
    expected = F.adaptive_avg_pool2d(depth_m, 24).flatten(1)
    torch.testing.assert_close(mean_depth, expected, atol=1e-4, rtol=1e-5)
    # Seg: each cell's class fractions come back from its 1536 channels.
    fractions = _features(teacher, out["seg"].flatten(2).transpose(1, 2), "seg")
    expected = F.adaptive_avg_pool2d(onehot.float(), 24).flatten(2).transpose(1, 2)
    torch.testing.assert_close(fractions, expected, atol=1e-5, rtol=1e-5)
    # Gen: which shapes the scene holds, and how many.
    scene = _features(teacher, out["gen"][:, 0], "gen")  # (B, 58)
    for b, entry in enumerate(entries):
        objects = entry["scene"]["objects"]
        present = {semantic_class(o["colour"], o["shape"]) for o in objects}
        got = {c for c in range(1, NUM_CLASSES) if scene[b, NUM_CLASSES + c] > 0.5}
        assert got == present
        assert math.isclose(float(scene[b, -1]) * 4, len(objects), abs_tol=1e-4)


def test_targets_do_not_depend_on_the_batch(teacher_synth_dir):
    """The same bits for a sample whatever else is in its batch: a cache extracted in batches
    is read back one sample at a time and compared exactly (a BLAS's blocking, and so its
    summation order, follows the batch size)."""
    entries = _image_entries(teacher_synth_dir)[:7]
    maps = _maps(teacher_synth_dir, entries)
    teacher = SyntheticTeacher()
    together = teacher(maps=maps)
    for i in range(len(entries)):
        alone = teacher(maps={k: v[i:i + 1] for k, v in maps.items()})
        for task, value in together.items():
            assert torch.equal(value[i], alone[task][0]), (i, task)
    empty = teacher.encode({k: v[:0] for k, v in teacher.preprocess(maps=maps).items()})
    assert {k: tuple(v.shape[1:]) for k, v in empty.items()} == teacher.target_shapes()
    assert all(v.shape[0] == 0 for v in empty.values())


def test_a_nearer_shape_changes_only_its_own_cells(teacher_synth_dir):
    entry = _image_entries(teacher_synth_dir)[0]
    maps = load_scene_maps(entry, teacher_synth_dir)
    moved = maps["depth_mm"].clone()
    region = maps["seg_class"] == semantic_class(entry["scene"]["objects"][0]["colour"],
                                                 entry["scene"]["objects"][0]["shape"])
    moved[region] -= 500  # the first shape, half a metre nearer
    teacher = SyntheticTeacher()
    a = teacher(maps={k: [v] for k, v in maps.items()})
    b = teacher(maps={"depth_mm": [moved], "seg_class": [maps["seg_class"]]})
    touched = F.adaptive_max_pool2d(region[None, None].float(), 24).flatten() > 0
    changed = (a["depth"][0] - b["depth"][0]).abs().amax(dim=1) > 1e-5
    assert changed.any() and torch.equal(changed, touched)
    assert torch.equal(a["seg"], b["seg"])  # the layout did not change
    assert not torch.equal(a["gen"], b["gen"])  # a shape's mean depth did


def test_projection_is_fixed_and_orthonormal():
    rows = orthonormal_rows(NUM_DEPTH_FEATURES, 1024, seed=0)
    torch.testing.assert_close(rows @ rows.T, torch.eye(NUM_DEPTH_FEATURES), atol=1e-6, rtol=0)
    assert torch.equal(rows, orthonormal_rows(NUM_DEPTH_FEATURES, 1024, seed=0))
    assert not torch.equal(rows, orthonormal_rows(NUM_DEPTH_FEATURES, 1024, seed=1))
    a, b = SyntheticTeacher(), SyntheticTeacher()
    maps = {"depth_mm": torch.full((2, 32, 32), 3000, dtype=torch.int32),
            "seg_class": torch.zeros(2, 32, 32, dtype=torch.uint8)}
    assert all(torch.equal(a(maps=maps)[k], b(maps=maps)[k]) for k in a.tasks)
    # A text-only sample's blank maps still give finite targets (the loader masks them).
    blank = {"depth_mm": [torch.zeros(8, 8, dtype=torch.int32)],
             "seg_class": [torch.zeros(8, 8, dtype=torch.uint8)]}
    assert all(torch.isfinite(v).all() for v in a(maps=blank).values())


def test_maps_errors(teacher_synth_dir, tmp_path):
    entry = _image_entries(teacher_synth_dir)[0]
    with pytest.raises(ValueError, match="missing \\['depth', 'seg', 'scene'\\]"):
        load_scene_maps({"id": "x"}, teacher_synth_dir)
    with pytest.raises(FileNotFoundError, match="map file not found"):
        load_scene_maps(entry, tmp_path)
    teacher = SyntheticTeacher()
    with pytest.raises(ValueError, match="needs maps"):
        teacher(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="same sizes"):
        teacher(maps={"depth_mm": [torch.zeros(8, 8)], "seg_class": [torch.zeros(9, 9)]})
    with pytest.raises(ValueError, match="seg_dim must be an int >= 19"):
        SyntheticTeacher(seg_dim=4)
