# The Teacher base class, batched on-device preprocessing, and local weight resolution.
"""What every teacher shares: a frozen module turning a batch of images into targets.

A teacher is called with a batch of uint8 RGB images in one of two forms:

- a list of ``(3, H, W)`` uint8 tensors of any sizes (the loader's ``Batch.raw_images``): the
  teacher copies the uint8 pixels to its device (4x fewer bytes than float32) and resizes
  there, one ``F.interpolate`` per distinct input size;
- a ``(B, 3, S, S)`` uint8 tensor already at the teacher's host view size (``host_view()``,
  computed with PIL in the data workers: the seed's exact pixels), which is only normalized.

Resizes on the device use antialiased bicubic (PIL's a = -0.5 kernel) and round and clamp to
[0, 255] after each step, as the seed's PIL images are uint8 between steps: within 1 level of
PIL after a downscale and 3 after an upscale on the tested image, more for large upscales and
at sharp edges (PIL also rounds between its two 1-D passes; docs/teachers.md).
Use the host view when bit-exact seed inputs matter.

Each teacher runs its model under ``torch.inference_mode`` in ``dtype``: bf16 by default on
CUDA (the seed's teachers ran in bf16/fp16); fp32 by default on CPU, where bf16 matmuls are
emulated and slow without AMX and where the tests compare batched and per-image results.
"""
from __future__ import annotations

import functools
import hashlib
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from olavlm.data.images import ImageView

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Teacher",
    "TeacherWeightsNotFound",
    "check_device",
    "default_dtype",
    "device_view",
    "group_by_size",
    "normalize",
    "resize_pixels",
    "resolve_weights",
    "warn_once",
    "weights_fingerprint",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ASPECTS = ("stretch", "square")


class TeacherWeightsNotFound(FileNotFoundError):
    """A teacher's weights are neither at the given path nor in the local hub cache."""


def check_device(device) -> torch.device:
    """``device`` as a ``torch.device`` that exists here, else a ValueError that says why."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got "
                         f"{device!r}") from err
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(parsed)!r} needs CUDA, but this torch sees no CUDA "
                             f"device (torch {torch.__version__}); use 'cpu'")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(parsed)!r}: this machine has "
                             f"{torch.cuda.device_count()} CUDA devices")
    return parsed


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on accelerators, fp32 on CPU (module docstring)."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def weights_fingerprint(folder: Path) -> dict:
    """What identifies a saved model without hashing gigabytes: the SHA-256 of its config and
    of each weight file's size, first and last MiB (two checkpoints of one architecture differ
    there). Recorded in a cache's plan, so a resumed extraction cannot mix checkpoints."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.suffix not in (".safetensors", ".bin") or not path.is_file():
            continue
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read(1 << 20))
    config = (folder / "config.json").read_bytes() if (folder / "config.json").is_file() else b""
    return {"config_sha256": hashlib.sha256(config).hexdigest(),
            "weights_sha256": digest.hexdigest()}


def _has_config(folder: Path, subfolder: str | None) -> Path | None:
    for candidate in ([folder / subfolder] if subfolder else []) + [folder]:
        if (candidate / "config.json").is_file():
            return candidate
    return None


def resolve_weights(path: str | Path | None, *, teacher: str, repo_id: str,
                    subfolder: str | None = None, download_hint: str = "") -> Path:
    """The local folder holding a teacher's ``config.json`` and weights.

    ``path`` is a local folder (the repository root, or ``subfolder`` inside it), or a hub
    repository id, or None for ``repo_id``. A repository id is looked up in the local hub
    cache only (``local_files_only``): nothing is ever downloaded here. Raises
    ``TeacherWeightsNotFound`` saying how to get the weights.
    """
    hint = download_hint or f'hf download {repo_id} --local-dir DIR'
    how = (f"Download them on a machine with network access (`{hint}`), then pass the folder "
           f"(Python: path=DIR; `olavlm targets extract --weights {teacher}=DIR`; `olavlm "
           f"train teachers.weights.{teacher}=DIR`), or run once with network so that "
           "the hub cache holds them.")
    if path is not None and Path(path).exists():
        folder = _has_config(Path(path), subfolder)
        if folder is None:
            inside = f" or {subfolder}/config.json" if subfolder else ""
            raise TeacherWeightsNotFound(
                f"{teacher} teacher: {str(path)!r} exists but holds no config.json{inside}; it "
                f"must be a saved {repo_id} repository. {how}")
        return folder
    wanted = repo_id if path is None else str(path)
    looks_like_repo = wanted.count("/") == 1 and not wanted.startswith((".", "/", "~"))
    if looks_like_repo:
        try:
            from huggingface_hub import snapshot_download

            cached = snapshot_download(wanted, local_files_only=True)
        except Exception:  # any cache miss means "not here"; reported below
            cached = None
        if cached is not None and _has_config(Path(cached), subfolder) is not None:
            return _has_config(Path(cached), subfolder)
    where = "in the local hub cache" if looks_like_repo else "at that path"
    raise TeacherWeightsNotFound(
        f"{teacher} teacher weights not found: {wanted!r} is not {where}. {how}")


def _check_image(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.uint8 or t.ndim != 3 or t.shape[0] != 3:
        raise ValueError(f"{name} must be a (3, H, W) uint8 tensor, got "
                         f"{tuple(t.shape)} {t.dtype}")


def group_by_size(images, device) -> list[tuple[list[int], torch.Tensor]]:
    """[(row indices, (n, 3, H, W) uint8 on ``device``)], one group per distinct size.

    ``images`` is a (B, 3, H, W) uint8 tensor or a sequence of (3, H, W) uint8 tensors."""
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) uint8, got {tuple(images.shape)} "
                             f"{images.dtype}")
        return [(list(range(images.shape[0])), images.to(device, non_blocking=True))]
    if not isinstance(images, Sequence) or not images:
        raise TypeError("images must be a (B, 3, H, W) uint8 tensor or a non-empty list of "
                        f"(3, H, W) uint8 tensors, got {type(images).__name__}")
    groups: dict[tuple[int, int], list[int]] = {}
    for i, t in enumerate(images):
        _check_image(t, f"images[{i}]")
        groups.setdefault(tuple(t.shape[1:]), []).append(i)
    out = []
    for rows in groups.values():
        if torch.device(device).type == "cpu":
            out.append((rows, torch.stack([images[i] for i in rows])))
        else:
            # One copy per image, straight from the loader's (pinned) buffers, stacked on the
            # device: no host-side stack and re-pin.
            out.append((rows, torch.stack([images[i].to(device, non_blocking=True)
                                           for i in rows])))
    return out


def resize_pixels(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    antialias = mode in ("bicubic", "bilinear")
    y = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=antialias)
    # uint8 between steps, as the seed's PIL images are.
    return y.round_().clamp_(0.0, 255.0)


def device_view(images, size: int, aspect: str, *, device, mode: str = "bicubic"):
    """(B, 3, size, size) float32 pixel values in [0, 255] on ``device``.

    ``aspect="stretch"`` resizes to size x size; ``"square"`` resizes the short side to
    ``size`` (the long side to ``int(size * long / short)``, transformers' rule) and crops the
    centre, as ``olavlm.data.ImageView`` does with PIL."""
    if aspect not in ASPECTS:
        raise ValueError(f"aspect must be one of {ASPECTS}, got {aspect!r}")
    groups = group_by_size(images, device)
    total = sum(len(rows) for rows, _ in groups)
    out = torch.empty(total, 3, size, size, dtype=torch.float32, device=device)
    for rows, x in groups:
        x = x.float()
        height, width = x.shape[-2:]
        if aspect == "stretch":
            x = resize_pixels(x, (size, size), mode)
        else:
            if width <= height:
                new = (max(size, int(size * height / width)), size)
            else:
                new = (size, max(size, int(size * width / height)))
            x = resize_pixels(x, new, mode)
            top, left = (new[0] - size) // 2, (new[1] - size) // 2
            x = x[..., top:top + size, left:left + size]
        if len(groups) == 1:
            return x.contiguous()
        # Row by row: an index tensor built from ``rows`` would be a host-to-device copy, a
        # stream sync per group (with raw images of many sizes, per image) in every step.
        for j, i in enumerate(rows):
            out[i].copy_(x[j])
    return out


@functools.lru_cache(maxsize=32)
def _channels(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """(1, 3, 1, 1) float32 on ``device``, made once per device from fill kernels:
    ``torch.tensor(values, device=cuda)`` in every step would copy from the host and
    synchronize the stream. A normal tensor even when first asked under inference_mode."""
    with torch.inference_mode(False):
        return torch.stack([torch.full((), float(v), dtype=torch.float32, device=device)
                            for v in values]).view(1, 3, 1, 1)


def normalize(pixels: torch.Tensor, mean, std, dtype: torch.dtype) -> torch.Tensor:
    """``(pixels / 255 - mean) / std`` in fp32, then cast to ``dtype``."""
    mean_t = _channels(tuple(map(float, mean)), pixels.device)
    std_t = _channels(tuple(map(float, std)), pixels.device)
    return ((pixels / 255.0 - mean_t) / std_t).to(dtype)


class Teacher(nn.Module):
    """A frozen target encoder: images (and, for the synthetic teacher, maps) -> targets.

    Subclasses set ``name``, ``tasks`` and implement ``preprocess`` (uint8 images -> model
    input on the device) and ``encode`` (model input -> {task: (B, *target_shape)}).
    ``forward`` runs both under ``torch.inference_mode``, in chunks of ``max_batch`` images.
    The module stays in eval mode whatever ``train()`` is called with.
    """

    name: str = ""
    tasks: tuple[str, ...] = ()
    needs_images: bool = True
    needs_maps: bool = False

    def __init__(self, *, device=None, dtype: torch.dtype | None = None,
                 seed_compat: bool = True, max_batch: int | None = None):
        super().__init__()
        device = check_device(device if device is not None else "cpu")
        if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be torch.float32, bfloat16 or float16, got {dtype}")
        if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
            raise ValueError(f"max_batch must be None or an int >= 1, got {max_batch!r}")
        self.device = device
        self.dtype = dtype or default_dtype(device)
        self.seed_compat = bool(seed_compat)
        self.max_batch = max_batch
        self.weights: dict | None = None  # weights_fingerprint() of the folder it loaded
        self._encode_fn = self.encode

    # -- what subclasses provide ---------------------------------------------------------
    def target_shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def host_view(self) -> ImageView | None:
        """The uint8 PIL view data workers can compute for this teacher (None: not needed)."""
        return None

    def preprocess(self, images, maps=None):
        raise NotImplementedError

    def encode(self, inputs) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """What determines the targets (written into a cache's plan, checked on resume)."""
        return {"teacher": self.name, "seed_compat": self.seed_compat,
                "dtype": str(self.dtype).removeprefix("torch."), "weights": self.weights,
                "shapes": {k: list(v) for k, v in self.target_shapes().items()}}

    # -- shared behaviour ----------------------------------------------------------------
    def _freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)
        self.to(self.device)

    def train(self, mode: bool = True):  # teachers are always frozen
        return super().train(False)

    def compile_model(self, **kwargs) -> Teacher:
        """Compile ``encode``, the model forward (``torch.compile``); preprocessing of images
        of varying sizes stays eager. ``kwargs`` go to ``torch.compile`` (default
        ``dynamic=False``: one graph per batch size, and batch sizes repeat in training)."""
        kwargs.setdefault("dynamic", False)
        self._encode_fn = torch.compile(self.encode, **kwargs)
        return self

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters()) + sum(
            b.numel() * b.element_size() for b in self.buffers())

    def _batch_size(self, images, maps) -> int:
        if images is not None:
            return len(images)
        if maps is not None:
            return len(next(iter(maps.values())))
        raise ValueError(f"{self.name} teacher: images and maps are both None")

    def forward(self, images=None, maps: Mapping | None = None) -> dict[str, torch.Tensor]:
        """{task: (B, *target_shape) tensor in ``self.dtype`` on ``self.device``}.

        The outputs are inference tensors: clone them before autograd must save them (a loss
        against them), as ``OnlineTargets`` does."""
        if self.needs_images and images is None:
            raise ValueError(f"{self.name} teacher needs images, got images=None")
        if self.needs_maps and maps is None:
            raise ValueError(f"{self.name} teacher needs maps (LlavaDataset(keep_maps=True) or "
                             "the synthetic dataset's depth/seg files), got maps=None")
        total = self._batch_size(images, maps)
        if total == 0:
            raise ValueError(f"{self.name} teacher: images/maps must hold at least one sample, "
                             "got 0")
        step = self.max_batch or total
        parts = []
        with torch.inference_mode():
            for lo in range(0, total, step):
                sub_images = None if images is None else images[lo:lo + step]
                sub_maps = None if maps is None else {k: v[lo:lo + step] for k, v in maps.items()}
                parts.append(self._encode_fn(self.preprocess(sub_images, sub_maps)))
        if len(parts) == 1:
            return parts[0]
        return {task: torch.cat([p[task] for p in parts]) for task in parts[0]}


_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """``warnings.warn`` the first time ``message`` comes up in this process."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)
