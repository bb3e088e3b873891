# Online mode: teachers run batched on a loader batch; host views, maps, side stream, compile.
from __future__ import annotations

import pytest
import torch
from teacherhelpers import TINY_SHAPES
from transformers import AutoTokenizer

from olavlm.data import ImageView, LlavaDataset, ResumableLoader
from olavlm.teachers import (
    OnlineTargets,
    SyntheticTeacher,
    TargetCache,
    build_teachers,
    extract_targets,
)


@pytest.fixture(scope="module")
def teachers(tiny_weights):
    return build_teachers("depth,seg,gen", {k: str(v) for k, v in tiny_weights.items()})


def _batch(folder, **kwargs):
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    dataset = LlavaDataset(folder / "train.jsonl", tokenizer, image_view=ImageView(size=32),
                           **kwargs)
    return next(iter(ResumableLoader(dataset, batch_size=8, shuffle=False)))


def test_online_targets_equal_direct_teacher_calls(teachers, teacher_synth_dir):
    batch = _batch(teacher_synth_dir)
    assert 0 < int(batch.image_mask.sum()) < len(batch)  # text-only samples in there too
    online = OnlineTargets(teachers)
    result = online(batch)
    assert torch.equal(result.mask, batch.image_mask)
    for teacher in teachers:
        direct = teacher(batch.raw_images)[teacher.name]
        got = result.targets[teacher.name]
        assert got.shape == (len(batch), *TINY_SHAPES[teacher.name])
        torch.testing.assert_close(got, direct, atol=0, rtol=0)
    assert online.tasks == TINY_SHAPES
    # Usable as a loss target with autograd (no inference tensors).
    pred = torch.zeros_like(result.targets["depth"], requires_grad=True)
    torch.nn.functional.smooth_l1_loss(pred, result.targets["depth"]).backward()
    assert pred.grad is not None
    metrics = online.metrics()
    assert metrics["teachers/weights_mib"] > 0 and metrics["teachers/ms"] > 0
    assert metrics["teachers/peak_mib"] is None  # CUDA only
    # The loader's host views (PIL, the seed's pixels) are used when present.
    views = _batch(teacher_synth_dir, teacher_views={t.name: t.host_view() for t in teachers})
    hosted = online(views)
    for teacher in teachers:
        torch.testing.assert_close(hosted.targets[teacher.name],
                                   teacher(views.teacher_views[teacher.name])[teacher.name])


def test_synthetic_online_matches_the_cache(teacher_synth_dir, tmp_path):
    batch = _batch(teacher_synth_dir, keep_maps=True)
    online = OnlineTargets([SyntheticTeacher()])
    result = online.submit(batch).wait()
    extract_targets(teacher_synth_dir / "train.jsonl", tmp_path / "c", [SyntheticTeacher()],
                    num_workers=0)
    cache = TargetCache(tmp_path / "c")
    for row, key in enumerate(batch.image_keys):
        if key is None:
            continue
        for task, value in cache.read(key).items():
            assert torch.equal(result.targets[task][row].bfloat16(), value), (key, task)


def test_side_stream_without_cuda_warns_and_runs_inline(teachers, teacher_synth_dir):
    batch = _batch(teacher_synth_dir)
    with pytest.warns(UserWarning, match="side_stream=True needs a CUDA device"):
        online = OnlineTargets(teachers[:1], side_stream=True)
    pending = online.submit(batch)
    assert pending.wait().targets["depth"].shape[0] == len(batch)
    with pytest.raises(TypeError, match="non-empty list of Teacher"):
        OnlineTargets([])
    without = _batch(teacher_synth_dir, keep_raw_image=False)
    with pytest.raises(ValueError, match="raw_images"):
        OnlineTargets(teachers[:1])(without)
    with pytest.raises(ValueError, match="keep_maps"):
        OnlineTargets([SyntheticTeacher()])(without)


@pytest.mark.gpu
def test_side_stream_on_cuda_gives_the_inline_targets(tiny_weights, teacher_synth_dir):
    """The teachers on their own CUDA stream, reading images already on the device: right
    after wait() the step's stream sees the same targets as inline (a wait() that did not wait
    would read them before the side stream wrote them)."""
    teachers = build_teachers("depth,seg,gen", {k: str(v) for k, v in tiny_weights.items()},
                              device="cuda")
    batch = _batch(teacher_synth_dir)
    batch.raw_images = [image.cuda() for image in batch.raw_images]  # submit's stream sync
    inline_runner = OnlineTargets(teachers)
    inline = inline_runner(batch)
    assert inline_runner.metrics()["teachers/peak_mib"] > 0  # measured on the first call
    side = OnlineTargets(teachers, side_stream=True)
    assert side.side_stream is not None
    for _ in range(3):
        got = side.submit(batch).wait()
        for name, value in inline.targets.items():
            assert got.targets[name].device.type == "cuda"
            torch.testing.assert_close(got.targets[name], value, msg=name)
        assert torch.equal(got.mask.cpu(), batch.image_mask)
    metrics = side.metrics()
    assert metrics["teachers/ms"] > 0 and metrics["teachers/peak_mib"] is None


@pytest.mark.slow
def test_compiled_teacher_matches_eager(tiny_weights, teacher_synth_dir):
    eager = build_teachers("depth", {"depth": str(tiny_weights["depth"])})
    compiled = build_teachers("depth", {"depth": str(tiny_weights["depth"])})
    batch = _batch(teacher_synth_dir)
    want = OnlineTargets(eager)(batch).targets["depth"]
    got = OnlineTargets(compiled, compile=True)(batch).targets["depth"]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
