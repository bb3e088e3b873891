# Teacher targets against SPEC section 3, recomputed from scratch from the raw models.
"""Each test recomputes a teacher's target from SPEC section 3's words alone: the seed's
preprocessing with PIL and numpy in float64 (cross-checked against transformers' own PIL image
processors where the seed used one), then the raw transformers model in float64, and holds the
teacher (fp32, loaded from a saved folder, fed the uint8 host views of the loader) to it. For
each teacher another test perturbs it the way a plausible bug would and checks that the
comparison catches that, so the tolerance is not loose enough to hide one.

test_teachers.py checks shapes, dtypes and batched == one image at a time; this file checks
the numbers.
"""
from __future__ import annotations

import copy
import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from teacherhelpers import clip_model, depth_model, oneformer_model, random_images

from olavlm.teachers import DepthTeacher, GenTeacher, SegTeacher

# The seed's constants, spelled out here rather than imported from olavlm.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])

# A landscape photo, a portrait one (odd centre-crop offsets for gen) and one already at the
# depth size.
SIZES = [(120, 160), (150, 100), (336, 336)]
# fp32 teacher against the float64 reference, relative to max |reference|; the perturbed
# teachers must miss it by far more (NEGATIVE).
TOL = 1e-4
NEGATIVE = 1e-2

# Depth: a narrow DINOv2 with DINOv2-L's 24 blocks, 518 px table (37 x 37 positions) and
# Depth-Anything-V2-L's out_indices, so the block choice and the 37 -> 24 resampling are
# SPEC's.
DEPTH_CFG = dict(hidden_size=32, num_hidden_layers=24, num_attention_heads=2,
                 intermediate_size=64, image_size=518, patch_size=14, layerscale_value=1.0,
                 out_indices=[5, 12, 18, 24], apply_layernorm=True, reshape_hidden_states=False)
DEPTH_BLOCKS = (4, 11, 17, 23)  # SPEC 3: get_intermediate_layers(n=[4, 11, 17, 23]), 0-based
SWIN_CFG = dict(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1],
                num_heads=[1, 1, 2, 2], window_size=4,
                out_features=["stage1", "stage2", "stage3", "stage4"])
CLIP_CFG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, image_size=224, patch_size=14, projection_dim=24)


def _pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def _to_chw64(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).double()


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


def _host_views(teacher, images) -> torch.Tensor:
    """What the loader hands the teacher with ``teachers.resize=host``."""
    view = teacher.host_view()
    return torch.stack([view(_pil(im)) for im in images])


def _pil_processor(model: str, name: str):
    """transformers' PIL-based image processor class (the seed's): ``<name>Pil`` in recent
    releases, the plain (slow) ``<name>`` before those."""
    try:
        module = importlib.import_module(f"transformers.models.{model}.image_processing_pil_"
                                         f"{model}")
        return getattr(module, f"{name}Pil")
    except (ImportError, AttributeError):
        import transformers

        return getattr(transformers, name)


def _randomize(module, seed: int) -> None:
    """Weights with some spread (the init's 0.02 makes every block's output almost equal to
    its input, so a wrong block would hardly show)."""
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        for m in module.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                m.weight.normal_(0.0, m.weight[0].numel() ** -0.5)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.1)
            elif isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)


# --------------------------------------------------------------------------------- depth

@pytest.fixture(scope="module")
def depth_folder(tmp_path_factory):
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = depth_model(DEPTH_CFG)
    backbone = model.backbone
    _randomize(backbone, seed=2)
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(3)
        backbone.embeddings.position_embeddings.normal_(0.0, 1.0)
        backbone.embeddings.cls_token.normal_(0.0, 1.0)
    folder = tmp_path_factory.mktemp("spec-depth")
    model.save_pretrained(folder)
    return folder


def _raw_depth_backbone(folder):
    from transformers import DepthAnythingForDepthEstimation

    return DepthAnythingForDepthEstimation.from_pretrained(str(folder)).backbone.double().eval()


def depth_pixels(images) -> torch.Tensor:
    """SPEC 3 depth preprocessing, float64: PIL ``resize((336, 336))`` (its default filter,
    bicubic; aspect not kept), ``np.array``, ``cv2.cvtColor(BGR2RGB)`` of an RGB array (so BGR),
    /255, infer_image's keep-aspect resize to a multiple of 14 (336 -> 336: cv2 copies), ImageNet
    mean/std."""
    out = []
    for im in images:
        arr = np.array(_pil(im).resize((336, 336))).astype(np.float64)
        arr = arr[..., ::-1] / 255.0
        out.append(_to_chw64((arr - IMAGENET_MEAN) / IMAGENET_STD))
    return torch.stack(out)


def depth_reference(raw, pixels: torch.Tensor) -> torch.Tensor:
    """DINOv2 run block by block from the raw weights, float64: patch embedding, CLS, the
    position table resampled as the DINOv2 repository does (bicubic, ``scale_factor = (24 +
    0.1) / 37``, no antialias), the 24 blocks; the outputs of 0-based blocks 4, 11, 17, 23
    through the final LayerNorm, CLS dropped, averaged."""
    emb = raw.embeddings
    proj = emb.patch_embeddings.projection
    patch = proj.kernel_size[0]
    with torch.no_grad():
        tokens = F.conv2d(pixels, proj.weight, proj.bias, stride=patch).flatten(2).transpose(1, 2)
        grid = pixels.shape[-1] // patch
        table = emb.position_embeddings
        side = int(round((table.shape[1] - 1) ** 0.5))
        dim = table.shape[-1]
        scale = (grid + 0.1) / side
        pos = F.interpolate(table[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2),
                            scale_factor=(scale, scale), mode="bicubic", antialias=False)
        assert pos.shape[-2:] == (grid, grid)
        pos = torch.cat([table[:, :1], pos.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)], 1)
        hidden = torch.cat([emb.cls_token.expand(len(pixels), -1, -1), tokens], 1) + pos
        outputs = []
        for block in raw.encoder.layer:
            hidden = block(hidden)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            outputs.append(hidden)
        norm = raw.layernorm
        maps = [F.layer_norm(outputs[i], (dim,), norm.weight, norm.bias, norm.eps)[:, 1:]
                for i in DEPTH_BLOCKS]
    assert len(outputs) == 24
    return sum(maps) / len(maps)


def test_depth_target_is_spec_3(depth_folder):
    images = random_images(SIZES, seed=21)
    pixels = depth_pixels(images)
    ref = depth_reference(_raw_depth_backbone(depth_folder), pixels)
    assert ref.shape == (3, 576, 32)
    teacher = DepthTeacher.load(depth_folder)  # seed_compat=True, fp32 on the CPU
    # The loader's host views give the seed's exact pixels: the whole path from uint8 images.
    host = _host_views(teacher, images)
    with torch.inference_mode():
        torch.testing.assert_close(teacher.preprocess(host).double(), pixels, atol=1e-6, rtol=0)
    assert _rel_err(teacher(host)["depth"], ref) < TOL
    # The model part alone, on the reference's pixels.
    with torch.inference_mode():
        got = teacher.encode(pixels.float())["depth"]
    assert _rel_err(got, ref) < TOL


def test_depth_reference_catches_wrong_blocks_and_rgb(depth_folder):
    """Negative checks: out_indices read as 0-based block numbers (one block early each), the
    network fed RGB (seed_compat=False), and transformers' position resampling all miss the
    reference by far."""
    from transformers import Dinov2Backbone, Dinov2Config

    images = random_images(SIZES[:2], seed=22)
    pixels = depth_pixels(images)
    raw = _raw_depth_backbone(depth_folder)
    ref = depth_reference(raw, pixels)
    wrong = Dinov2Backbone(Dinov2Config(**DEPTH_CFG | {"out_indices": list(DEPTH_BLOCKS)}))
    wrong.load_state_dict(copy.deepcopy(raw).float().state_dict())
    teacher = DepthTeacher(wrong)
    assert _rel_err(teacher(_host_views(teacher, images))["depth"], ref) > NEGATIVE
    rgb = DepthTeacher.load(depth_folder, seed_compat=False)
    host = _host_views(rgb, images)
    assert _rel_err(rgb(host)["depth"], ref) > NEGATIVE
    # BGR input but transformers' size=(24, 24) resampling of the position table: the seed's
    # (24 + 0.1) / 37 scale factor shows too.
    assert _rel_err(rgb(host.flip(1))["depth"], ref) > NEGATIVE


# ----------------------------------------------------------------------------------- seg

@pytest.fixture(scope="module")
def seg_folder(tmp_path_factory):
    with torch.random.fork_rng():
        torch.manual_seed(4)
        model = oneformer_model(SWIN_CFG)
    _randomize(model.pixel_level_module.encoder, seed=5)
    folder = tmp_path_factory.mktemp("spec-seg")
    model.save_pretrained(folder)
    return folder


def seg_pixels(images) -> torch.Tensor:
    """SPEC 3 seg preprocessing, float64: PIL ``resize((768, 768))`` (default filter,
    bicubic), then the OneFormer processor's defaults: shortest edge 800 (so 800 x 800) with
    PIL bilinear, /255, ImageNet mean/std."""
    out = []
    for im in images:
        view = _pil(im).resize((768, 768)).resize((800, 800), Image.Resampling.BILINEAR)
        arr = np.array(view).astype(np.float64) / 255.0
        out.append(_to_chw64((arr - IMAGENET_MEAN) / IMAGENET_STD))
    return torch.stack(out)


def seg_reference(folder, pixels: torch.Tensor) -> torch.Tensor:
    """The Swin backbone of the saved OneFormer, float64: ``encoder(pixel_values)
    .feature_maps[-1]`` (stride 32: 25 x 25 at 800 px), bilinearly resized to 24 x 24 with
    ``align_corners=False``."""
    from transformers import OneFormerModel

    model = OneFormerModel.from_pretrained(str(folder)).double().eval()
    with torch.no_grad():
        last = model.pixel_level_module.encoder(pixels).feature_maps[-1]
    assert last.shape[-2:] == (25, 25)
    return F.interpolate(last, size=(24, 24), mode="bilinear", align_corners=False)


def test_seg_preprocessing_is_the_oneformer_processor():
    """The hand-written preprocessing above is what the seed's OneFormerProcessor computes
    (transformers' PIL image processor, its defaults)."""
    processor = _pil_processor("oneformer", "OneFormerImageProcessor")()
    images = random_images(SIZES[:2], seed=23)
    views = [_pil(im).resize((768, 768)) for im in images]
    got = processor(images=views, task_inputs=["panoptic"] * len(views),
                                       return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(got.double(), seg_pixels(images), atol=2e-6, rtol=0)


def test_seg_target_is_spec_3(seg_folder):
    images = random_images(SIZES, seed=24)
    pixels = seg_pixels(images)
    ref = seg_reference(seg_folder, pixels)
    teacher = SegTeacher.load(seg_folder)
    assert ref.shape == (3, teacher.channels, 24, 24)
    host = _host_views(teacher, images)  # both PIL resizes, uint8 between
    with torch.inference_mode():
        torch.testing.assert_close(teacher.preprocess(host).double(), pixels, atol=1e-6, rtol=0)
    assert _rel_err(teacher(host)["seg"], ref) < TOL


def test_seg_reference_catches_a_wrong_final_resize(seg_folder, monkeypatch):
    """Negative check: the 25 -> 24 resize with align_corners=True misses the reference."""
    import olavlm.teachers.seg as seg_module

    images = random_images(SIZES[:2], seed=25)
    ref = seg_reference(seg_folder, seg_pixels(images))
    teacher = SegTeacher.load(seg_folder)
    host = _host_views(teacher, images)
    assert _rel_err(teacher(host)["seg"], ref) < TOL
    interpolate = F.interpolate

    def corners(x, *args, **kwargs):
        return interpolate(x, *args, **(kwargs | {"align_corners": True}))

    # Only the teacher module's name is rebound (its ``F``), not torch's function.
    monkeypatch.setattr(seg_module, "F", type("F", (), {"interpolate": staticmethod(corners)}))
    assert _rel_err(teacher(host)["seg"], ref) > NEGATIVE


# ----------------------------------------------------------------------------------- gen

@pytest.fixture(scope="module")
def gen_folder(tmp_path_factory):
    with torch.random.fork_rng():
        torch.manual_seed(6)
        model = clip_model(CLIP_CFG)
    _randomize(model, seed=7)
    folder = tmp_path_factory.mktemp("spec-gen")
    model.save_pretrained(folder / "image_encoder")  # laid out as the unCLIP pipeline
    return folder


def gen_pixels(images) -> torch.Tensor:
    """SPEC 3 gen preprocessing (unCLIP's CLIPImageProcessor), float64: the short side to 224
    with PIL bicubic (the long side ``int(224 * long / short)``), centre crop 224 (offset
    ``(new - 224) // 2``), /255, CLIP mean/std."""
    out = []
    for im in images:
        pil = _pil(im)
        width, height = pil.size
        short, long = min(width, height), max(width, height)
        new_long = int(224 * long / short)
        new = (224, new_long) if width <= height else (new_long, 224)
        pil = pil.resize(new, Image.Resampling.BICUBIC)
        left, top = (new[0] - 224) // 2, (new[1] - 224) // 2
        arr = np.array(pil.crop((left, top, left + 224, top + 224))).astype(np.float64) / 255.0
        out.append(_to_chw64((arr - CLIP_MEAN) / CLIP_STD))
    return torch.stack(out)


def gen_reference(folder, pixels: torch.Tensor) -> torch.Tensor:
    """``CLIPVisionModelWithProjection(...).image_embeds`` of the saved encoder, float64,
    as (B, 1, projection_dim)."""
    from transformers import CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection.from_pretrained(str(folder / "image_encoder"))
    with torch.no_grad():
        return model.double().eval()(pixel_values=pixels).image_embeds[:, None]


def test_gen_preprocessing_is_the_clip_processor():
    """The hand-written preprocessing is unCLIP's feature extractor (CLIPImageProcessor:
    shortest edge 224, bicubic, centre crop 224, CLIP mean/std; transformers' PIL one)."""
    images = random_images(SIZES, seed=26)
    processor = _pil_processor("clip", "CLIPImageProcessor")(
        size={"shortest_edge": 224}, crop_size=224, resample=3)
    got = processor(images=[_pil(im) for im in images], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(got.double(), gen_pixels(images), atol=2e-6, rtol=0)


def test_gen_target_is_spec_3(gen_folder):
    images = random_images(SIZES, seed=27)
    pixels = gen_pixels(images)
    ref = gen_reference(gen_folder, pixels)
    teacher = GenTeacher.load(gen_folder)
    assert ref.shape == (3, 1, 24)
    host = _host_views(teacher, images)
    with torch.inference_mode():
        torch.testing.assert_close(teacher.preprocess(host).double(), pixels, atol=1e-6, rtol=0)
    assert _rel_err(teacher(host)["gen"], ref) < TOL


def test_gen_reference_catches_imagenet_normalization(gen_folder, monkeypatch):
    """Negative check: the ImageNet mean/std (the other teachers') instead of CLIP's."""
    import olavlm.teachers.gen as gen_module

    images = random_images(SIZES[:2], seed=28)
    ref = gen_reference(gen_folder, gen_pixels(images))
    teacher = GenTeacher.load(gen_folder)
    host = _host_views(teacher, images)
    assert _rel_err(teacher(host)["gen"], ref) < TOL
    monkeypatch.setattr(gen_module, "CLIP_MEAN", tuple(IMAGENET_MEAN))
    monkeypatch.setattr(gen_module, "CLIP_STD", tuple(IMAGENET_STD))
    assert _rel_err(teacher(host)["gen"], ref) > NEGATIVE

