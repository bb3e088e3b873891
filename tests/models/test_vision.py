# Vision towers: tiny real-architecture towers saved and reloaded, parity with HF / open_clip.
from __future__ import annotations

import json
import os

# Never reach for a hub: every tower here loads from a local folder.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from olavlm.models.vision import (  # noqa: E402
    VISION_TOWERS,
    ClipVisionTower,
    ConvNextVisionTower,
    SiglipVisionTower,
    VisionTower,
    build_tiny_vision_tower,
    build_vision_tower,
    name_with_image_size,
    tower_kind,
)

KINDS = sorted(VISION_TOWERS)
# Tiny towers (build_tiny_vision_tower defaults): 4-block ViTs at 48 px with 8 px patches,
# 6 x 6 = 36 tokens of width 32; a convnext_atto trunk at 128 px, 4 x 4 = 16 tokens of 320.
TINY = {"clip": (48, 36, 32), "siglip": (48, 36, 32), "convnext": (128, 16, 320)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    return {kind: build_tiny_vision_tower(kind, root) for kind in KINDS}


@pytest.fixture(scope="module")
def towers(tiny):
    return {kind: build_vision_tower(tiny[kind], dtype=torch.float32) for kind in KINDS}


def normalized_images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """What the data pipeline gives the tower: CLIP-normalized pixels of smooth random images."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, size // 8, size // 8, generator=g)
    pixels = nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")
    mean = torch.tensor([0.481, 0.458, 0.408]).view(1, 3, 1, 1)
    std = torch.tensor([0.269, 0.261, 0.276]).view(1, 3, 1, 1)
    return (pixels - mean) / std


def test_shapes_and_attributes(towers):
    for kind, tower in towers.items():
        size, tokens, width = TINY[kind]
        assert isinstance(tower, VISION_TOWERS[kind]) and tower.kind == kind
        assert (tower.image_size, tower.num_tokens, tower.hidden_size) == TINY[kind]
        # Batch 3: an odd batch, nothing aligned.
        out = tower(normalized_images(3, size))
        assert out.shape == (3, tokens, width) and out.dtype == torch.float32
        assert out.is_contiguous() and torch.isfinite(out).all()
        assert len(tower.mean) == len(tower.std) == 3
    assert towers["siglip"].mean == (0.5, 0.5, 0.5)  # from its preprocessor_config.json
    assert towers["clip"].mean[0] == pytest.approx(0.48145466)


@pytest.mark.parametrize("select_layer,select_feature,num_blocks", [
    (-2, "patch", 3),      # the seed's default: the output of the second-to-last block
    (-1, "cls_patch", 4),  # every block, with the CLS token
    (1, "patch", 1),       # a positive index: the output of block 1
    (-5, "patch", 0),      # hidden_states[0]: the embeddings after pre_layrnorm, no block
])
def test_clip_equals_hf_hidden_states(tiny, select_layer, select_feature, num_blocks):
    from transformers import CLIPVisionModel

    tower = build_vision_tower(tiny["clip"], select_layer=select_layer,
                               select_feature=select_feature, dtype=torch.float32)
    full = CLIPVisionModel.from_pretrained(tiny["clip"], local_files_only=True).eval()
    images = normalized_images(2, 48, seed=1)
    with torch.no_grad():
        states = full(images, output_hidden_states=True).hidden_states
    expected = states[select_layer] if select_feature == "cls_patch" else \
        states[select_layer][:, 1:]
    torch.testing.assert_close(tower(images), expected, rtol=0, atol=0)
    assert len(full.encoder.layers) == 4
    assert len(tower.vision_tower.encoder.layers) == tower.num_blocks == num_blocks
    assert tower.num_tokens == 36 + (select_feature == "cls_patch")


def test_siglip_equals_hf_hidden_states(tiny, towers):
    from transformers import SiglipVisionModel

    full = SiglipVisionModel.from_pretrained(tiny["siglip"], local_files_only=True).eval()
    images = normalized_images(2, 48, seed=2)
    with torch.no_grad():
        expected = full(images, output_hidden_states=True).hidden_states[-2]  # no CLS token
    tower = towers["siglip"]
    torch.testing.assert_close(tower(images), expected, rtol=0, atol=0)
    assert len(tower.vision_tower.encoder.layers) == 3 < len(full.encoder.layers)
    assert not hasattr(tower.vision_tower, "head")  # the pooling head is dropped


def test_convnext_equals_open_clip_forward_features(tiny, towers, tmp_path):
    import open_clip

    untouched = open_clip.create_model(f"local-dir:{tiny['convnext']}").eval()
    images = normalized_images(2, 128, seed=3)
    with torch.no_grad():
        grid = untouched.visual.trunk.forward_features(images)  # stem, stages, norm_pre
    expected = grid.flatten(2).transpose(1, 2)
    tower = towers["convnext"]
    torch.testing.assert_close(tower(images), expected, rtol=0, atol=0)
    # The blocks matter (random layer-scale gammas, not timm's 1e-6): the output is not just the
    # stem and downsampling convolutions.
    trunk = tower.vision_tower
    with torch.no_grad():
        x = trunk.stem(images)
        for stage in trunk.stages:
            x = stage.downsample(x)
    assert (x.flatten(2).transpose(1, 2) - expected).abs().max() > 0.1 * expected.abs().max()

    # An open_clip model name plus a checkpoint file (pretrained=<file>).
    model_cfg = json.loads((tiny["convnext"] / "open_clip_config.json").read_text())["model_cfg"]
    config_file = tmp_path / "olavlm_tiny_convnext.json"
    config_file.write_text(json.dumps(model_cfg))
    open_clip.add_model_config(config_file)
    by_name = build_vision_tower(tiny["convnext"] / "open_clip_model.safetensors",
                                 model_name="olavlm_tiny_convnext", dtype=torch.float32)
    assert isinstance(by_name, ConvNextVisionTower) and by_name.image_size == 128
    torch.testing.assert_close(by_name(images), expected, rtol=0, atol=0)

    # The seed's "-res<N>" suffix sets the input size and is stripped to find the folder.
    res96 = build_vision_tower(f"{tiny['convnext']}-res96", dtype=torch.float32)
    assert (res96.image_size, res96.num_tokens) == (96, 9)
    small = normalized_images(1, 96, seed=4)
    with torch.no_grad():
        ref = untouched.visual.trunk.forward_features(small).flatten(2).transpose(1, 2)
    torch.testing.assert_close(res96(small), ref, rtol=0, atol=0)
    # "-interp<N>" (the seed's position-embedding note) does not hide a later "-res<N>"
    both = build_vision_tower(f"{tiny['convnext']}-interp384-res96", dtype=torch.float32)
    assert both.image_size == 96
    with pytest.warns(UserWarning, match="select_layer=-3 is ignored"):
        build_vision_tower(tiny["convnext"], select_layer=-3)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16(tiny, towers, kind):
    size, tokens, width = TINY[kind]
    tower = build_vision_tower(tiny[kind], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in tower.parameters())
    images = normalized_images(2, size, seed=5)  # fp32 in, cast by the tower
    out = tower(images)
    assert out.shape == (2, tokens, width) and out.dtype == torch.bfloat16
    ref = towers[kind](images)
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()
    # bf16 images into an fp32 tower: cast up, fp32 out.
    assert towers[kind](images.bfloat16()).dtype == torch.float32


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_eval_and_no_grad(towers, kind):
    tower = towers[kind]
    size, _, width = TINY[kind]
    projector = nn.Linear(width, 8)
    parent = nn.ModuleDict({"tower": tower, "projector": projector})
    parent.train()
    assert projector.training
    assert not tower.training and all(not m.training for m in tower.modules())
    assert all(not p.requires_grad for p in tower.parameters())
    images = normalized_images(2, size).requires_grad_(True)
    with torch.enable_grad():
        features = tower(images)
        assert not features.requires_grad and features.grad_fn is None
        projector(features).square().mean().backward()  # the projector still trains on them
    assert projector.weight.grad is not None and images.grad is None
    assert all(p.grad is None for p in tower.parameters())


def test_bad_images_raise(towers):
    tower = towers["clip"]
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, 48, 48\).*got \(3, 48, "
                                         r"48\)"):
        tower(torch.zeros(3, 48, 48))
    with pytest.raises(ValueError, match=r"\(B, 3, 48, 48\).*got \(2, 1, 48, 48\)"):
        tower(torch.zeros(2, 1, 48, 48))
    with pytest.raises(ValueError, match=r"\(B, 3, 48, 48\).*got \(2, 3, 64, 64\)"):
        tower(torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, 128, 128\).*got \(2, 3, 96, 96\)"):
        towers["convnext"](torch.zeros(2, 3, 96, 96))
    with pytest.raises(ValueError, match="floating tensor normalized with mean"):
        tower(torch.zeros(2, 3, 48, 48, dtype=torch.uint8))
    with pytest.raises(TypeError, match="images must be a torch.Tensor, got list"):
        tower([torch.zeros(3, 48, 48)])


@pytest.mark.parametrize("name,kind", [
    ("openai/clip-vit-large-patch14-336", "clip"),
    ("laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup-res768", "convnext"),
    ("google/siglip-so400m-patch14-384", "siglip"),
    ("/runs/test_convnext_things/tiny-clip", "clip"),  # the last component decides
    ("/models/clip-vit-l/model", "clip"),              # else the whole path
])
def test_tower_kind(name, kind):
    assert tower_kind(name) == kind


def test_kind_and_argument_errors(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"kind must be one of \['clip', 'convnext', 'siglip'\], "
                                         r"got 'resnet'"):
        build_vision_tower(tiny["clip"], kind="resnet")
    with pytest.raises(ValueError, match=r"of 'resnet50'.*\['clip', 'convnext', 'siglip'\]"):
        tower_kind("resnet50")
    with pytest.raises(ValueError, match=r"select_layer must be an int in \[-5, 4\].*got 5"):
        build_vision_tower(tiny["clip"], select_layer=5)
    with pytest.raises(ValueError, match=r"select_feature must be one of \('patch',\) for the "
                                         r"siglip tower, got 'cls_patch'"):
        build_vision_tower(tiny["siglip"], select_feature="cls_patch")
    with pytest.raises(ValueError, match="dtype must be"):
        build_vision_tower(tiny["clip"], dtype=torch.int8)
    with pytest.raises(ValueError, match="model_name .* is required to load the checkpoint"):
        build_vision_tower(tiny["convnext"] / "open_clip_model.safetensors", kind="convnext")
    with pytest.raises(ValueError, match="hidden_size must be one of"):
        build_tiny_vision_tower("convnext", tmp_path, hidden_size=100)
    with pytest.raises(ValueError, match="kind must be one of"):
        build_tiny_vision_tower("vit", tmp_path)


def test_missing_weights_raise_file_not_found(tiny, tmp_path):
    missing = tmp_path / "nowhere" / "clip-vit-tiny"
    with pytest.raises(FileNotFoundError, match=f"clip vision tower.*{missing}.*neither a local"):
        build_vision_tower(missing)
    # A repository id that is not in the local hub cache: reported, never downloaded.
    with pytest.raises(FileNotFoundError, match="'olavlm-test/siglip-absent'.*local hub cache"):
        build_vision_tower("olavlm-test/siglip-absent")
    empty = tmp_path / "empty-clip"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        build_vision_tower(empty)
    with pytest.raises(FileNotFoundError, match="holds no open_clip_config.json"):
        build_vision_tower(empty, kind="convnext")
    no_weights = tmp_path / "convnext-no-weights"
    no_weights.mkdir()
    (no_weights / "open_clip_config.json").write_text(
        (tiny["convnext"] / "open_clip_config.json").read_text())
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        build_vision_tower(no_weights)


def test_checkpoint_missing_tower_weights_is_an_error(tiny, tmp_path):
    """transformers would initialize a missing weight at random with a log line only."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "clip-broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny["clip"] / "config.json").read_text())
    state = load_file(tiny["clip"] / "model.safetensors")
    dropped = [k for k in state if "vision_model.encoder.layers.1.mlp.fc1" in k]
    assert dropped
    save_file({k: v for k, v in state.items() if k not in dropped},
              str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks 2 weights of the tower"):
        build_vision_tower(broken)
    # A weight of a block cut away (the last one, for select_layer=-2) is not needed.
    last = [k for k in state if "vision_model.encoder.layers.3." in k]
    save_file({k: v for k, v in state.items() if k not in last}, str(broken / "model.safetensors"))
    assert build_vision_tower(broken).num_blocks == 3


def test_real_sizes_on_meta():
    """SPEC 1.1 shapes with the real configs, without weights (meta tensors)."""
    import timm
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    with torch.device("meta"):
        clip = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
            num_attention_heads=16, image_size=336, patch_size=14))  # ViT-L/14-336
        siglip = SiglipVisionModel(SiglipVisionConfig(
            hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
            num_attention_heads=16, image_size=384, patch_size=14))  # so400m-patch14-384
        trunk = timm.create_model("convnext_xxlarge", num_classes=0, global_pool="")
    cases = [(ClipVisionTower(clip), 336, (576, 1024), 23),
             (SiglipVisionTower(siglip), 384, (729, 1152), 26),
             (ConvNextVisionTower(trunk, image_size=768), 768, (576, 3072), None)]
    for tower, size, (tokens, width), blocks in cases:
        out = tower(torch.empty(2, 3, size, size, device="meta"))
        assert out.shape == (2, tokens, width) and (tower.num_tokens, tower.hidden_size) == (
            tokens, width)
        assert out.dtype == torch.bfloat16  # dtype=None off the CPU: bf16
        if blocks is not None:
            assert len(tower.vision_tower.encoder.layers) == blocks


def test_tiny_builder_options(tmp_path):
    path = build_tiny_vision_tower("clip", tmp_path, image_size=64, hidden_size=48,
                                   num_layers=2)
    tower = build_vision_tower(path, select_layer=-1)
    assert isinstance(tower, VisionTower)
    assert (tower.image_size, tower.num_tokens, tower.hidden_size, tower.num_blocks) == (
        64, 64, 48, 2)
    again = build_tiny_vision_tower("clip", tmp_path / "again", image_size=64, hidden_size=48,
                                    num_layers=2)
    images = normalized_images(1, 64)
    torch.testing.assert_close(build_vision_tower(again, select_layer=-1)(images),
                               tower(images), rtol=0, atol=0)  # same seed, same weights


@pytest.mark.parametrize("name, size, want", [
    ("/m/tower", 768, "/m/tower-res768"),
    ("/m/tower/", 64, "/m/tower-res64"),
    ("/m/x-res768/tower-res256", 64, "/m/x-res768/tower-res64"),  # the last component only
    ("laion/CLIP-convnext_xxlarge-soup-res768", 768, "laion/CLIP-convnext_xxlarge-soup-res768"),
    ("tower-interp384", 96, "tower-interp384-res96"),
])
def test_name_with_image_size(name, size, want):
    """The name an export writes for a ConvNeXt tower says its input side, as the seed's do."""
    assert name_with_image_size(name, size) == want
