# Image decoding (modes, EXIF, corrupt files) and the encoder/teacher views' sizes and values.
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from datahelpers import random_image
from PIL import Image, UnidentifiedImageError

from olavlm.data.images import CLIP_MEAN, CLIP_STD, ImageView, load_image, tower_view


def _png(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _clip_norm(rgb) -> torch.Tensor:
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    return (torch.tensor(rgb, dtype=torch.float32) / 255 - mean) / std


@pytest.mark.parametrize("mode, make, expected", [
    ("L", lambda: Image.new("L", (4, 3), 77), (77, 77, 77)),
    ("1", lambda: Image.new("1", (4, 3), 1), (255, 255, 255)),
    ("P", lambda: Image.new("RGB", (4, 3), (10, 200, 30)).convert(
        "P", palette=Image.Palette.ADAPTIVE), (10, 200, 30)),
    ("RGBA", lambda: Image.new("RGBA", (4, 3), (10, 20, 30, 0)), (255, 255, 255)),
    ("RGBA-opaque", lambda: Image.new("RGBA", (4, 3), (10, 20, 30, 255)), (10, 20, 30)),
    ("LA", lambda: Image.new("LA", (4, 3), (40, 0)), (255, 255, 255)),
    ("CMYK", lambda: Image.new("CMYK", (4, 3), (0, 0, 0, 0)), (255, 255, 255)),
    ("I;16", lambda: Image.fromarray(np.full((3, 4), 65535, dtype=np.uint16)), (255, 255, 255)),
    # A dark 16-bit image stays dark whatever its peak (255 of 65535 is ~0.4% grey, not white).
    ("I;16-dark", lambda: Image.fromarray(np.full((3, 4), 255, dtype=np.uint16)), (1, 1, 1)),
    ("I;16-dark-256", lambda: Image.fromarray(np.full((3, 4), 256, dtype=np.uint16)), (1, 1, 1)),
    ("F", lambda: Image.fromarray(np.full((3, 4), 0.5, dtype=np.float32)), (128, 128, 128)),
])
def test_load_image_gives_rgb_for_any_mode(mode, make, expected):
    image = make()
    fmt = "TIFF" if image.mode in ("CMYK", "F") else "PNG"
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    out = load_image(buf.getvalue())
    assert out.mode == "RGB" and out.size == (4, 3)
    assert tuple(np.asarray(out)[1, 2]) == expected


def test_palette_transparency_is_composited_over_white():
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 255] + [0, 255, 0] * 255)
    image.putpixel((1, 0), 1)
    out = load_image(_png(image, transparency=0))
    assert np.asarray(out).tolist() == [[[255, 255, 255], [0, 255, 0]]]


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (60, 40), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 10))  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95, exif=exif)
    out = np.asarray(load_image(buf.getvalue()))
    assert out.shape == (60, 40, 3)  # width and height swapped
    top_right = out[2:8, -8:-2].reshape(-1, 3).mean(0)
    assert top_right[0] > 200 and top_right[2] < 60  # the red block moved to the top-right


def test_missing_and_corrupt_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="image file not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(FileNotFoundError, match="a folder, not an image file"):
        load_image(tmp_path)  # an "image" field naming a folder
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    with pytest.raises(FileNotFoundError, match="a broken or looping symbolic link"):
        load_image(tmp_path / "loop.png")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(FileNotFoundError, match=r"broken or looping .*gone.png.*dangling.png"):
        load_image(tmp_path / "dangling.png")
    (tmp_path / "text.png").write_bytes(b"not an image at all")
    with pytest.raises(UnidentifiedImageError):
        load_image(tmp_path / "text.png")
    # From bytes (as the loaders read files): no "<_io.BytesIO object at 0x...>" in the message.
    with pytest.raises(UnidentifiedImageError, match=r"^cannot identify image file \(not an"):
        load_image(b"not an image at all")
    data = _png(random_image(np.random.default_rng(0), 64, 64))
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError):
        load_image(tmp_path / "cut.png")


def test_square_view_matches_transformers_clip_processor():
    try:  # transformers 5 names the PIL backend; 4.x's CLIPImageProcessor is that one
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor

    proc = Processor(size={"shortest_edge": 336},
                                 crop_size={"height": 336, "width": 336})
    rng = np.random.default_rng(0)
    for width, height in ((320, 240), (201, 333), (336, 336)):
        image = random_image(rng, width, height)
        ref = proc(images=image, return_tensors="pt")["pixel_values"][0]
        out = ImageView(336)(image)
        assert out.shape == (3, 336, 336) and out.dtype == torch.float32
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_square_view_centre_crops_the_long_side():
    image = Image.new("RGB", (300, 100), (255, 0, 0))
    image.paste((0, 255, 0), (100, 0, 200, 100))  # middle third green
    out = ImageView(size=50, mean=None, std=None)(image)
    assert out.shape == (3, 50, 50) and out.dtype == torch.uint8
    assert out[:, :, 2:-2].flatten(1).T.unique(dim=0).tolist() == [[0, 255, 0]]


def test_pad_view_fills_with_the_mean_colour():
    image = Image.new("RGB", (100, 50), (255, 255, 255))
    view = ImageView(size=40, aspect="pad")
    assert view.pad_colour() == (122, 116, 104)  # int(CLIP mean * 255), SPEC 1.1
    out = view(image)
    torch.testing.assert_close(out[:, 0, 0], _clip_norm((122, 116, 104)))
    torch.testing.assert_close(out[:, 20, 20], _clip_norm((255, 255, 255)))
    raw = ImageView(size=40, aspect="pad", mean=None, std=None)(image)
    assert raw[:, :8].flatten(1).T.unique(dim=0).tolist() == [[122, 116, 104]]  # top band
    assert raw[:, 12:28].flatten(1).T.unique(dim=0).tolist() == [[255, 255, 255]]


def test_stretch_view_and_blank():
    image = random_image(np.random.default_rng(1), 90, 30)
    out = ImageView(size=24, aspect="stretch", mean=None, std=None)(image)
    assert out.shape == (3, 24, 24) and out.dtype == torch.uint8
    expected = np.asarray(image.resize((24, 24), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    assert out.numpy().tolist() == expected.tolist()
    assert ImageView(8).blank().abs().sum() == 0 and ImageView(8).blank().dtype == torch.float32
    assert ImageView(8, mean=None, std=None).blank().dtype == torch.uint8


def test_tower_view_and_view_arguments():
    assert tower_view("openai/clip-vit-large-patch14-336").size == 336
    big = "laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup-res768"
    assert tower_view(big, aspect="pad") == ImageView(size=768, aspect="pad", crop="round")
    with pytest.raises(ValueError, match="vision_tower must name its input size"):
        tower_view("some-tower")
    with pytest.raises(ValueError, match="aspect must be one of"):
        ImageView(aspect="crop")
    with pytest.raises(ValueError, match="both be given or both be None"):
        ImageView(mean=None)
    with pytest.raises(ValueError, match="size must be a positive int"):
        ImageView(size=0)


def test_a_banner_image_is_refused_before_any_view_is_built():
    """A 2 KB PNG of 1 x 20,000 pixels would become 336 x 6,720,000 (~6.8 GB) once a square
    view resized its short side: load_image refuses it (ValueError, which the loaders report as
    corrupt_image); 100:1 itself still loads."""
    from olavlm.data.images import MAX_ASPECT_RATIO

    with pytest.raises(ValueError, match=r"image 1x20000: aspect ratio above 100:1"):
        load_image(_png(Image.new("L", (1, 20000), 200)))
    with pytest.raises(ValueError, match=r"image 20000x150: aspect ratio"):
        load_image(_png(Image.new("RGB", (20000, 150), (1, 2, 3))))
    edge = load_image(_png(Image.new("RGB", (MAX_ASPECT_RATIO * 3, 3), (9, 8, 7))))
    assert edge.size == (300, 3)
    assert ImageView(size=8)(edge).shape == (3, 8, 8)


def test_a_pad_view_refuses_a_canvas_past_pils_bomb_limit(monkeypatch):
    """The pad view allocates a long-side x long-side canvas: past PIL's decompression-bomb
    bound (2 x MAX_IMAGE_PIXELS) it raises a ValueError naming the canvas, not a MemoryError."""
    image = load_image(_png(Image.new("RGB", (300, 30), (1, 2, 3))))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 300 // 2 - 1)
    with pytest.raises(ValueError, match=r"image 300x30: padding it to a square needs a 300x300"):
        ImageView(size=8, aspect="pad")(image)
    assert ImageView(size=8, aspect="square")(image).shape == (3, 8, 8)  # no canvas: fine
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 300 // 2)
    assert ImageView(size=8, aspect="pad")(image).shape == (3, 8, 8)


def test_a_view_with_a_second_resize():
    """then_size: a second PIL resize (bilinear, stretch) after the first, uint8 between, as an
    image processor's own resize after the seed's; blanks and out_size follow it."""
    rng = np.random.default_rng(0)
    pil = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    view = ImageView(size=24, aspect="stretch", mean=None, std=None, then_size=30)
    want = pil.resize((24, 24), Image.Resampling.BICUBIC).resize((30, 30),
                                                                 Image.Resampling.BILINEAR)
    got = view(pil)
    assert got.shape == (3, 30, 30) and view.out_size == 30
    assert torch.equal(got, torch.from_numpy(np.array(want)).permute(2, 0, 1))
    assert view.blank().shape == (3, 30, 30)
    assert ImageView(size=24, then_size=None).out_size == 24
    with pytest.raises(ValueError, match="then_size must be None or a positive int, got 0"):
        ImageView(size=24, then_size=0)


def test_convnext_views_crop_as_open_clips_transform():
    """The seed's ConvNeXt tower takes open_clip's transform (torchvision Resize + CenterCrop,
    whose offset rounds half to even); CLIP's processor floors it. 640 x 427 at 768: the long
    side becomes 1151, 383 px to cut, 191 or 192 at the left."""
    from torchvision import transforms

    from olavlm.data.images import tower_view

    rng = np.random.default_rng(1)
    for size in ((640, 427), (427, 640), (333, 300), (512, 512)):
        pil = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        torchvision_view = transforms.Compose([
            transforms.Resize(768, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(768)])(pil)
        want = torch.from_numpy(np.array(torchvision_view)).permute(2, 0, 1)
        view = tower_view("w/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup-res768")
        assert view.crop == "round"
        got = ImageView(size=768, mean=None, std=None, crop=view.crop)(pil)
        assert torch.equal(got, want), size
    floor = ImageView(size=768, mean=None, std=None)(pil.resize((640, 427)))
    rounded = ImageView(size=768, mean=None, std=None, crop="round")(pil.resize((640, 427)))
    assert not torch.equal(floor, rounded)  # the premise: the two rules differ here
    assert tower_view("openai/clip-vit-large-patch14-336").crop == "floor"
    with pytest.raises(ValueError, match="ImageView.crop must be one of"):
        ImageView(crop="ceil")


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK", "RGBA"])
def test_plain_modes_decode_as_the_seeds_pil_convert(mode):
    """The seed decodes with Image.open(path).convert('RGB'); ours differs only for EXIF
    rotation, transparency and 16-bit data (docs/data.md): RGB, L, CMYK and opaque RGBA files
    give the seed's pixels."""
    rng = np.random.default_rng(2)
    rgb = Image.fromarray(rng.integers(0, 256, (19, 23, 3), dtype=np.uint8))
    image = rgb.convert(mode)
    if mode == "RGBA":
        image.putalpha(255)
    data = io.BytesIO()
    image.save(data, format="TIFF" if mode == "CMYK" else "PNG")
    seed = Image.open(io.BytesIO(data.getvalue())).convert("RGB")
    ours = load_image(data.getvalue())
    assert ours.mode == "RGB"
    assert np.array_equal(np.asarray(ours), np.asarray(seed)), mode
