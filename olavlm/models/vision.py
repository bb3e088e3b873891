# Frozen vision towers of SPEC 1.1: HF CLIP ViT, open_clip ConvNeXt (timm trunk), HF SigLIP.
"""Frozen vision encoders: normalized images ``(B, 3, S, S)`` -> patch features ``(B, T, C)``.

Shape letters: B batch, S image side, T tokens (576 for the real towers), C feature width (the
projector's input, SPEC ``mm_hidden_size``), h x w the ConvNeXt feature grid.

- ``ClipVisionTower`` (``openai/clip-vit-large-patch14-336``: S=336, T=576, C=1024): the seed's
  ``hidden_states[select_layer][:, 1:]`` of a transformers ``CLIPVisionModel``, where
  ``hidden_states[0]`` is the embeddings after ``pre_layrnorm`` and ``hidden_states[k]`` the output
  of block k. Only the blocks the selected state needs are kept (SPEC 9 item 13): at load time
  ``encoder.layers`` is cut to ``num_layers + 1 + select_layer`` blocks (23 of 24 for -2), and
  the forward returns that one state: no list of hidden states, no ``post_layernorm``.
- ``SiglipVisionTower``: the same for a ``SiglipVisionModel`` (no CLS token, no pre-norm; the
  attention-pooling head is dropped).
- ``ConvNextVisionTower`` (``laion/CLIP-convnext_xxlarge-...-soup-res768``: S=768, T=576,
  C=3072): open_clip's ``clip_model.visual.trunk`` (a timm ConvNeXt), ``stem -> stages ->
  norm_pre`` (timm's ``forward_features``; no head norm, no pooling), the last stage's
  ``(B, C, h, w)`` flattened to ``(B, h * w, C)``. ``select_layer`` is ignored, as in the seed.

Every tower is frozen: no parameter requires grad, the module stays in eval mode whatever
``train()`` is called with, and ``forward`` runs under ``torch.no_grad`` (not inference mode:
the projector saves the features for its weight gradient). The input is cast to the tower's
parameter dtype and device, and the output has that dtype.

Weights are only ever read from local files: a local path, or a repository id already in the
local hub cache (``local_files_only``). Nothing is downloaded here.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from olavlm.data.images import CLIP_MEAN, CLIP_STD
from olavlm.teachers.base import default_dtype, warn_once

__all__ = [
    "SIGLIP_MEAN",
    "SIGLIP_STD",
    "VISION_TOWERS",
    "ClipVisionTower",
    "ConvNextVisionTower",
    "SiglipVisionTower",
    "VisionTower",
    "build_tiny_vision_tower",
    "build_vision_tower",
    "tower_kind",
]

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_RES_SUFFIX = re.compile(r"-(res|interp)(\d+)")  # the seed's "-res768" (and "-interp") suffixes
_RES_SIZE = re.compile(r"-res(\d+)")  # (the one that gives a ConvNeXt's input side)


def name_with_image_size(name: str, image_size: int) -> str:
    """A ConvNeXt tower's name that says its input side the seed's way (``-res<N>`` on the last
    path component, read back by ``ConvNextVisionTower.load``): what an export writes, so a
    tower trained at ``data.image_size`` reloads at that size. ``name`` itself when it
    already says so."""
    text = str(name).rstrip("/")
    head, sep, last = text.rpartition("/")
    match = _RES_SIZE.search(last)
    if match is not None and int(match.group(1)) == int(image_size):
        return str(name)
    return f"{head}{sep}{_RES_SIZE.sub('', last)}-res{int(image_size)}"


def tower_dtype_for(model_dtype: str) -> torch.dtype | None:
    """The dtype a model's own frozen tower is built in: a half-precision model's (the seed
    runs its tower in the model's bf16; an fp32 copy would double its memory and give other
    features), else None (``build_vision_tower``'s rule: bf16 on accelerators, fp32 on CPU)."""
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(model_dtype)


def carry_image_size(recorded, given) -> str:
    """``given`` (a tower folder passed in place of a model's recorded tower name) with the
    recorded ConvNeXt name's ``-res<N>`` suffix when ``given`` says no size itself: the input
    side the model was trained at travels with the name (without it the folder's open_clip
    config would decide: convnext_xxlarge's 256 px, 64 tokens instead of 576)."""
    recorded_last = Path(str(recorded or "").rstrip("/")).name
    match = _RES_SIZE.search(recorded_last)
    if match is None or "convnext" not in str(recorded).lower() or \
            _RES_SIZE.search(Path(str(given).rstrip("/")).name):
        return str(given)
    return name_with_image_size(str(given), int(match.group(1)))


def strip_res_suffix(name: str) -> str:
    """``name`` without the seed's ``-res<N>`` / ``-interp<N>`` suffixes (the folder behind it)."""
    return _RES_SUFFIX.sub("", str(name))


class VisionTower(nn.Module):
    """A frozen image encoder: ``forward(images (B, 3, S, S) float) -> (B, T, C)``.

    Attributes: ``kind`` ("clip" | "convnext" | "siglip"), ``name`` (what it was loaded from),
    ``hidden_size`` (C), ``image_size`` (S), ``num_tokens`` (T), and ``mean`` / ``std``, the
    3-tuples the images must be normalized with (``(x / 255 - mean) / std``).
    """

    kind: str = ""

    def __init__(self, *, name: str, hidden_size: int, image_size: int, num_tokens: int,
                 mean, std):
        super().__init__()
        for arg, value in (("mean", mean), ("std", std)):
            if len(value) != 3:
                raise ValueError(f"{arg} must have 3 values, got {value!r}")
        self.name = str(name)
        self.hidden_size = int(hidden_size)
        self.image_size = int(image_size)
        self.num_tokens = int(num_tokens)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    # -- what subclasses provide ---------------------------------------------------------
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in the tower's dtype and device -> (B, T, C)."""
        raise NotImplementedError

    # -- shared behaviour ----------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _freeze(self, dtype: torch.dtype | None, device) -> None:
        if dtype is not None and dtype not in _DTYPES:
            raise ValueError(f"dtype must be torch.float32, bfloat16 or float16, got {dtype}")
        device = torch.device(device) if device is not None else self.device
        self.to(device=device, dtype=dtype or default_dtype(device))
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True):  # frozen: always in eval mode
        return super().train(False)

    def check_images(self, images) -> None:
        """TypeError / ValueError unless ``images`` is a float (B, 3, S, S) tensor."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        size = self.image_size
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (size, size):
            raise ValueError(f"images must have shape (B, 3, {size}, {size}) for the {self.kind} "
                             f"tower {self.name!r}, got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be a floating tensor normalized with mean={self.mean}"
                             f", std={self.std}, got dtype {images.dtype}")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalized images (any float dtype) -> (B, T, C) in the tower's dtype."""
        self.check_images(images)
        return self.encode(images.to(device=self.device, dtype=self.dtype))

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, image_size={self.image_size}, "
                f"num_tokens={self.num_tokens}, hidden_size={self.hidden_size}")


# -- transformers ViTs (CLIP, SigLIP) ------------------------------------------------------
def _kept_blocks(select_layer, num_layers: int) -> int:
    """How many blocks ``hidden_states[select_layer]`` needs (of ``num_layers + 1`` states)."""
    if isinstance(select_layer, bool) or not isinstance(select_layer, int) or not (
            -(num_layers + 1) <= select_layer <= num_layers):
        raise ValueError(f"select_layer must be an int in [{-(num_layers + 1)}, {num_layers}] "
                         f"(an index into the {num_layers + 1} hidden states), got "
                         f"{select_layer!r}")
    return select_layer if select_layer >= 0 else num_layers + 1 + select_layer


def _side(value) -> int:
    return int(value if isinstance(value, int) else value[0])


class _HFViTTower(VisionTower):
    """A transformers vision transformer cut after the selected block (module docstring)."""

    model_class = ""  # the transformers class that loads it
    has_cls = False
    default_mean: tuple[float, float, float] = CLIP_MEAN
    default_std: tuple[float, float, float] = CLIP_STD

    def __init__(self, model: nn.Module, *, name: str = "", select_layer: int = -2,
                 select_feature: str = "patch", mean=None, std=None,
                 dtype: torch.dtype | None = None, device=None):
        features = ("patch", "cls_patch") if self.has_cls else ("patch",)
        if select_feature not in features:
            raise ValueError(f"select_feature must be one of {features} for the {self.kind} "
                             f"tower, got {select_feature!r}")
        config = model.config
        image_size, patch = _side(config.image_size), _side(config.patch_size)
        core = getattr(model, "vision_model", model)  # transformers < 5 nests the modules
        num_layers = len(core.encoder.layers)
        keep = _kept_blocks(select_layer, num_layers)
        grid = image_size // patch
        super().__init__(name=name, hidden_size=config.hidden_size, image_size=image_size,
                         num_tokens=grid * grid + (select_feature == "cls_patch"),
                         mean=mean or self.default_mean, std=std or self.default_std)
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.num_layers = num_layers  # of the checkpoint; len(encoder.layers) == num_blocks
        self.num_blocks = keep
        core.encoder.layers = core.encoder.layers[:keep]  # drop the blocks after the state
        config.num_hidden_layers = keep
        self._drop_unused(core)
        self.vision_tower = model  # the seed's state_dict prefix: vision_tower.vision_tower.*
        self._freeze(dtype, device)

    def _drop_unused(self, core: nn.Module) -> None:
        pass

    def _embed(self, core: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        core = getattr(self.vision_tower, "vision_model", self.vision_tower)
        x_BTC = self._embed(core, pixels)
        x_BTC = core.encoder(inputs_embeds=x_BTC).last_hidden_state
        if self.has_cls and self.select_feature == "patch":
            x_BTC = x_BTC[:, 1:].contiguous()  # one copy here, or one in the projector's GEMM
        return x_BTC

    @classmethod
    def load(cls, path: str | Path, *, select_layer: int = -2, select_feature: str = "patch",
             dtype: torch.dtype | None = None, device=None) -> _HFViTTower:
        """From a saved folder (``save_pretrained`` of the vision model or of the whole
        CLIP/SigLIP model, as on the hub), or a repository id in the local hub cache."""
        import transformers

        folder = _resolve(path, cls.kind)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{cls.kind} vision tower: {str(path)!r} holds no "
                                    "config.json; it must be a saved transformers model folder")
        # A full CLIP/SigLIP folder (the hub's layout) holds the text tower too: transformers
        # prints a long "UNEXPECTED keys" report for it. Quiet it; the missing keys, the only
        # ones that matter for a frozen tower, are checked below.
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            model, info = getattr(transformers, cls.model_class).from_pretrained(
                str(folder), local_files_only=True, output_loading_info=True)
        finally:
            transformers.logging.set_verbosity(verbosity)
        mean, std = _processor_mean_std(folder)
        tower = cls(model, name=str(path), select_layer=select_layer,
                    select_feature=select_feature, mean=mean, std=std, dtype=dtype,
                    device=device)
        # A weight missing from the checkpoint is randomly initialized by transformers with only
        # a log line: fatal for a frozen tower, unless the module was cut away.
        used = set(model.state_dict())
        missing = sorted(k for k in info["missing_keys"] if k in used)
        if missing:
            raise ValueError(f"{cls.kind} vision tower: the checkpoint in {str(folder)!r} lacks "
                             f"{len(missing)} weights of the tower, e.g. {missing[:3]}")
        return tower


class ClipVisionTower(_HFViTTower):
    """transformers ``CLIPVisionModel`` features: ``hidden_states[select_layer]`` without the
    CLS token (``select_feature="patch"``) or with it (``"cls_patch"``), (B, 576, 1024) for
    ViT-L/14 at 336 px. Equivalent PyTorch, computed with only the needed blocks::

        model(images, output_hidden_states=True).hidden_states[select_layer][:, 1:]
    """

    kind = "clip"
    model_class = "CLIPVisionModel"
    has_cls = True

    def _embed(self, core, pixels):
        return core.pre_layrnorm(core.embeddings(pixels))


class SiglipVisionTower(_HFViTTower):
    """transformers ``SiglipVisionModel`` features: ``hidden_states[select_layer]`` (no CLS
    token), e.g. (B, 729, 1152) for so400m-patch14-384. The pooling head is dropped."""

    kind = "siglip"
    model_class = "SiglipVisionModel"
    default_mean = SIGLIP_MEAN
    default_std = SIGLIP_STD

    def _drop_unused(self, core):
        if getattr(core, "head", None) is not None:
            del core.head
        core.use_head = False

    def _embed(self, core, pixels):
        # transformers' SigLIP embeddings are a transposed view, (B, C, T) in memory, which
        # every residual add of the encoder would keep: make the stream token-major once.
        return core.embeddings(pixels).contiguous()


def _processor_mean_std(folder: Path):
    """``image_mean``/``image_std`` of the folder's ``preprocessor_config.json`` (None, None
    without one: the tower's defaults)."""
    config = folder / "preprocessor_config.json"
    if not config.is_file():
        return None, None
    data = json.loads(config.read_text())
    mean, std = data.get("image_mean"), data.get("image_std")
    if isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == 3:
        return tuple(mean), tuple(std)
    return None, None


# -- open_clip ConvNeXt ---------------------------------------------------------------------
class ConvNextVisionTower(VisionTower):
    """open_clip ConvNeXt features: the timm trunk's ``stem -> stages -> norm_pre``, flattened;
    (B, 576, 3072) for ConvNeXt-XXL at 768 px. Equivalent PyTorch::

        trunk.forward_features(images).flatten(2).transpose(1, 2)  # (B, h * w, C)

    ``image_size`` must be a multiple of the trunk's reduction (32). ``select_layer`` is
    ignored (SPEC 1.1); a value other than -2 warns once.
    """

    kind = "convnext"

    def __init__(self, trunk: nn.Module, *, image_size: int, name: str = "", mean=CLIP_MEAN,
                 std=CLIP_STD, select_layer: int = -2, dtype: torch.dtype | None = None,
                 device=None):
        if not all(hasattr(trunk, a) for a in ("stem", "stages", "norm_pre", "feature_info")):
            raise TypeError("trunk must be a timm ConvNeXt (stem, stages, norm_pre, "
                            f"feature_info), got {type(trunk).__name__}")
        last = trunk.feature_info[-1]
        reduction = last["reduction"]
        if isinstance(image_size, bool) or not isinstance(image_size, int) or (
                image_size < reduction or image_size % reduction):
            raise ValueError(f"image_size must be a positive multiple of the trunk's reduction "
                             f"{reduction}, got {image_size!r}")
        if select_layer != -2:
            warn_once(f"select_layer={select_layer} is ignored by the ConvNeXt tower (SPEC 1.1): "
                      "it always returns the last stage")
        side = image_size // reduction
        super().__init__(name=name, hidden_size=last["num_chs"], image_size=image_size,
                         num_tokens=side * side, mean=mean, std=std)
        self.vision_tower = trunk  # the seed's state_dict prefix: vision_tower.vision_tower.*
        self._freeze(dtype, device)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        trunk = self.vision_tower
        x_BChw = trunk.norm_pre(trunk.stages(trunk.stem(pixels)))
        return x_BChw.flatten(2).transpose(1, 2).contiguous()

    @classmethod
    def load(cls, path: str | Path, *, model_name: str | None = None,
             image_size: int | None = None, select_layer: int = -2,
             dtype: torch.dtype | None = None, device=None) -> ConvNextVisionTower:
        """From an open_clip folder (``open_clip_config.json`` + weights, the hub layout) or a
        repository id in the local hub cache, or from a checkpoint file plus the open_clip
        ``model_name`` it belongs to (``create_model(model_name, pretrained=path)``).

        ``image_size``: the argument, else the seed's ``-res<N>`` suffix of ``path`` (stripped
        to find the folder: ``.../CLIP-convnext_xxlarge-...-soup-res768`` loads
        ``.../CLIP-convnext_xxlarge-...-soup`` at 768 px), else the model config's size.
        """
        import open_clip

        location = _resolve(path, cls.kind)
        if location.is_dir():
            if model_name is not None:
                raise ValueError("model_name is only used with a checkpoint file; "
                                 f"{str(path)!r} is a folder (its open_clip_config.json names "
                                 f"the model), got model_name={model_name!r}")
            if not (location / "open_clip_config.json").is_file():
                raise FileNotFoundError(f"convnext vision tower: {str(path)!r} holds no "
                                        "open_clip_config.json; it must be a saved open_clip "
                                        "model folder")
            weights = ("*.safetensors", "*.bin", "*.pth", "*.pt")
            if not any(next(location.glob(p), None) for p in weights):
                raise FileNotFoundError(f"convnext vision tower: {str(path)!r} holds no weights "
                                        "(*.safetensors, *.bin, *.pth)")
            model = open_clip.create_model(f"local-dir:{location}", require_pretrained=True)
        else:
            if model_name is None:
                raise ValueError(f"model_name (an open_clip model name such as "
                                 f"'convnext_xxlarge') is required to load the checkpoint file "
                                 f"{str(path)!r}")
            model = open_clip.create_model(model_name, pretrained=str(location),
                                           require_pretrained=True)
        preprocess = open_clip.get_model_preprocess_cfg(model)
        if image_size is None:
            match = _RES_SIZE.search(Path(str(path)).name)
            if match is not None:
                image_size = int(match.group(1))
            else:
                image_size = _side(preprocess.get("size", model.visual.image_size))
        return cls(model.visual.trunk, image_size=image_size, name=str(path),
                   mean=preprocess.get("mean", CLIP_MEAN), std=preprocess.get("std", CLIP_STD),
                   select_layer=select_layer, dtype=dtype, device=device)


# -- registry --------------------------------------------------------------------------------
VISION_TOWERS: dict[str, type[VisionTower]] = {
    "clip": ClipVisionTower,
    "convnext": ConvNextVisionTower,
    "siglip": SiglipVisionTower,
}


def tower_kind(name_or_path: str | Path) -> str:
    """The seed's rule (SPEC 1.1): a name containing "convnext" is a ConvNeXt tower, then
    "siglip", then "clip" (case-insensitive). It looks at the last path component first, so
    that folders above it (a test's tmp dir) cannot decide, then at the whole string."""
    text = str(name_or_path)
    for candidate in (Path(text).name, text):
        low = candidate.lower()
        for kind in ("convnext", "siglip", "clip"):
            if kind in low:
                return kind
    raise ValueError(f"cannot tell the vision tower kind of {text!r}: the name must contain one "
                     f"of {sorted(VISION_TOWERS)} (or pass kind=)")


def _resolve(path: str | Path, kind: str) -> Path:
    """The local file or folder behind ``path``: itself, or (ConvNeXt) itself without the
    seed's ``-res<N>`` / ``-interp<N>`` suffixes, or a repository id's snapshot in the local hub
    cache. FileNotFoundError otherwise; never downloads."""
    if not isinstance(path, (str, Path)) or not str(path):
        raise TypeError(f"path must be a non-empty str or Path, got {path!r}")
    text = str(path)
    candidates = [text]
    if kind == "convnext" and _RES_SUFFIX.search(text):
        candidates.append(_RES_SUFFIX.sub("", text))
    for candidate in candidates:
        local = Path(candidate).expanduser()
        if local.exists():
            return local
    for candidate in candidates:
        if candidate.count("/") == 1 and not candidate.startswith((".", "/", "~")):
            try:
                from huggingface_hub import snapshot_download

                return Path(snapshot_download(candidate, local_files_only=True))
            except Exception:  # any cache miss means "not here"; reported below
                pass
    raise FileNotFoundError(f"{kind} vision tower weights not found: {text!r} is neither a local "
                            "path nor a repository in the local hub cache (nothing is "
                            "downloaded). Save the model on a machine with network access and "
                            "pass its folder.")


def build_vision_tower(path: str | Path, *, kind: str | None = None, select_layer: int = -2,
                       dtype: torch.dtype | None = None, device=None, **options) -> VisionTower:
    """The frozen tower saved at ``path`` (a local folder or file, or a repository id in the
    local hub cache), of ``kind`` (default: ``tower_kind`` of ``options["model_name"]`` or of
    ``path``). ``dtype`` None: bf16 on accelerators, fp32 on CPU; ``device`` None: CPU.
    ``options`` go to the tower's ``load``: ``select_feature`` (clip, siglip), ``model_name`` and
    ``image_size`` (convnext)."""
    if kind is None:
        kind = tower_kind(options.get("model_name") or path)
    if kind not in VISION_TOWERS:
        raise ValueError(f"kind must be one of {sorted(VISION_TOWERS)}, got {kind!r}")
    return VISION_TOWERS[kind].load(path, select_layer=select_layer, dtype=dtype, device=device,
                                    **options)


# -- tiny random-weight towers of the real architectures (tests, CPU demos) -----------------
_TINY_CONVNEXT = {320: "convnext_atto", 384: "convnext_femto", 512: "convnext_pico",
                  640: "convnext_nano"}  # timm's smallest ConvNeXts by last-stage width


def build_tiny_vision_tower(kind: str, out_dir: str | Path, *, image_size: int | None = None,
                            hidden_size: int | None = None, num_layers: int = 4,
                            seed: int = 0) -> Path:
    """Save a tiny random-weight tower of ``kind`` laid out as the real hub repository and
    return the folder to pass to ``build_vision_tower`` (``out_dir / "tiny-<kind>"``).

    clip / siglip: the whole CLIP / SigLIP model (a 1-block text tower beside the vision one)
    plus ``preprocessor_config.json``; ``num_layers`` vision blocks, patch 8, ``image_size``
    48 (36 tokens), ``hidden_size`` 32. convnext: ``open_clip_config.json`` naming a timm
    ConvNeXt (``hidden_size`` 320: convnext_atto; 384, 512, 640: femto, pico, nano) and
    ``open_clip_model.safetensors``; ``image_size`` 128 (16 tokens). The ConvNeXt layer-scale
    gammas are drawn at random (their 1e-6 init would make every block a no-op).
    """
    if kind not in VISION_TOWERS:
        raise ValueError(f"kind must be one of {sorted(VISION_TOWERS)}, got {kind!r}")
    folder = Path(out_dir) / f"tiny-{kind}"
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "convnext":
            _save_tiny_convnext(folder, image_size or 128, hidden_size or 320)
        else:
            _save_tiny_vit(kind, folder, image_size or 48, hidden_size or 32, num_layers)
    return folder


def _save_tiny_vit(kind: str, folder: Path, image_size: int, hidden_size: int,
                   num_layers: int) -> None:
    import transformers

    if image_size % 8:
        raise ValueError(f"image_size must be a multiple of the patch size 8, got {image_size}")
    heads = 2 if hidden_size % 2 == 0 else 1
    vision = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=num_layers, num_attention_heads=heads,
                  image_size=image_size, patch_size=8)
    text = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=1,
                num_attention_heads=heads, vocab_size=64, max_position_embeddings=16,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if kind == "clip":
        config = transformers.CLIPConfig(text_config=text, vision_config=vision,
                                         projection_dim=hidden_size)
        model = transformers.CLIPModel(config)
        processor = transformers.CLIPImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size})
    else:
        config = transformers.SiglipConfig(text_config=text, vision_config=vision)
        model = transformers.SiglipModel(config)
        processor = transformers.SiglipImageProcessor(
            size={"height": image_size, "width": image_size})
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def _save_tiny_convnext(folder: Path, image_size: int, hidden_size: int) -> None:
    import open_clip
    from safetensors.torch import save_file

    if hidden_size not in _TINY_CONVNEXT:
        raise ValueError(f"hidden_size must be one of {sorted(_TINY_CONVNEXT)} for a tiny "
                         f"ConvNeXt, got {hidden_size}")
    model_cfg = {
        "embed_dim": 16,
        "vision_cfg": {"timm_model_name": _TINY_CONVNEXT[hidden_size],
                       "timm_model_pretrained": False, "timm_pool": "", "timm_proj": "linear",
                       "timm_drop": 0.0, "timm_drop_path": 0.1, "image_size": image_size},
        "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2,
                     "layers": 1},
    }  # convnext_xxlarge.json's layout at a tiny size
    model = open_clip.CLIP(**model_cfg)
    with torch.no_grad():
        for name, param in model.visual.trunk.named_parameters():
            if name.endswith(".gamma"):
                param.uniform_(0.5, 1.5)
    config = {"model_cfg": model_cfg,
              "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))

