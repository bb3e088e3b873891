# Online mode: teachers run batched on a loader batch; host views, maps, side stream, compile.
from __future__ import annotations

import traceback

import pytest
import torch
from teacherhelpers import TINY_SHAPES, random_images
from torch.utils._python_dispatch import TorchDispatchMode
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
    # Two teachers of one task: the later one's targets would silently replace the other's.
    with pytest.raises(ValueError, match="teachers 'depth' and 'synthetic' both produce the "
                                         "'depth' target"):
        OnlineTargets([teachers[0], SyntheticTeacher()])
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
    # Called inline (as the trainer calls it) with a side stream configured: still measured.
    inline_with_stream = OnlineTargets(teachers, side_stream=True)
    inline_with_stream(batch)
    assert inline_with_stream.metrics()["teachers/peak_mib"] > 0


@pytest.mark.slow
def test_compiled_teacher_matches_eager(tiny_weights, teacher_synth_dir):
    eager = build_teachers("depth", {"depth": str(tiny_weights["depth"])})
    compiled = build_teachers("depth", {"depth": str(tiny_weights["depth"])})
    batch = _batch(teacher_synth_dir)
    want = OnlineTargets(eager)(batch).targets["depth"]
    got = OnlineTargets(compiled, compile=True)(batch).targets["depth"]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


class _HostToDevice(TorchDispatchMode):
    """What would make a GPU step wait for its stream: a tensor built from Python data
    (``lift_fresh``; on a GPU a blocking host-to-device copy) or a blocking copy from the host
    to another device."""

    def __init__(self):
        super().__init__()
        self.events: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name.startswith("aten.lift_fresh"):
            self.events.append("".join(traceback.format_stack(limit=12)))
        if name in ("aten._to_copy.default", "aten.to.dtype_layout", "aten.to.device") and \
                args[0].device.type == "cpu" and not kwargs.get("non_blocking", False):
            device = kwargs.get("device", args[1] if len(args) > 1 else None)
            if isinstance(device, (str, torch.device)) and torch.device(device).type != "cpu":
                self.events.append(f"{name} -> {device}\n" + "".join(
                    traceback.format_stack(limit=12)))
        return func(*args, **kwargs)


def test_teachers_make_no_blocking_host_to_device_copies(teachers, tiny_weights):
    """Online teachers run inside every training step: a tensor built from host data there
    (the normalization's mean/std, the index of each image-size group) or a blocking copy of
    the maps is a stream sync per call on a GPU (AGENTS.md), which stops the host from
    queueing the LLM's forward ahead."""
    images = random_images([(40, 60), (64, 64), (30, 20), (64, 64)], seed=1)  # 3 size groups
    maps = {"depth_mm": [torch.full((64, 64), 3000, dtype=torch.int32),
                         torch.full((32, 32), 2000, dtype=torch.int32),
                         torch.full((64, 64), 1000, dtype=torch.int32)],
            "seg_class": [torch.zeros(64, 64, dtype=torch.uint8),
                          torch.ones(32, 32, dtype=torch.uint8),
                          torch.full((64, 64), 2, dtype=torch.uint8)]}
    synthetic = SyntheticTeacher(grid=4, depth_dim=32, seg_dim=24, gen_dim=64)
    want = {t.name: t(images)[t.name] for t in teachers}
    want_synthetic = synthetic(maps=maps)
    with _HostToDevice() as mode:
        got = {t.name: t(images)[t.name] for t in teachers}
        got_synthetic = synthetic(maps=maps)
    assert not mode.events, mode.events[0]
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    for name, value in want_synthetic.items():
        assert torch.equal(got_synthetic[name], value), name
    # Rows of each size group land where they belong (per-image calls as the reference).
    for t in teachers:
        single = torch.cat([t([image])[t.name] for image in images])
        torch.testing.assert_close(got[t.name], single, atol=1e-5, rtol=1e-5)
    single = {k: torch.cat([synthetic(maps={m: [v[i]] for m, v in maps.items()})[k]
                            for i in range(3)]) for k in want_synthetic}
    for name, value in single.items():
        assert torch.equal(got_synthetic[name], value), name
    # On another device ("meta" stands in for a GPU here) every copy is non-blocking.
    depth = build_teachers("depth", {"depth": str(tiny_weights["depth"])}, device="meta")[0]
    on_meta = SyntheticTeacher(grid=4, device="meta")
    with _HostToDevice() as mode:
        depth(images)
        on_meta.preprocess(maps=maps)
    assert not mode.events, mode.events[0]


@pytest.mark.gpu
def test_online_teachers_do_not_synchronize_on_cuda(tiny_weights, teacher_synth_dir):
    """The same on a GPU, by CUDA's own account: raw images of several sizes and the synthetic
    teacher's maps, pinned as the training loader pins them."""
    teachers = build_teachers("depth,seg,gen", {k: str(v) for k, v in tiny_weights.items()},
                              device="cuda")
    batch = _batch(teacher_synth_dir, keep_maps=True)
    batch.raw_images[0] = batch.raw_images[0][:, :40, :56].contiguous()  # another size group
    batch = batch.pin_memory()
    for online in (OnlineTargets(teachers), OnlineTargets([SyntheticTeacher(device="cuda")])):
        online(batch)  # warm-up (cuBLAS handles, first allocations, the peak measurement)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            online(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_image_teachers_online_match_the_cache_the_loader_reads(tiny_weights, teacher_synth_dir,
                                                               tmp_path):
    """The same images through the online teachers and through `extract` + the training
    loader: the same targets (to the cache's bf16 rounding: one bf16 step at most, as the
    batches differ), the same mask (text-only samples 0), with a per-teacher dtype on both."""
    weights = {k: str(v) for k, v in tiny_weights.items()}
    teachers = build_teachers("depth,seg,gen", weights, dtypes="gen=bf16")
    assert [t.dtype for t in teachers] == [torch.float32, torch.float32, torch.bfloat16]
    extract_targets(teacher_synth_dir / "train.jsonl", tmp_path / "c",
                    build_teachers("depth,seg,gen", weights, dtypes="gen=bf16"), num_workers=0)
    online = OnlineTargets(teachers)(_batch(teacher_synth_dir))
    cached = _batch(teacher_synth_dir, targets=TargetCache(tmp_path / "c"))
    assert torch.equal(online.mask, cached.target_mask)
    assert 0 < int(cached.target_mask.sum()) < len(cached)
    rows = cached.target_mask.bool()
    for task, value in cached.targets.items():
        assert online.targets[task].dtype == (torch.bfloat16 if task == "gen" else torch.float32)
        torch.testing.assert_close(online.targets[task][rows].bfloat16().float(),
                                   value[rows].float(), atol=1e-6, rtol=2**-7, msg=task)
