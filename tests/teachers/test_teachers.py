# Teachers: shapes and dtypes (tiny and real sizes), batched == per image, loading, registry.
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from teacherhelpers import (
    CLIP_REAL,
    DEPTH_REAL,
    DEPTH_TINY,
    SWIN_REAL,
    TINY_SHAPES,
    clip_model,
    depth_model,
    random_images,
)

from olavlm.data.images import ImageView
from olavlm.teachers import (
    DepthTeacher,
    GenTeacher,
    SegTeacher,
    SyntheticTeacher,
    Teacher,
    TeacherWeightsNotFound,
    build_teacher,
    build_teachers,
    device_view,
    register_teacher,
)
from olavlm.teachers.depth import seed_position_embeddings
from olavlm.teachers.registry import TEACHERS

LOADERS = {"depth": DepthTeacher, "seg": SegTeacher, "gen": GenTeacher}
# Mixed sizes: a landscape photo, a portrait one and a repeat of the first size, so the batched
# path groups them and puts rows back in order.
SIZES = [(48, 64), (90, 70), (48, 64)]


@pytest.fixture(scope="module")
def teachers(tiny_weights):
    return {name: cls.load(tiny_weights[name]) for name, cls in LOADERS.items()}


def test_output_shapes_and_dtypes(teachers, tiny_weights):
    images = random_images(SIZES)
    for name, teacher in teachers.items():
        out = teacher(images)
        assert list(out) == [name]
        assert out[name].shape == (3, *TINY_SHAPES[name]) and out[name].dtype == torch.float32
        assert teacher.target_shapes() == {name: TINY_SHAPES[name]}
        assert torch.isfinite(out[name]).all()
    # bf16 (the GPU default) on the CPU too: the output keeps the compute dtype.
    bf16 = DepthTeacher.load(tiny_weights["depth"], dtype=torch.bfloat16)
    out = bf16(images)["depth"]
    assert out.dtype == torch.bfloat16 and out.shape == (3, *TINY_SHAPES["depth"])
    ref = teachers["depth"](images)["depth"]
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_real_shapes_on_the_meta_device():
    """SPEC 3's shapes at the real sizes, without computing anything (meta tensors)."""
    from transformers import Dinov2Backbone, Dinov2Config, SwinBackbone, SwinConfig

    with torch.device("meta"):
        depth = DepthTeacher(Dinov2Backbone(Dinov2Config(**DEPTH_REAL)), device="meta")
        seg = SegTeacher(SwinBackbone(SwinConfig(**SWIN_REAL)), device="meta")
        gen = GenTeacher(clip_model(CLIP_REAL), device="meta")
    # The accelerator defaults are the seed's: DeepSpeed cast depth and seg to bf16, the unCLIP
    # pipe (not a registered module) stayed fp16 (SPEC 3).
    assert depth.dtype == seg.dtype == torch.bfloat16 and gen.dtype == torch.float16
    # seed_compat resampled the 37 x 37 position table to 24 x 24 once, at load.
    assert depth.backbone.embeddings.position_embeddings.shape == (1, 577, 1024)
    for teacher, size, shape in ((depth, 336, (576, 1024)), (seg, 800, (1536, 24, 24)),
                                 (gen, 224, (1, 1024))):
        pixels = torch.empty(2, 3, size, size, device="meta", dtype=teacher.dtype)
        with torch.inference_mode():
            out = teacher.encode(pixels)[teacher.name]
        assert out.shape == (2, *shape) and out.dtype == teacher.dtype
        assert teacher.target_shapes()[teacher.name] == shape


def test_batched_equals_one_image_at_a_time(teachers):
    images = random_images(SIZES, seed=1)
    for name, teacher in teachers.items():
        batched = teacher(images)[name]
        for i, image in enumerate(images):
            single = teacher([image])[name][0]
            torch.testing.assert_close(batched[i], single, atol=2e-5, rtol=1e-4, msg=name)
        # Chunked forwards (max_batch) give the same rows.
        teacher.max_batch = 2
        try:
            torch.testing.assert_close(teacher(images)[name], batched, atol=2e-5, rtol=1e-4)
        finally:
            teacher.max_batch = None


def test_host_views_are_only_normalized(teachers):
    """The loader's PIL view (B, 3, S, S) at the teacher's size goes straight to the model.
    For seg it is both of the seed's PIL resizes (768 bicubic, then the processor's 800
    bilinear, uint8 between): its exact pixels (the 800 step ran on the device before)."""
    from PIL import Image

    from olavlm.teachers.base import IMAGENET_MEAN, IMAGENET_STD, normalize

    images = random_images(SIZES, seed=2)
    for name, teacher in teachers.items():
        view = teacher.host_view()
        pils = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
        host = torch.stack([view(p) for p in pils])
        assert host.dtype == torch.uint8 and host.shape[-1] == view.out_size
        out = teacher(host)[name]
        if name == "seg":
            seed = torch.stack([torch.from_numpy(np.array(
                p.resize((768, 768), Image.Resampling.BICUBIC).resize(
                    (800, 800), Image.Resampling.BILINEAR))).permute(2, 0, 1) for p in pils])
            assert torch.equal(host, seed)
            with torch.inference_mode():
                ref = teacher.encode(normalize(seed.float(), IMAGENET_MEAN, IMAGENET_STD,
                                               teacher.dtype))[name]
        else:
            ref = teacher(list(host))[name]
        torch.testing.assert_close(out, ref, atol=0, rtol=0)
        # The device resize is close to PIL's, so the targets are close too.
        device = teacher(images)[name]
        assert (device - out).abs().mean() < 0.05 * out.abs().mean(), name


def test_device_view_matches_pil_within_a_few_levels():
    from PIL import Image

    image = random_images([(480, 640)], seed=3)[0]
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    for size, aspect, worst in ((336, "stretch", 1), (224, "square", 1), (768, "stretch", 3)):
        ref = ImageView(size, aspect, None, None)(pil).float()
        got = device_view([image], size, aspect, device="cpu")[0]
        diff = (got - ref).abs()
        assert diff.max() <= worst and diff.mean() < 0.3, (size, aspect)


def test_depth_seed_compat_is_bgr():
    torch.manual_seed(0)
    # A table already at the 24 x 24 grid, so seed_compat changes the channel order only.
    backbone = depth_model(DEPTH_TINY | {"image_size": 336}).backbone
    compat = DepthTeacher(backbone, seed_compat=True)
    plain = DepthTeacher(backbone, seed_compat=False)
    image = random_images([(40, 50)], seed=4)[0]
    torch.testing.assert_close(compat([image])["depth"], plain([image.flip(0)])["depth"],
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(compat([image])["depth"], plain([image])["depth"])


def test_seed_position_embedding_resampling():
    torch.manual_seed(0)
    table = torch.randn(1, 1 + 37 * 37, 8)
    out = seed_position_embeddings(table, 24)
    assert out.shape == (1, 577, 8) and torch.equal(out[:, 0], table[:, 0])
    # Close to, but not the same as, transformers' size-based resampling.
    grid = table[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
    hf = torch.nn.functional.interpolate(grid, size=(24, 24), mode="bicubic",
                                         align_corners=False).permute(0, 2, 3, 1).reshape(1, -1, 8)
    diff = (out[:, 1:] - hf).abs().max()
    assert 0 < diff < table.abs().max()
    with pytest.raises(ValueError, match="square"):
        seed_position_embeddings(torch.zeros(1, 11, 4), 3)


def test_teachers_are_frozen_and_stay_in_eval(teachers):
    for teacher in teachers.values():
        teacher.train()
        assert not teacher.training and all(not m.training for m in teacher.modules())
        assert all(not p.requires_grad for p in teacher.parameters())
        assert teacher.param_bytes() > 0


def test_missing_weights_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    with pytest.raises(TeacherWeightsNotFound, match="hf download depth-anything") as err:
        DepthTeacher.load(tmp_path / "nowhere")
    assert "--weights depth=DIR" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherWeightsNotFound, match="no config.json"):
        SegTeacher.load(tmp_path / "empty")
    with pytest.raises(TeacherWeightsNotFound, match="local hub cache.*image_encoder"):
        GenTeacher.load()  # the default repository id: not in this (empty) cache
    assert isinstance(TeacherWeightsNotFound("x"), FileNotFoundError)


def test_loading_variants(tmp_path, tiny_weights, teachers):
    images = random_images(SIZES[:1], seed=5)
    # gen: the image encoder's own folder, and an fp16-only variant file.
    encoder_dir = tiny_weights["gen"] / "image_encoder"
    direct = GenTeacher.load(encoder_dir)
    torch.testing.assert_close(direct(images)["gen"], teachers["gen"](images)["gen"])
    fp16_dir = tmp_path / "fp16"
    clip = GenTeacher.load(encoder_dir).encoder
    clip.half().save_pretrained(fp16_dir, variant="fp16")
    assert (fp16_dir / "model.fp16.safetensors").is_file()
    assert GenTeacher.load(fp16_dir)(images)["gen"].shape == (1, *TINY_SHAPES["gen"])
    # seg: a OneFormerForUniversalSegmentation checkpoint (keys under "model.").
    universal = tmp_path / "universal"
    universal.mkdir()
    weights = load_file(tiny_weights["seg"] / "model.safetensors")
    save_file({f"model.{k}": v for k, v in weights.items()}, universal / "model.safetensors",
              metadata={"format": "pt"})
    config = json.loads((tiny_weights["seg"] / "config.json").read_text())
    config["architectures"] = ["OneFormerForUniversalSegmentation"]
    (universal / "config.json").write_text(json.dumps(config))
    torch.testing.assert_close(SegTeacher.load(universal)(images)["seg"],
                               teachers["seg"](images)["seg"])


def test_bad_inputs_name_the_argument(teachers):
    depth = teachers["depth"]
    with pytest.raises(ValueError, match=r"images\[1\] must be a \(3, H, W\) uint8"):
        depth([torch.zeros(3, 8, 8, dtype=torch.uint8), torch.zeros(3, 8, 8)])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\) uint8"):
        depth(torch.zeros(2, 4, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="at least one sample"):
        depth([])
    with pytest.raises(ValueError, match="needs images"):
        depth(None)
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        DepthTeacher(depth.backbone, input_size=300)
    with pytest.raises(ValueError, match="dtype must be"):
        DepthTeacher(depth.backbone, dtype=torch.int8)
    with pytest.raises(ValueError, match="device must be a torch device .* got 'bogus'"):
        SyntheticTeacher(device="bogus")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA"):
            SyntheticTeacher(device="cuda:0")


def test_cli_extract_bad_device_is_one_line(teacher_synth_dir, tmp_path, capsys):
    from olavlm.cli import main

    assert main(["targets", "extract", "--data", str(teacher_synth_dir / "train.jsonl"),
                 "--teachers", "synthetic", "--out", str(tmp_path / "c"),
                 "--device", "bogus"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("olavlm targets extract: --device must be") and "Traceback" not in err
    assert not (tmp_path / "c").exists()


def test_registry(tiny_weights):
    built = build_teachers("depth,gen", {"depth": tiny_weights["depth"],
                                         "gen": tiny_weights["gen"]})
    assert [t.name for t in built] == ["depth", "gen"]
    assert isinstance(build_teacher("synthetic"), Teacher)
    with pytest.raises(ValueError, match="teacher must be one of"):
        build_teacher("sam")
    with pytest.raises(ValueError, match="both produce the 'depth' target"):
        build_teachers("depth,synthetic", {"depth": str(tiny_weights["depth"])})
    with pytest.raises(ValueError, match="not used"):
        build_teachers("synthetic", "depth=/x")
    with pytest.raises(ValueError, match="depth=DIR"):
        build_teachers("depth", "depth")
    # Per-teacher dtypes over the one for all (and each teacher's default where unnamed).
    paths = {"depth": tiny_weights["depth"], "gen": tiny_weights["gen"]}
    depth, gen = build_teachers("depth,gen", paths, dtypes="gen=bf16")
    assert (depth.dtype, gen.dtype) == (torch.float32, torch.bfloat16)
    assert next(gen.parameters()).dtype == torch.bfloat16
    depth, gen = build_teachers("depth,gen", paths, dtype=torch.float16,
                                dtypes={"depth": torch.bfloat16})
    assert (depth.dtype, gen.dtype) == (torch.bfloat16, torch.float16)
    with pytest.raises(ValueError, match=r"dtypes name teachers that are not used: \['seg'\]"):
        build_teachers("depth", paths["depth"] and {"depth": paths["depth"]}, dtypes="seg=bf16")
    with pytest.raises(ValueError, match=r"dtypes must give each teacher one of \['bf16', "
                                         r"'fp16', 'fp32'\], got 'fp8' for 'gen'"):
        build_teachers("gen", {"gen": paths["gen"]}, dtypes={"gen": "fp8"})
    with pytest.raises(ValueError, match="dtypes must look like 'gen=fp16,depth=bf16'"):
        build_teachers("gen", {"gen": paths["gen"]}, dtypes="gen")
    register_teacher("tiny_synthetic", lambda path, **kw: build_teacher("synthetic", **kw))
    try:
        assert build_teacher("tiny_synthetic", grid=4).target_shapes()["seg"] == (1536, 4, 4)
    finally:
        del TEACHERS["tiny_synthetic"]
