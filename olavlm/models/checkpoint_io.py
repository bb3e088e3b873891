# Checkpoints: import the seed's weights (SPEC 11), export HF-format safetensors, atomically.
"""Read and write OLA-VLM weights.

- ``load_seed_checkpoint(seed_dir, vision_tower_path)``: a seed checkpoint directory (HF
  ``config.json`` of an ``OlaLlava{Llama,Phi3}ForCausalLM`` plus safetensors, one file or shards
  with ``model.safetensors.index.json``) -> :class:`OlaVLM`. The LLM is built **in memory** from
  the seed's keys (``model.embed_tokens/layers/norm``, ``lm_head``) and the config minus its
  LLaVA/OLA keys; pass ``llm_out`` to also write it as a plain HF checkpoint (and point
  ``config.llm`` at it). ``read_seed_checkpoint`` is the lower level: config + renamed tensors.
- ``export_hf(model, out_dir)`` / ``load_exported(out_dir)``: ``out_dir/llm`` (``save_pretrained``:
  a plain HF causal LM), ``olavlm.safetensors`` (projector, task tokens, heads, logit scales),
  ``olavlm_config.json`` (``ModelConfig.to_dict()``, ``llm`` relative to ``out_dir``) and, when
  asked, ``vision_tower.safetensors``.
- ``export_seed_layout(model, out_dir)``: the seed's own layout (SPEC 11 keys, a ``config.json``
  with the seed's keys), so that ``load_seed_checkpoint(export_seed_layout(m))`` equals ``m``.
- The ``config.json`` mapping (``seed_model_config``, ``seed_llm_config``, ``seed_config_dict``,
  ``seed_num_sys_tokens``) lives in :mod:`olavlm.models.seed_config`; it is re-exported here.

Key map (seed -> ours): ``model.{embed_tokens,layers,norm}.*``, ``lm_head.*`` -> ``llm.*``;
``model.mm_projector.*`` -> ``mm_projector.*``; ``model.special_{t}_tokens`` ->
``task_tokens.special_{t}_tokens``; ``model.vision_tower.*`` -> ``vision_tower.*``;
``image_{t}_heads.*`` and ``{t}_logit_scale`` unchanged; ``da_v2_head.*`` (the frozen DPT head,
visualisation only) ignored. Tower keys: transformers 5 builds ``CLIPVisionModel`` /
``SiglipVisionModel`` without the ``vision_model.`` level the seed's (transformers 4) files have,
and our ViT towers hold only the blocks up to ``select_layer``: the seed's keys of the cut
blocks (and SigLIP's pooling head) are dropped. A checkpoint without any tower key keeps the
tower's own weights (the seed's towers are frozen copies of the hub's).

Loading is strict: every key the model built from the config needs must be there, every key
given must be used (except the ignored ones above, and the task tokens/heads/logit scales of a
task outside ``aux_mode``, dropped with a warning), and every shape must match; the errors list
the keys in the checkpoint's own names. Every write goes to a temporary directory beside the
target, renamed into place at the end: a crash never leaves a checkpoint that looks complete.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from glob import escape as glob_escape
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from olavlm._fs import host_tag, process_alive

from .config import ModelConfig
from .ola import OlaVLM
from .seed_config import (  # the seed config.json mapping, re-exported here
    _DTYPES,
    SEED_TASK_PREFIX,
    _llm_dtype_name,
    seed_config_dict,
    seed_llm_config,
    seed_model_config,
    seed_num_sys_tokens,  # noqa: F401
)

__all__ = [
    "SEED_TASK_PREFIX",
    "SeedCheckpoint",
    "export_hf",
    "export_seed_layout",
    "load_exported",
    "load_seed_checkpoint",
    "ola_key_to_seed",
    "read_safetensors_dir",
    "read_seed_checkpoint",
    "seed_config_dict",
    "seed_key_to_ola",
    "seed_llm_config",
    "seed_model_config",
]

EXPORT_CONFIG = "olavlm_config.json"
EXPORT_WEIGHTS = "olavlm.safetensors"
EXPORT_TOWER = "vision_tower.safetensors"
# Written into every folder this module writes (exports, a seed import's llm_out): what wrote
# it and from what. ``overwrite`` replaces only folders holding it (or an older export's
# EXPORT_CONFIG), never a model folder someone else wrote.
EXPORT_MARKER = "olavlm_export.json"
_IGNORED = ("da_v2_head.",)
# Buffers older transformers versions saved and today's rebuild (non-persistent): ignored, as
# from_pretrained ignores them.
_IGNORED_BUFFERS = re.compile(r"(?:\.embeddings\.position_ids|rotary_emb\.inv_freq)$")
_MAX_LISTED = 12
_TASK_KEY = re.compile(r"(?:task_tokens\.special_|image_)?(gen|depth|seg)_"
                       r"(?:tokens$|heads\.|logit_scale$)")


# ---- key names ------------------------------------------------------------------------------

def seed_key_to_ola(key: str) -> str | None:
    """The OlaVLM state_dict key of a seed checkpoint key (None: ignored, ``da_v2_head.*``).
    Tower keys keep the seed's inner layout (see ``_fit_tower_keys``); unknown keys come back
    unchanged and fail the strict check."""
    if key.startswith(_IGNORED) or _IGNORED_BUFFERS.search(key):
        return None
    if key.startswith(("model.mm_projector.", "model.vision_tower.")):
        return key[len("model."):]
    match = re.fullmatch(r"model\.(special_(?:gen|depth|seg)_tokens)", key)
    if match:
        return f"task_tokens.{match.group(1)}"
    if key.startswith(("model.", "lm_head.")):
        return f"llm.{key}"
    return key


def ola_key_to_seed(key: str, tower_prefix: str = "") -> str:
    """The seed checkpoint key of an OlaVLM state_dict key (inverse of ``seed_key_to_ola``);
    ``tower_prefix`` ("vision_model." for transformers-5 CLIP/SigLIP) re-inserts the level the
    seed's files have under ``vision_tower.vision_tower.``."""
    if key.startswith("llm."):
        return key[len("llm."):]
    if key.startswith("task_tokens."):
        return f"model.{key[len('task_tokens.'):]}"
    if key.startswith("mm_projector."):
        return f"model.{key}"
    if key.startswith("vision_tower."):
        rest = key[len("vision_tower."):]
        if tower_prefix and rest.startswith("vision_tower."):
            rest = f"vision_tower.{tower_prefix}{rest[len('vision_tower.'):]}"
        return f"model.vision_tower.{rest}"
    return key


def _task_of(key: str) -> str | None:
    """The task an OlaVLM key belongs to (special tokens, heads, logit scale), else None."""
    match = _TASK_KEY.match(key)
    return match.group(1) if match else None


def _tower_prefix(tower: nn.Module) -> str:
    inner = getattr(tower, "vision_tower", None)
    if getattr(tower, "kind", None) in ("clip", "siglip") and inner is not None and \
            not hasattr(inner, "vision_model"):
        return "vision_model."
    return ""


def _is_cut_tower_key(tower: nn.Module, rest: str) -> bool:
    """Whether a tower key (inside ``tower.vision_tower``) belongs to a part our tower cut away:
    a ViT block after ``select_layer`` (of the tower folder's own depth: a block beyond it is
    not cut but unexpected, a tower folder shallower than the checkpoint's), SigLIP's pooling
    head."""
    blocks = getattr(tower, "num_blocks", None)
    depth = getattr(tower, "num_layers", None)
    match = re.match(r"(?:vision_model\.)?encoder\.layers\.(\d+)\.", rest)
    if blocks is not None and match and int(match.group(1)) >= blocks:
        return depth is None or int(match.group(1)) < depth
    return getattr(tower, "kind", None) == "siglip" and \
        re.match(r"(?:vision_model\.)?head\.", rest) is not None


# ---- reading ---------------------------------------------------------------------------------

def _existing_dir(path, what: str) -> Path:
    if not isinstance(path, (str, Path)) or not str(path):
        raise TypeError(f"{what} must be a non-empty str or Path, got {path!r}")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: {str(folder)!r} is not a directory")
    return folder


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(path)!r} is not valid JSON: {err}") from None


def read_safetensors_dir(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory: ``model.safetensors`` or the shards named by
    ``model.safetensors.index.json`` (every shard must exist; a key may not repeat)."""
    from safetensors.torch import load_file

    folder = _existing_dir(folder, "checkpoint")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{str(index)!r} has no 'weight_map'")
        files = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").is_file():
        weight_map, files = None, ["model.safetensors"]
    else:
        found = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
        raise FileNotFoundError(f"{str(folder)!r} holds neither model.safetensors nor "
                                f"model.safetensors.index.json (found {found}); only safetensors "
                                "checkpoints are read")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{str(path)!r}, a shard named by the index, does not exist")
        part = load_file(str(path))
        repeated = sorted(set(part) & set(tensors))
        if repeated:
            raise ValueError(f"{str(path)!r} repeats keys of another shard: {repeated[:5]}")
        tensors.update(part)
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise ValueError(f"{str(index)!r} names keys its shards lack: {_listed(absent)}")
    return tensors


class SeedCheckpoint(NamedTuple):
    """config: the model's; llm_config: the LLM's transformers config; state_dict: the tensors
    under OlaVLM's names (tower keys still in the seed's inner layout); ignored: seed keys
    dropped (``da_v2_head.*``, tasks outside aux_mode)."""

    config: ModelConfig
    llm_config: object
    state_dict: dict[str, torch.Tensor]
    ignored: list[str]


def read_seed_checkpoint(seed_dir: str | Path, **overrides) -> SeedCheckpoint:
    """Config and renamed tensors of a seed checkpoint directory; no model is built."""
    from .vision import carry_image_size

    folder = _existing_dir(seed_dir, "seed_dir")
    seed_config = _read_json(folder / "config.json")
    tower = seed_config.get("mm_vision_tower")
    if "vision_tower" not in overrides and _bundled(folder, tower):
        seed_config["mm_vision_tower"] = str(folder / tower)  # a tower exported along
    if overrides.get("vision_tower"):  # another folder: still at the recorded ConvNeXt size
        overrides["vision_tower"] = carry_image_size(tower, overrides["vision_tower"])
    config = seed_model_config(seed_config, **overrides)
    llm_config = seed_llm_config(seed_config)
    state, ignored, other_tasks = {}, [], []
    for key, tensor in read_safetensors_dir(folder).items():
        new = seed_key_to_ola(key)
        if new is None:
            ignored.append(key)
        elif _task_of(new) is not None and _task_of(new) not in config.tasks:
            other_tasks.append(key)
        else:
            # The seed's logit scales are 0-d; ours are (1,) (FSDP2 shards no 0-d parameter).
            if new.endswith("_logit_scale") and tensor.numel() != 1:
                raise ValueError(f"{folder}: {key} must be a single value (the seed's is 0-d), "
                                 f"got shape {tuple(tensor.shape)}")
            state[new] = tensor.reshape(1) if new.endswith("_logit_scale") else tensor
    if other_tasks:
        warnings.warn(f"{folder}: dropping {len(other_tasks)} weights of tasks outside aux_mode "
                      f"{config.aux_mode!r}: {_listed(sorted(other_tasks))}", stacklevel=2)
    if "trainable_dtype" not in overrides:
        config = _with_stored_trainable_dtype(config, state)
    return SeedCheckpoint(config, llm_config, state, sorted(ignored + other_tasks))


def _with_stored_trainable_dtype(config: ModelConfig, state: Mapping[str, torch.Tensor]
                                 ) -> ModelConfig:
    """The seed's config.json has one dtype; a checkpoint whose projector is stored in another
    (ours with fp32 trainable parts over a bf16 LLM) keeps that dtype for the trainable parts,
    instead of rounding them to the LLM's on load."""
    import dataclasses  # noqa: PLC0415

    stored = {t.dtype for k, t in state.items() if k.startswith("mm_projector.")}
    llm = {t.dtype for k, t in state.items() if k.startswith("llm.")}
    name = next((n for n, d in _DTYPES.items() if stored == {d}), None)
    if name is None or stored <= llm or name == config.dtype:
        return config
    return dataclasses.replace(config, trainable_dtype=name)


# ---- checking --------------------------------------------------------------------------------

def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def _check_state(given: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], *,
                 optional: set[str], name, where: str) -> None:
    """ValueError listing missing / unexpected keys, then the first wrong shape; ``name`` turns
    an OlaVLM key into the checkpoint's own name for the message."""
    missing = sorted(name(k) for k in expected if k not in given and k not in optional)
    unexpected = sorted(name(k) for k in given if k not in expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys: {_listed(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys: {_listed(unexpected)}")
        raise ValueError(f"{where}: the checkpoint does not match the model its config describes; "
                         + "; ".join(parts))
    for key, tensor in given.items():
        if tuple(tensor.shape) != tuple(expected[key]):
            raise ValueError(f"{where}: {name(key)!r} must have shape {tuple(expected[key])} "
                             f"(from the config), got {tuple(tensor.shape)}")


def _fit_tower_keys(state: dict[str, torch.Tensor], tower: nn.Module, ignored: list[str]
                    ) -> tuple[dict[str, torch.Tensor], bool]:
    """Seed tower keys -> our tower's (drop the ``vision_model.`` level our module lacks, and
    the cut blocks). Returns the new state and whether it holds any tower weight."""
    prefix, inner = _tower_prefix(tower), "vision_tower.vision_tower."
    out, has_tower = {}, False
    for key, tensor in state.items():
        if not key.startswith("vision_tower."):
            out[key] = tensor
            continue
        has_tower = True
        if key.startswith(inner):
            rest = key[len(inner):]
            if _is_cut_tower_key(tower, rest):
                ignored.append(ola_key_to_seed(key))
                continue
            if prefix and rest.startswith(prefix):
                key = inner + rest[len(prefix):]
        out[key] = tensor
    return out, has_tower


def _check_tower_depth(state: Mapping[str, torch.Tensor], tower: nn.Module, where) -> None:
    """A ViT tower folder shallower than the checkpoint's tower would read another block
    (``select_layer`` counts from the end): refuse it, naming both depths."""
    depth = getattr(tower, "num_layers", None)
    found = [int(m.group(1)) for k in state
             if (m := re.match(r"vision_tower\.vision_tower\.(?:vision_model\.)?encoder\."
                               r"layers\.(\d+)\.", k))]
    if depth is not None and found and max(found) >= depth:
        raise ValueError(f"{where}: the checkpoint's vision tower has {max(found) + 1} blocks, "
                         f"the tower folder {getattr(tower, 'name', '')!r} has {depth}: pass "
                         "the tower the checkpoint was trained with (vision_tower_path)")


def _tied_aliases(module: nn.Module, prefix: str) -> set[str]:
    """Names of parameters that are another parameter (tied embeddings): optional in files."""
    seen, aliases = set(), set()
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(prefix + name)
        seen.add(id(param))
    return aliases


def _expected_state(config: ModelConfig, llm_config, tower: nn.Module):
    """Key -> shape of the OlaVLM the config describes, built on the meta device (no memory),
    and the tied aliases of its LLM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    with torch.device("meta"):
        llm = MODEL_FOR_CAUSAL_LM_MAPPING[type(llm_config)](llm_config)
        model = OlaVLM(config, llm=llm, vision_tower=tower)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    return shapes, _tied_aliases(llm, "llm.")


# ---- loading ---------------------------------------------------------------------------------

def _build_llm(llm_config, state: dict[str, torch.Tensor], config: ModelConfig) -> nn.Module:
    """The HF causal LM from in-memory tensors (transformers' own loading path: meta init, dtype,
    tied weights, non-persistent buffers)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(llm_config)]
    llm, info = cls.from_pretrained(
        None, config=llm_config, state_dict=state, dtype=_DTYPES[config.dtype],
        attn_implementation=config.attn_implementation, output_loading_info=True)
    problems = {k: sorted(map(str, v)) for k, v in info.items() if v}
    assert not problems, f"transformers reports {problems} after the strict check"
    return llm


def load_seed_checkpoint(seed_dir: str | Path, vision_tower_path: str | Path | None = None, *,
                         tower: nn.Module | None = None, llm_out: str | Path | None = None,
                         overwrite: bool = False, **overrides) -> OlaVLM:
    """The :class:`OlaVLM` of a seed checkpoint directory (SPEC 11).

    vision_tower_path: the tower's local folder (default: config.json's ``mm_vision_tower``,
    resolved in the local hub cache only); its architecture comes from there, its weights from
    the checkpoint when it has them. tower: an already built tower module instead. llm_out:
    also write the LLM as a plain HF checkpoint there (then ``model.config.llm`` names it; the
    tokenizer files of ``seed_dir`` are copied along). overrides: ModelConfig fields. Returned
    in eval mode, as ``from_pretrained``'s models (``model.train()`` to train it).
    """
    if vision_tower_path is not None:
        if "vision_tower" in overrides:
            raise ValueError("pass vision_tower_path or vision_tower=, not both")
        overrides["vision_tower"] = str(vision_tower_path)
    ckpt = read_seed_checkpoint(seed_dir, **overrides)
    config, ignored = ckpt.config, list(ckpt.ignored)
    if tower is None:
        if not config.vision_tower:
            raise ValueError("config.json has no mm_vision_tower; pass vision_tower_path")
        from .vision import build_vision_tower, tower_dtype_for

        tower = build_vision_tower(config.vision_tower, kind=config.vision_kind,
                                   select_layer=config.vision_select_layer,
                                   dtype=tower_dtype_for(config.dtype))
    _check_tower_depth(ckpt.state_dict, tower, seed_dir)
    state, has_tower = _fit_tower_keys(ckpt.state_dict, tower, ignored)
    expected, optional = _expected_state(config, ckpt.llm_config, tower)
    tower_keys = {k for k in expected if k.startswith("vision_tower.")}
    if not has_tower:
        optional |= tower_keys
    prefix = _tower_prefix(tower)
    _check_state(state, expected, optional=optional, where=str(seed_dir),
                 name=lambda k: ola_key_to_seed(k, prefix))
    llm = _build_llm(ckpt.llm_config, {k[len("llm."):]: v for k, v in state.items()
                                       if k.startswith("llm.")}, config)
    if llm_out is not None:
        _save_llm(llm, llm_out, overwrite=overwrite, tokenizer_from=Path(seed_dir))
        config.llm = str(Path(llm_out))
    model = OlaVLM(config, llm=llm, vision_tower=tower)
    rest = {k: v for k, v in state.items() if not k.startswith("llm.")}
    result = model.load_state_dict(rest, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert all(k.startswith("llm.") or (k in tower_keys and not has_tower)
               for k in result.missing_keys), result.missing_keys
    model.ignored_checkpoint_keys = sorted(ignored)  # for the caller's log
    # The tower's weights are the checkpoint's, not (only) its folder's: exports keep them.
    model.vision_tower_weights_from = str(seed_dir) if has_tower else None
    return model.eval()


def _save_llm(llm: nn.Module, out: str | Path, *, overwrite: bool, tokenizer_from: Path) -> None:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
             "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
    with _atomic_dir(out, overwrite, {"kind": "llm", "source": str(tokenizer_from)}) as tmp:
        llm.save_pretrained(tmp)
        for name in names:
            if (tokenizer_from / name).is_file():
                shutil.copy2(tokenizer_from / name, tmp / name)


# ---- writing ---------------------------------------------------------------------------------

@contextmanager
def _atomic_dir(out_dir: str | Path, overwrite: bool, record: Mapping | None = None
                ) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out_dir``; on success write the
    ``EXPORT_MARKER`` (``record`` in it), fsync, and rename it to ``out_dir`` (replacing it
    only with ``overwrite``, and only a folder this module wrote); on failure remove it.
    Leftovers of interrupted writes into the same name (a killed process's temporary or
    replaced folder, on this host) are removed after a successful write."""
    out = Path(out_dir).expanduser()
    for parent in out.parents:  # "[Errno 17] File exists: 'afile'" names neither
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"{str(out)!r}: {str(parent)!r} is a file, not a "
                                         "folder")
            break
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{str(out)!r} is not empty; pass overwrite=True "
                                  "(olavlm export: --overwrite) to replace it")
        if not any((out / name).is_file() for name in (EXPORT_MARKER, EXPORT_CONFIG)):
            # overwrite replaces an earlier export, never a model folder (a base LLM, a tower,
            # a released checkpoint: all hold a config.json), a run or a data folder
            raise FileExistsError(
                f"{str(out)!r} was not written by an olavlm export (no {EXPORT_MARKER}; a "
                f"model's config.json is not enough: it may be a base model): overwrite "
                f"replaces an earlier export only; choose another folder, or delete it "
                f"yourself if it is an export from an older version")
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{host_tag()}-{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{tag}", dir=out.parent))
    try:
        yield tmp
        (tmp / EXPORT_MARKER).write_text(json.dumps(
            {"written_by": "olavlm", **(record or {})}, indent=2, default=str))
        os.chmod(tmp, 0o755)
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        if out.exists():
            old = out.parent / f".{out.name}.old-{tag}{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            # From here ``out`` is the new export: nothing below may fail the write (a
            # leftover ``old`` is removed by the next write into this name).
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        with contextlib.suppress(OSError):
            _fsync_dir(out.parent)
        _remove_dead_leftovers(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ``.<name>.tmp-<host>-<pid>-<mkdtemp's 8>`` / ``.<name>.old-<host>-<pid>-<8 hex>``, and the
# names of versions without host and pid (only those exact shapes: a user's `.hf.old-backup`
# is not ours).
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-"
                       r"[a-z0-9_]{8}")
_LEGACY_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?:tmp-[a-z0-9_]{8}|old-[0-9a-f]{8})")


def _remove_dead_leftovers(out: Path) -> None:
    """Remove ``.<name>.tmp-*`` / ``.<name>.old-*`` beside ``out`` left by a killed write into
    the same name: those of a process of this host that no longer runs, and those of older
    versions (no host and pid in the name). ``out`` itself was just written, so nothing they
    hold is the only copy of an export. Never raises: ``out`` is in place already."""
    host = host_tag()
    for path in out.parent.glob(f".{glob_escape(out.name)}.[to][ml][pd]-*"):
        match = _LEFTOVER.fullmatch(path.name)
        legacy = None if match else _LEGACY_LEFTOVER.fullmatch(path.name)
        found = match or legacy
        if found is None or found["name"] != out.name or not path.is_dir():
            continue
        if match and (match["host"] != host or process_alive(int(match["pid"]))):
            continue
        warnings.warn(f"removing {path}: the leftover of an interrupted export into {out}",
                      stacklevel=4)
        shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform opens directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _saveable(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous, CPU tensors that share no storage (safetensors refuses sharing)."""
    out, seen = {}, set()
    for key, tensor in state.items():
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[key] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def _write_safetensors(state: Mapping[str, torch.Tensor], folder: Path,
                       max_shard_size: int | None) -> None:
    """``model.safetensors``, or shards of at most ``max_shard_size`` bytes (a tensor larger
    than that gets a shard of its own) plus ``model.safetensors.index.json``."""
    from safetensors.torch import save_file

    state = _saveable(state)
    sizes = {k: t.numel() * t.element_size() for k, t in state.items()}
    total = sum(sizes.values())
    if max_shard_size is None or total <= max_shard_size:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    shards: list[list[str]] = [[]]
    used = 0
    for key in state:
        if shards[-1] and used + sizes[key] > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += sizes[key]
    weight_map = {}
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: state[k] for k in keys}, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _own_state(model: OlaVLM) -> dict[str, torch.Tensor]:
    """The trainable non-LLM parts: projector, task tokens, heads, logit scales."""
    return {k: v for k, v in model.state_dict().items()
            if not k.startswith(("llm.", "vision_tower."))}


def _bundled(folder: Path, value) -> bool:
    """``value`` names a tower folder that an export copied into ``folder`` (a relative name,
    perhaps with the ``-res<N>`` suffix that gives a ConvNeXt's input side)."""
    from .vision import strip_res_suffix

    return (isinstance(value, str) and bool(value) and not os.path.isabs(value)
            and ((folder / value).is_dir() or (folder / strip_res_suffix(value)).is_dir()))


def _bundle_tower(value, tmp: Path) -> str:
    """Copy the local tower folder ``value`` into the export being written (``tmp``), under its
    own name (the tower's class is picked from its name), and return that relative name (with
    ``value``'s ``-res<N>`` suffix, when the folder is named without it)."""
    from .vision import strip_res_suffix

    src, suffix = Path(value), ""
    if not src.is_dir() and Path(strip_res_suffix(value)).is_dir():
        src = Path(strip_res_suffix(value))
        suffix = Path(value).name[len(src.name):]
    if not src.is_dir():
        raise FileNotFoundError(f"vision tower folder {str(src)!r} does not exist: nothing to "
                                "bundle with the export")
    shutil.copytree(src, tmp / src.name)
    return src.name + suffix


def _inside(value, out_dir) -> bool:
    """``value`` names a tower folder inside ``out_dir``: an earlier export's bundled tower,
    which replacing ``out_dir`` would delete; the new export must bundle it again."""
    from .vision import strip_res_suffix

    if not value or not isinstance(value, str):
        return False
    src = Path(value) if Path(value).is_dir() else Path(strip_res_suffix(value))
    return src.is_dir() and src.resolve().is_relative_to(Path(out_dir).resolve())


def _sized_tower_name(model: OlaVLM, name):
    """A ConvNeXt tower's name with its input side (``-res<N>``): the size the model was
    built at (data.image_size) travels with the export."""
    from .vision import ConvNextVisionTower, name_with_image_size

    if name and isinstance(model.vision_tower, ConvNextVisionTower):
        return name_with_image_size(name, model.vision_tower.image_size)
    return name


def _portable_path(value):
    """A tower named by a relative local path (a run's ``runs/<name>/models/tiny-clip``) as an
    absolute one, so the exported folder loads from any working directory; hub ids and absolute
    paths are kept."""
    if value and isinstance(value, str) and not os.path.isabs(value) and os.path.exists(value):
        return os.path.abspath(value)
    return value


def export_hf(model: OlaVLM, out_dir: str | Path, *, overwrite: bool = False,
              include_vision_tower: bool | None = None, bundle_vision_tower: bool = False,
              tokenizer=None, record: Mapping | None = None) -> Path:
    """Write ``out_dir/llm`` (the LLM's ``save_pretrained``), ``olavlm.safetensors`` (the
    projector, task tokens, heads and logit scales under OlaVLM's keys), ``olavlm_config.json``
    (``ModelConfig.to_dict()`` with ``llm: "llm"`` and the LLM's actual dtype) and, with
    ``include_vision_tower``, ``vision_tower.safetensors`` (the tower's kept blocks; by default
    when the tower's weights were loaded from a checkpoint, ``load_seed_checkpoint`` or an
    export's ``vision_tower.safetensors``, rather than only from its folder).
    ``bundle_vision_tower``: copy the tower's local folder (config and weights) into the export
    and name it there, so the export does not depend on where the tower was (a run's
    generated tiny tower). ``tokenizer``: saved into ``llm/`` (where ``from_pretrained``
    looks), inside the same atomic write. ``record``: JSON-able facts for ``EXPORT_MARKER``
    (where the weights came from, the image view they were trained with). Returns
    ``out_dir``. Read it back with :func:`load_exported`."""
    from safetensors.torch import save_file

    if include_vision_tower is None:
        include_vision_tower = getattr(model, "vision_tower_weights_from", None) is not None
    if bundle_vision_tower and not model.config.vision_tower:
        raise ValueError("bundle_vision_tower: the model's config names no vision tower folder "
                         "(config.vision_tower is empty: a tower module passed in); set "
                         "model.config.vision_tower to its folder, or do not bundle")
    config = model.config.to_dict()
    # Both dtypes as the tensors are (an LLM cast after construction, trainable parts kept):
    # the reload builds them so, instead of rounding the written fp32 parts to the LLM's.
    config.update(llm="llm", dtype=_llm_dtype_name(model),
                  vision_tower=_sized_tower_name(model, _portable_path(config.get("vision_tower"))))
    own = _own_state(model)
    stored = {t.dtype for k, t in own.items() if k.startswith("mm_projector.")}
    trainable = next((n for n, d in _DTYPES.items() if stored == {d}), None)
    if trainable is not None:
        config["trainable_dtype"] = None if trainable == config["dtype"] else trainable
    with _atomic_dir(out_dir, overwrite, {"kind": "hf", **(record or {})}) as tmp:
        model.llm.save_pretrained(tmp / "llm")
        save_file(_saveable(own), str(tmp / EXPORT_WEIGHTS),
                  metadata={"format": "pt", "olavlm_export": "1"})
        if include_vision_tower:
            save_file(_saveable(model.vision_tower.state_dict()), str(tmp / EXPORT_TOWER),
                      metadata={"format": "pt"})
        if bundle_vision_tower or _inside(config["vision_tower"], out_dir):
            config["vision_tower"] = _bundle_tower(config["vision_tower"], tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "llm"))
        (tmp / EXPORT_CONFIG).write_text(json.dumps(config, indent=2))
    return Path(out_dir)


def load_exported(out_dir: str | Path, vision_tower_path: str | Path | None = None, *,
                  tower: nn.Module | None = None, **overrides) -> OlaVLM:
    """The :class:`OlaVLM` that :func:`export_hf` wrote. The tower is ``tower`` if given, else
    built from ``vision_tower_path`` or the config's ``vision_tower``; ``vision_tower.safetensors``
    (if present) overrides its weights. ``overrides``: ModelConfig fields. Returned in eval
    mode, as ``from_pretrained``'s models (``model.train()`` to train it)."""
    from safetensors.torch import load_file

    from .vision import carry_image_size

    folder = _existing_dir(out_dir, "out_dir")
    values = _read_json(folder / EXPORT_CONFIG)
    llm = Path(values.get("llm") or "llm")
    values["llm"] = str(llm if llm.is_absolute() else folder / llm)
    if _bundled(folder, values.get("vision_tower")):
        values["vision_tower"] = str(folder / values["vision_tower"])
    if vision_tower_path is not None:  # at the recorded ConvNeXt input size (vision.py)
        values["vision_tower"] = carry_image_size(values.get("vision_tower"), vision_tower_path)
    values.update(overrides)
    try:
        config = ModelConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{str(folder / EXPORT_CONFIG)!r}: {exc}") from exc
    if tower is None and not config.vision_tower:
        raise ValueError(f"{str(folder)!r}: the config names no vision tower; pass "
                         "vision_tower_path or tower=")
    weights = folder / EXPORT_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{str(weights)!r} does not exist")
    state = load_file(str(weights))
    model = OlaVLM(config, vision_tower=tower)
    expected = {k: v.shape for k, v in _own_state(model).items()}
    _check_state(state, expected, optional=set(), name=str, where=str(weights))
    if (folder / EXPORT_TOWER).is_file():
        tower_state = load_file(str(folder / EXPORT_TOWER))
        want = {k: v.shape for k, v in model.vision_tower.state_dict().items()}
        _check_state(tower_state, want, optional=set(), name=str, where=str(folder / EXPORT_TOWER))
        stored = {t.dtype for t in tower_state.values() if t.is_floating_point()}
        if len(stored) == 1 and tower is None:  # the tower as it was saved, not rounded
            model.vision_tower.to(stored.pop())
        model.vision_tower.load_state_dict(tower_state)
        model.vision_tower_weights_from = str(folder)
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return model.eval()  # (as from_pretrained returns; the trainer sets train mode per step)


def export_seed_layout(model: OlaVLM, out_dir: str | Path, *, overwrite: bool = False,
                       max_shard_size: int | None = None, include_vision_tower: bool = True,
                       image_aspect_ratio: str = "pad", bundle_vision_tower: bool = False,
                       tokenizer=None, record: Mapping | None = None) -> Path:
    """Write ``model`` in the seed's layout (SPEC 11 keys, ``seed_config_dict`` as
    ``config.json``), sharded above ``max_shard_size`` bytes. The tower's keys are those of
    the blocks it holds (the seed's files have every block; our importer accepts either).
    Tied LM heads are not written (HF convention). ``tokenizer``: saved into the folder, inside
    the same atomic write. ``record``: as :func:`export_hf`. Returns ``out_dir``."""
    if bundle_vision_tower and not model.config.vision_tower:  # as export_hf
        raise ValueError("bundle_vision_tower: the model's config names no vision tower folder "
                         "(config.vision_tower is empty: a tower module passed in); set "
                         "model.config.vision_tower to its folder, or do not bundle")
    prefix = _tower_prefix(model.vision_tower)
    tied = _tied_aliases(model.llm, "llm.")
    state = {ola_key_to_seed(k, prefix): v.reshape(()) if k.endswith("_logit_scale") else v
             for k, v in model.state_dict().items()
             if k not in tied and (include_vision_tower or not k.startswith("vision_tower."))}
    config = seed_config_dict(model, image_aspect_ratio=image_aspect_ratio)
    if not config.get("mm_vision_tower"):  # the seed's builder picks its tower by this name
        raise ValueError("the model's config names no vision tower folder (config.vision_tower "
                         "is empty: a tower module passed in), and the seed's config.json "
                         "needs one (mm_vision_tower); set model.config.vision_tower to the "
                         "tower's folder or name")
    if "mm_vision_tower" in config:
        config["mm_vision_tower"] = _sized_tower_name(model,
                                                      _portable_path(config["mm_vision_tower"]))
    with _atomic_dir(out_dir, overwrite, {"kind": "seed", **(record or {})}) as tmp:
        _write_safetensors(state, tmp, max_shard_size)
        if config.get("mm_vision_tower") and (  # as export_hf
                bundle_vision_tower or _inside(config["mm_vision_tower"], out_dir)):
            config["mm_vision_tower"] = _bundle_tower(config["mm_vision_tower"], tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return Path(out_dir)
