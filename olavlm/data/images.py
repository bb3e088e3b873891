# Image decoding (once, any mode, EXIF-aware) and the encoder / teacher views of SPEC 1.1 and 3.
"""Decode an image once and derive every view from the decoded pixels.

``load_image`` gives an RGB ``PIL.Image`` for any input mode (alpha composited over white, as
transformers' ``convert_to_rgb`` does; 16-bit and float images scaled to 8 bits), with the EXIF
orientation applied; an aspect ratio above ``MAX_ASPECT_RATIO`` is refused (ValueError: a
banner a few pixels high would need gigabytes once its short side is resized). An
``ImageView`` turns it into a tensor:

- ``aspect="square"``: resize the short side to ``size`` (bicubic) and centre-crop ``size``
  (CLIPImageProcessor; open_clip's ``Resize`` + ``CenterCrop`` for ConvNeXt, SPEC 1.1, whose
  crop offset rounds instead of flooring: ``crop="round"``);
- ``aspect="pad"``: expand to a square with the background colour ``int(mean * 255)``, i.e.
  (122, 116, 104) for CLIP (the seed's ``expand2square``), then as ``"square"``;
- ``aspect="stretch"``: resize to ``size`` x ``size`` ignoring the aspect ratio (the seed's
  teacher inputs: ``resize((336, 336))`` for depth, ``(768, 768)`` for seg, SPEC 3).

With ``mean``/``std`` the view is float32 ``(x / 255 - mean) / std``; without, uint8 pixels
(teacher inputs, which the teachers normalize their own way).
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import os
import re
import stat
import time
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = [
    "ASPECTS",
    "CLIP_MEAN",
    "CLIP_STD",
    "MAX_ASPECT_RATIO",
    "READ_ATTEMPTS",
    "ImageProblem",
    "ImageView",
    "expand_to_square",
    "image_digest",
    "load_image",
    "open_image_file",
    "pil_to_uint8",
    "read_image_file",
    "to_rgb",
    "tower_view",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ASPECTS = ("square", "pad", "stretch")

# Longest / shortest side beyond which an image is refused (corrupt_image): a view resizes the
# short side to its size first, so a 1 x 20,000 banner (a 2 KB PNG) would become a 336 x
# 6,720,000 image (~6.8 GB) before the crop. Photos stay far below (panoramas ~10:1).
MAX_ASPECT_RATIO = 100
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _wide_to_l(image: Image.Image) -> Image.Image:
    """16/32-bit integer and float images to 8-bit grey ('L'): PIL's own convert clips them."""
    arr = np.asarray(image, dtype=np.float64)
    peak = float(arr.max()) if arr.size else 0.0
    if image.mode.startswith("I;16"):
        arr = arr * (255.0 / 65535.0)  # declared 16-bit: a dark image stays dark
    elif image.mode == "F" and peak <= 1.0:
        arr = arr * 255.0  # float images in [0, 1]
    elif image.mode == "I" and peak > 255.0:
        arr = arr * (255.0 / 65535.0)  # 32-bit integers of unknown range: 16-bit content
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` in mode RGB: alpha composited over white, wide modes scaled to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_MODES:
        return _wide_to_l(image).convert("RGB")
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _check_is_file(path: Path) -> None:
    # A stat of our own: newer Pythons' Path.is_file returns False for any OSError, which
    # turned a disk's EIO or an NFS ESTALE into "not found" (never retried, wrong reason).
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        mode = None
    except OSError as err:
        if err.errno != errno.ELOOP:  # (a symbolic link loop: named below)
            raise
        mode = None
    if mode is not None and stat.S_ISREG(mode):
        return
    if mode is not None and stat.S_ISDIR(mode):
        what = "a folder, not an image file"
    elif path.is_symlink():  # (the stat follows links: a dangling one or a loop lands here)
        what = f"a broken or looping symbolic link (to {os.readlink(path)!r})"
    elif mode is not None:
        what = "not a regular file"
    else:
        what = "image file not found"
    raise FileNotFoundError(f"{what}: {path}")


# Reads of an image file that fail with one of these errnos are tried again (READ_ATTEMPTS in
# all, READ_RETRY_DELAY_S then twice that between them): a failing disk sector or controller
# (EIO), a network file system's hiccup (ESTALE after a server-side rename, ETIMEDOUT, ...).
# Never retried: a file that is absent, a folder, or not ours to read (PermissionError): the
# next attempt would fail alike.
READ_ATTEMPTS = 3
READ_RETRY_DELAY_S = 0.05
TRANSIENT_READ_ERRNOS = frozenset(getattr(errno, name) for name in (
    "EIO", "EAGAIN", "EINTR", "EBUSY", "ETIMEDOUT", "ESTALE", "ECONNRESET", "ECONNABORTED",
    "EREMOTEIO", "ENOLINK") if hasattr(errno, name))


def read_image_file(path: str | Path) -> bytes:
    """The bytes of the image file at ``path`` (``FileNotFoundError`` naming it when it is
    absent or a folder): read once, then hashed (``image_digest``) and decoded (``load_image``).

    A read failing with a transient errno (``TRANSIENT_READ_ERRNOS``) is tried again, up to
    ``READ_ATTEMPTS`` in all; any other ``OSError``, or the last attempt's, is raised."""
    path = Path(path)
    for attempt in range(1, READ_ATTEMPTS):
        try:
            _check_is_file(path)
            return path.read_bytes()
        except OSError as err:
            if err.errno not in TRANSIENT_READ_ERRNOS:
                raise
        time.sleep(READ_RETRY_DELAY_S * 2 ** (attempt - 1))
    _check_is_file(path)
    return path.read_bytes()


class ImageProblem(Exception):
    """Why an image file cannot be used: ``reason`` (``missing_image``, ``unreadable_image``
    or ``corrupt_image``, the reject reasons) and ``detail`` (the path and the error)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def open_image_file(path: str | Path) -> tuple[bytes, Image.Image]:
    """The file's bytes and their decoded image, or ``ImageProblem``: absent (or a folder)
    -> missing_image; a read failing after ``read_image_file``'s retries (permissions, a
    failing disk) -> unreadable_image, the errno named; any decoder exception (PIL's raise
    more than OSError: a damaged PNG chunk is a SyntaxError) -> corrupt_image. MemoryError
    propagates. The training dataset and the target extraction both classify through it."""
    try:
        data = read_image_file(path)
    except FileNotFoundError as err:
        raise ImageProblem("missing_image", str(err)) from err
    except OSError as err:
        # the errno's name first (what to look up), then the error (a failing read() does
        # not name the file)
        name = errno.errorcode.get(err.errno) or type(err).__name__
        raise ImageProblem("unreadable_image", f"{path}: {name}: {err}") from err
    try:
        return data, load_image(data)
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - a corrupt file is a counted reject, not a crash
        raise ImageProblem("corrupt_image", f"{path}: {type(err).__name__}: {err}") from err


def image_digest(data: bytes) -> str:
    """16 hex digits (BLAKE2b, 64 bits) of an image file's bytes: a target cache records it at
    extraction, so a training run notices an image that changed since (``stale_target``)."""
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def load_image(source: str | Path | bytes | BinaryIO) -> Image.Image:
    """Decode ``source`` (a path, the file's bytes or a binary file object) into RGB.

    The whole file is decoded here (``Image.load``), so a truncated or corrupt file raises now
    (``OSError``/``PIL.UnidentifiedImageError``/``ValueError``), not later in a view; a missing
    file raises ``FileNotFoundError``. The EXIF orientation is applied before anything else.
    """
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    elif isinstance(source, (str, Path)):
        source = Path(source)
        _check_is_file(source)
    try:
        opened = Image.open(source)
    except Image.UnidentifiedImageError as err:
        if not isinstance(source, io.BytesIO):
            raise
        # PIL names the buffer ("<_io.BytesIO object at 0x...>"); callers name the file.
        raise Image.UnidentifiedImageError(
            "cannot identify image file (not an image, or a format PIL cannot read)") from err
    with opened as image:
        image.load()
        try:
            oriented = ImageOps.exif_transpose(image)
        except Exception:  # noqa: BLE001 - a damaged EXIF block (TypeError, struct.error,
            # SyntaxError from PIL rewriting it): the pixels are fine; keep them unrotated, as
            # the seed's convert("RGB") always does
            oriented = image.copy()
    width, height = oriented.size
    if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
        raise ValueError(f"image {width}x{height}: aspect ratio above {MAX_ASPECT_RATIO}:1 "
                         "(resizing its short side to a view's size would take a "
                         f"{max(width, height) // max(1, min(width, height))}x larger image "
                         "than the view; olavlm.data.images.MAX_ASPECT_RATIO)")
    return to_rgb(oriented)


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad ``image`` to a square with ``background``, centred (the seed's ``expand2square``)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    # PIL's own decompression-bomb bound (2 x MAX_IMAGE_PIXELS), on the canvas this allocates.
    limit = Image.MAX_IMAGE_PIXELS and 2 * Image.MAX_IMAGE_PIXELS
    if limit and side * side > limit:
        raise ValueError(f"image {width}x{height}: padding it to a square needs a {side}x{side} "
                         f"canvas, {side * side} pixels, above PIL's limit of {limit} "
                         "(PIL.Image.MAX_IMAGE_PIXELS)")
    out = Image.new(image.mode, (side, side), background)
    out.paste(image, ((side - width) // 2, (side - height) // 2))
    return out


CROPS = ("floor", "round")  # the centre crop's offset: transformers' // 2, torchvision's round


def _resize_short_side_and_crop(image: Image.Image, size: int, resample,
                                crop: str = "floor") -> Image.Image:
    width, height = image.size
    # transformers' get_resize_output_image_size: the long side is int(size * long / short).
    if width <= height:
        new_w, new_h = size, max(size, int(size * height / width))
    else:
        new_w, new_h = max(size, int(size * width / height)), size
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), resample=resample)
    if (new_w, new_h) == (size, size):
        return image
    if crop == "round":  # torchvision's CenterCrop (open_clip's transform): half to even
        left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    else:  # transformers' center_crop (CLIPImageProcessor)
        left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """An RGB image as a (3, H, W) uint8 tensor."""
    arr = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


@dataclasses.dataclass(frozen=True)
class ImageView:
    """One view of a decoded image: (3, size, size), float32 normalized or uint8 (module doc).

    ``background`` (pad only) defaults to ``int(mean * 255)``, or CLIP's mean without ``mean``.
    ``then_size``: a second resize after the first, to then_size x then_size with PIL's
    bilinear filter (uint8 between the two, as an image processor's own resize after the
    seed's: the seg teacher's 768 then 800); the view is then_size wide (``out_size``).
    ``crop`` (square and pad): the centre crop's offset, ``"floor"`` as transformers'
    CLIPImageProcessor (``(new - size) // 2``), ``"round"`` as torchvision's ``CenterCrop`` in
    open_clip's transform (the seed's ConvNeXt tower): they differ by one pixel when
    ``new - size`` is 3 mod 4 (a quarter of the non-square images).
    """

    size: int = 336
    aspect: str = "square"
    mean: tuple[float, float, float] | None = CLIP_MEAN
    std: tuple[float, float, float] | None = CLIP_STD
    background: tuple[int, int, int] | None = None
    then_size: int | None = None
    crop: str = "floor"

    def __post_init__(self):
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"ImageView.size must be a positive int, got {self.size!r}")
        if self.then_size is not None and (isinstance(self.then_size, bool) or not isinstance(
                self.then_size, int) or self.then_size < 1):
            raise ValueError(f"ImageView.then_size must be None or a positive int, got "
                             f"{self.then_size!r}")
        if self.aspect not in ASPECTS:
            raise ValueError(f"ImageView.aspect must be one of {ASPECTS}, got {self.aspect!r}")
        if self.crop not in CROPS:
            raise ValueError(f"ImageView.crop must be one of {CROPS}, got {self.crop!r}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("ImageView.mean and std must both be given or both be None, got "
                             f"mean={self.mean!r}, std={self.std!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != 3:
                raise ValueError(f"ImageView.{name} must have 3 values, got {value!r}")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"ImageView.std must be positive, got {self.std!r}")

    @property
    def normalized(self) -> bool:
        return self.mean is not None

    @property
    def out_size(self) -> int:
        """The side of the views this makes: ``then_size`` if set, else ``size``."""
        return self.then_size or self.size

    def pad_colour(self) -> tuple[int, int, int]:
        if self.background is not None:
            return tuple(self.background)
        return tuple(int(m * 255) for m in (self.mean or CLIP_MEAN))

    def resize(self, image: Image.Image) -> Image.Image:
        """The view's pixels as an RGB PIL image of out_size x out_size."""
        image = self._first_resize(image)
        if self.then_size is not None and image.size != (self.then_size, self.then_size):
            image = image.resize((self.then_size, self.then_size),
                                 resample=Image.Resampling.BILINEAR)
        return image

    def _first_resize(self, image: Image.Image) -> Image.Image:
        if self.aspect == "stretch":
            if image.size == (self.size, self.size):
                return image
            return image.resize((self.size, self.size), resample=Image.Resampling.BICUBIC)
        if self.aspect == "pad":
            image = expand_to_square(image, self.pad_colour())
        return _resize_short_side_and_crop(image, self.size, Image.Resampling.BICUBIC,
                                           self.crop)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = pil_to_uint8(self.resize(image))
        if not self.normalized:
            return pixels
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return pixels.to(torch.float32).div_(255.0).sub_(mean).div_(std)

    def blank(self) -> torch.Tensor:
        """The view of a text-only sample: zeros (the seed's ``zeros(3, crop, crop)``)."""
        dtype = torch.float32 if self.normalized else torch.uint8
        return torch.zeros(3, self.out_size, self.out_size, dtype=dtype)


def tower_view(vision_tower: str, aspect: str = "square") -> ImageView:
    """The encoder view of a vision tower name (SPEC 1.1): the input size is parsed from
    ``-res<N>`` (open_clip ConvNeXt names) or a trailing ``-<N>`` (``clip-vit-...-336``), and
    the normalization is CLIP's mean/std."""
    match = re.search(r"-res(\d+)", vision_tower) or re.search(r"-(\d+)$", vision_tower)
    if match is None:
        raise ValueError("vision_tower must name its input size ('-res768' or a trailing "
                         f"'-336'), got {vision_tower!r}")
    crop = "round" if "convnext" in vision_tower.lower() else "floor"  # open_clip's transform
    return ImageView(size=int(match.group(1)), aspect=aspect, crop=crop)
