# Training with the real (tiny random-weight) teachers online: teachers.resize device | host.
from __future__ import annotations

import math

import pytest
import torch
from teacherhelpers import TINY_SHAPES

from olavlm.config import resolve_config
from olavlm.train.metrics import read_metrics
from olavlm.train.trainer import Trainer


def _cfg(tmp_path, synth_dir, weights, resize, *extra):
    depth_tokens, depth_dim = TINY_SHAPES["depth"]
    seg_dim, grid, _ = TINY_SHAPES["seg"]
    gen_dim = TINY_SHAPES["gen"][1]
    return resolve_config("demo", None, [
        f"train.output_dir={tmp_path / 'runs'}", f"data.synthetic_dir={synth_dir}",
        "data.synthetic_num=16", "data.batch_size=4", "train.max_steps=2",
        "checkpoint.every_steps=0", "logging.progress=false", "logging.plot=false",
        "teachers.names=depth,seg,gen", f"teachers.resize={resize}",
        *(f"teachers.weights.{k}={v}" for k, v in weights.items()),
        f"model.heads.depth.num_queries={depth_tokens}",
        f"model.heads.depth.output_dim={depth_dim}",
        f"model.heads.depth.target_shape=[{depth_tokens},{depth_dim}]",
        f"model.heads.seg.num_queries={grid * grid}", f"model.heads.seg.output_dim={seg_dim}",
        f"model.heads.seg.target_shape=[{seg_dim},{grid},{grid}]",
        f"model.heads.gen.output_dim={gen_dim}", f"model.heads.gen.target_shape=[1,{gen_dim}]",
        *extra,
    ])


@pytest.mark.parametrize("resize", ["device", "host"])
def test_trains_with_the_image_teachers_online(tmp_path, tmp_path_factory, tiny_weights, resize):
    """The depth, seg and gen teachers run on each training batch: "device" hands them the
    decoded images (resized batched on the device), "host" the loader workers' PIL views
    (the seed's pixels), and no decoded copy travels beside them."""
    synth_dir = tmp_path_factory.mktemp("synth")
    weights = {k: str(v) for k, v in tiny_weights.items()}
    # (device: the gen teacher computes in bf16 by teachers.dtype, the others in their fp32
    # CPU default, and its bf16 targets train the fp32 heads)
    extra = ["teachers.dtype.gen=bf16"] if resize == "device" else []
    trainer = Trainer(_cfg(tmp_path, synth_dir, weights, resize, *extra))
    names = {t.name for t in trainer.teachers.teachers}
    assert names == {"depth", "seg", "gen"}
    dtypes = {t.name: t.dtype for t in trainer.teachers.teachers}
    assert dtypes == {"depth": torch.float32, "seg": torch.float32,
                      "gen": torch.bfloat16 if extra else torch.float32}
    if resize == "host":
        assert set(trainer.dataset.teacher_views) == names
        assert not trainer.dataset.keep_raw_image
    else:
        assert trainer.dataset.teacher_views == {} and trainer.dataset.keep_raw_image
    batch = next(iter(trainer.loader))
    if resize == "host":
        assert batch.raw_images is None
        for t in trainer.teachers.teachers:
            size = t.host_view().out_size
            assert batch.teacher_views[t.name].shape[-2:] == (size, size)
    result = trainer.train()
    rows = read_metrics(result.run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for task in ("ntp", "depth", "seg", "gen"):
        assert all(math.isfinite(r[task]) and r[task] > 0 for r in rows), (task, rows)


def test_resize_is_checked(tmp_path):
    with pytest.raises(ValueError, match=r"teachers.resize: expected one of device, host, "
                                         r"got 'gpu'"):
        resolve_config("demo", None, ["teachers.resize=gpu"])


@pytest.mark.parametrize("override,message", [
    ("teachers.dtype.seg=bf16", r"teachers.dtype names 'seg', which is not one of "
                                r"teachers.names \['synthetic'\]"),
    ("teachers.dtype.synthetic=fp8", r"teachers.dtype.synthetic must be one of \['bf16', "
                                     r"'fp16', 'fp32'\], got 'fp8'"),
    ("teachers.names=syntetic", r"teachers.names: 'syntetic' is not a teacher \(did you mean "
                                r"'synthetic'\?\); the teachers: \["),
    # (an unknown name is reported before the weights of a known one are looked for)
    ("teachers.names=depth,foo", r"teachers.names: 'foo' is not a teacher; the teachers"),
    ("teachers.weights.seg=/w", r"teachers.weights names 'seg', which is not one of "
                                r"teachers.names \['synthetic'\]"),
])
def test_teacher_dtype_is_checked(tmp_path, override, message):
    from types import SimpleNamespace

    from olavlm.train.build import build_teachers_for

    cfg = resolve_config("demo", None, [f"train.output_dir={tmp_path}", override])
    model = SimpleNamespace(tasks=("depth", "seg", "gen"))  # (checked before any teacher is built)
    with pytest.raises(ValueError, match=message):
        build_teachers_for(cfg, model, torch.device("cpu"))


@pytest.mark.slow
def test_a_run_with_image_teachers_online_resumes_exactly(tmp_path, tmp_path_factory,
                                                          tiny_weights):
    """Stopped after its step-2 checkpoint and resumed, a run whose targets come from the
    image teachers online logs the uninterrupted run's numbers (the teachers hold no state a
    checkpoint would have to carry)."""
    synth_dir = tmp_path_factory.mktemp("synth")
    weights = {k: str(v) for k, v in tiny_weights.items()}
    common = ("train.max_steps=4", "checkpoint.every_steps=2", "data.shuffle=true")
    full = Trainer(_cfg(tmp_path / "a", synth_dir, weights, "device", *common))
    full.train()
    want = {r["step"]: r for r in read_metrics(full.run_dir)}

    class Stop(RuntimeError):
        pass

    first = Trainer(_cfg(tmp_path / "b", synth_dir, weights, "device", *common,
                         "train.run_name=job"))
    save = first.save_checkpoint

    def save_then_stop():
        path = save()
        if first.step == 2:
            raise Stop
        return path

    first.save_checkpoint = save_then_stop
    with pytest.raises(Stop):
        first.train()
    resumed = Trainer(_cfg(tmp_path / "b", synth_dir, weights, "device", *common,
                           "train.run_name=job"))
    assert resumed.step == 2
    resumed.train()
    got = {r["step"]: r for r in read_metrics(resumed.run_dir)}
    for step in (3, 4):
        for key in ("loss", "ntp", "depth", "seg", "gen", "grad_norm"):
            assert got[step][key] == want[step][key], (step, key)


@pytest.mark.gpu
def test_side_stream_training_equals_inline(tmp_path, tmp_path_factory, tiny_weights):
    """teachers.side_stream=true: the teachers run beside the vision tower and the LLM forward
    and the model waits for them before its losses; the run logs the inline run's numbers (a
    missing wait would read targets the side stream had not written yet)."""
    synth_dir = tmp_path_factory.mktemp("synth")
    weights = {k: str(v) for k, v in tiny_weights.items()}
    runs = {}
    for side in ("false", "true"):
        trainer = Trainer(_cfg(tmp_path / side, synth_dir, weights, "device", "train.device=cuda",
                               "train.max_steps=3", f"teachers.side_stream={side}"))
        assert (trainer.teachers.side_stream is not None) == (side == "true")
        runs[side] = {r["step"]: r for r in read_metrics(trainer.train().run_dir)}
    for step in (1, 2, 3):
        for key in ("loss", "depth", "seg", "gen"):
            assert math.isclose(runs["true"][step][key], runs["false"][step][key],
                                rel_tol=1e-5), (step, key)
    assert runs["true"][1]["teachers/peak_mib"] > 0  # the first call measured inline
