# Typed, nested run configuration of `olavlm train` (model, data, teachers, parallel, ...).
"""The run configuration: one dataclass per concern, nested in :class:`Config`.

Loading (YAML/JSON files, dotted ``key=value`` overrides, type checks, unknown keys rejected
with the valid choices named) lives in the functions at the bottom of this module.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from olavlm.models.config import ATTN_IMPLEMENTATIONS, IMPLS, TASKS, HeadConfig, ModelConfig

__all__ = [
    "CHOICES",
    "KEY_CHOICES",
    "RANGES",
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "LoggingConfig",
    "OptimConfig",
    "ParallelConfig",
    "TeachersConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "environment_record",
    "load_config_file",
    "resolve_config",
    "save_resolved_config",
]


@dataclass
class DataConfig:
    """path: LLaVA .json/.jsonl file(s), comma-separated ("" = the built-in synthetic
    dataset, generated under synthetic_dir on first use)."""

    path: str = ""
    image_folder: str | None = None
    tokenizer: str | None = None  # None: the synthetic dataset's tokenizer/, else model.llm's
    template: str = "llava_llama_3"
    batch_size: int = 8  # per rank, per micro-step
    num_workers: int = 0
    shuffle: bool = True
    group_by_modality_length: bool = False
    aspect: str = "square"  # square (PT) | pad (VPT/IFT), SPEC 1.1
    on_bad_sample: str = "skip"
    # Stop when more than this fraction of the samples is rejected (a wrong image_folder would
    # otherwise train on the text-only rest); checked after 64 samples of an epoch. 1.0: never.
    max_reject_fraction: float = 0.5
    image_size: int | None = None  # the tower's input side; None: the tower's own (CLIP 336)
    synthetic_dir: str = "~/.cache/olavlm/synthetic"
    synthetic_num: int = 512
    synthetic_size: int = 64


@dataclass
class TeachersConfig:
    """mode: "online" (teachers run batched on the training device), "cache" (targets read
    from cache_dir, written by `olavlm targets extract`) or "none" (no embedding losses)."""

    mode: str = "online"
    names: str = "synthetic"  # comma list: synthetic | depth,seg,gen
    weights: dict[str, str] = field(default_factory=dict)  # task -> local model path
    # Online mode: teacher -> compute dtype (bf16 | fp16 | fp32); a teacher not named runs in
    # its default: the seed's on accelerators (bf16, fp16 for gen), fp32 on the CPU.
    dtype: dict[str, str] = field(default_factory=dict)
    cache_dir: str | None = None
    on_missing_target: str = "mask"
    compile: bool = False
    side_stream: bool = False
    # Online mode: where the image teachers' inputs are resized. "device": decoded uint8 images
    # go to the teachers, which resize them batched on the training device (antialiased
    # bicubic, within a few levels of PIL); "host": the loader workers compute each teacher's
    # view with PIL (the seed's exact pixels; CPU work in the data workers).
    resize: str = "device"
    # Options of the synthetic teacher (grid, depth_dim, seg_dim, gen_dim, seed); {} = its
    # defaults, the real targets' shapes (24 x 24 grid, 1024 / 1536 / 1024).
    synthetic: dict[str, int] = field(default_factory=dict)


@dataclass
class ParallelConfig:
    """fsdp: shard with FSDP2 when more than one process runs ("auto"), always, or never.
    mixed_precision: parameter dtype of the compute ("bf16" | "fp32"); reductions in fp32."""

    fsdp: str = "auto"  # auto | on | off
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    mixed_precision: str = "fp32"  # fp32 | bf16
    reduce_dtype: str = "fp32"
    activation_checkpointing: str = "none"  # none | selective | full
    compile: bool = False  # per decoder block
    float8: str = "none"  # none | tensorwise | rowwise (torchao; H100/MI300X)
    tf32: bool = True
    sdpa_backend: str = "auto"  # auto | flash | efficient | cudnn | math
    liger: bool = False  # liger-kernel RMSNorm / SwiGLU modules (RoPE stays: docs/train.md)
    # rank0: with FSDP2 on several ranks, rank 0 alone loads the weights; the others build the
    # model on the meta device and receive their shards from it (olavlm.train.load).
    # every_rank: each rank loads the whole model, then shards it. One process: no effect.
    load: str = "rank0"


@dataclass
class OptimConfig:
    lr: float = 1e-3
    projector_lr: float | None = None  # None: lr
    head_lr: float | None = None  # heads, task tokens, logit scales; None: lr
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    schedule: str = "cosine"  # cosine | constant
    grad_clip: float = 1.0
    grad_accum: int = 1
    fused: str = "auto"  # auto | on | off (torch's fused AdamW; apex when installed)


@dataclass
class TrainConfig:
    stage: str = "pt"  # pt | vpt | ift: what is trainable (SPEC 5.1); full: all but the tower
    max_steps: int = 200  # optimizer steps; 0: train.epochs epochs of the data
    epochs: int = 1
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    output_dir: str = "runs"
    run_name: str | None = None  # None: <recipe>-<timestamp>
    nonfinite_limit: int = 5  # stop after this many non-finite losses in a row


@dataclass
class CheckpointConfig:
    every_steps: int = 100  # 0: only at the end and on SIGTERM/SIGINT
    keep_last: int = 3
    resume: str | None = "auto"  # auto (latest valid in the run dir) | none (or null) | <path>
    # Weights to start from (VPT or IFT from PT, or IFT from VPT): model weights only, no
    # optimizer or data state; resume wins over it when the run directory holds a checkpoint.
    init_from: str | None = None
    at_end: bool = True


@dataclass
class LoggingConfig:
    every_steps: int = 1
    progress: bool = True
    jsonl: bool = True
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "olavlm"
    plot: bool = True


@dataclass
class Config:
    recipe: str = "demo"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# -- the values each enumerated field accepts, by dotted path (the trainer reuses these) ------
CHOICES: dict[str, tuple[str, ...]] = {
    "model.vision_kind": ("clip", "convnext", "siglip"),  # or None: from the path's name
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.impl": IMPLS,
    "model.attn_implementation": ATTN_IMPLEMENTATIONS,
    "data.template": ("llava_llama_3", "llava_phi_3", "plain"),  # olavlm.data.templates
    "data.aspect": ("square", "pad", "stretch"),  # olavlm.data.images.ASPECTS
    "data.on_bad_sample": ("skip", "raise"),
    "teachers.mode": ("online", "cache", "none"),
    "teachers.on_missing_target": ("mask", "raise"),
    "teachers.resize": ("device", "host"),
    "parallel.fsdp": ("auto", "on", "off"),
    "parallel.backend": ("auto", "nccl", "gloo"),
    "parallel.mixed_precision": ("fp32", "bf16"),
    "parallel.reduce_dtype": ("fp32", "bf16"),
    "parallel.activation_checkpointing": ("none", "selective", "full"),
    "parallel.float8": ("none", "tensorwise", "rowwise"),
    "parallel.sdpa_backend": ("auto", "flash", "efficient", "cudnn", "math"),
    "parallel.load": ("rank0", "every_rank"),
    "optim.schedule": ("cosine", "constant"),
    "optim.fused": ("auto", "on", "off", "apex"),
    "train.stage": ("pt", "vpt", "ift", "full"),
    "train.device": ("auto", "cpu", "cuda"),
}
# Closed sets of keys of dict-typed fields (other dict fields take any string key).
KEY_CHOICES: dict[str, tuple[str, ...]] = {
    "model.heads": TASKS,
    "teachers.synthetic": ("grid", "depth_dim", "seg_dim", "gen_dim", "seed"),
}
# Inclusive (low, high) bounds of numeric fields; None: unbounded on that side.
RANGES: dict[str, tuple[float | None, float | None]] = {
    "data.batch_size": (1, None),
    "data.num_workers": (0, None),
    "data.image_size": (1, None),
    "data.synthetic_num": (1, None),
    "data.synthetic_size": (32, None),  # (the synthetic scenes need 32 px at least)
    "data.max_reject_fraction": (0.0, 1.0),
    "optim.lr": (0.0, None),
    "optim.projector_lr": (0.0, None),
    "optim.head_lr": (0.0, None),
    "optim.weight_decay": (0.0, None),
    "optim.eps": (0.0, None),
    "optim.warmup_ratio": (0.0, 1.0),
    "optim.grad_clip": (0.0, None),  # 0: no clipping
    "optim.grad_accum": (1, None),
    "train.max_steps": (0, None),
    "train.epochs": (1, None),
    "train.nonfinite_limit": (1, None),
    "checkpoint.every_steps": (0, None),
    "checkpoint.keep_last": (0, None),  # 0: keep every checkpoint
    "logging.every_steps": (1, None),
    "model.num_task_tokens": (1, None),
    "model.contrastive_weight": (0.0, None),
    "model.max_length": (1, None),
    "model.smooth_l1_beta": (0.0, None),
    "model.num_sys_tokens": (0, None),
}
# Fields whose annotation is looser than what they hold.
_FIELD_TYPES: dict[tuple[type, str], Any] = {(ModelConfig, "heads"): dict[str, HeadConfig]}


# -- dict -> typed Config ---------------------------------------------------------------------
class _TypeMismatch(ValueError):
    """A value of the wrong type (a union tries its next member on this one only)."""


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if tp is type(None):
        return "None"
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    return getattr(tp, "__name__", str(tp))


def _unknown(path: str, key: Any, valid: list[str], what: str = "config key") -> ValueError:
    match = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
    hint = f" (did you mean {_join(path, match[0])!r}?)" if match else ""
    if "." not in path and what == "config key":  # "lr" at the top level or in the wrong
        # section: the exact key of another section beats a near spelling in this one
        owners = [f"{name}.{key}" for name, tp in _hints(Config).items()
                  if dataclasses.is_dataclass(tp) and name != path and key in _field_names(tp)]
        hint = f" (did you mean {owners[0]!r}?)" if owners else hint
    where = f"in {path}" if path else "at the top level"
    return ValueError(f"unknown {what} {_join(path, str(key))!r}{hint}; valid keys {where}: "
                      f"{', '.join(valid)}")


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        hints = typing.get_type_hints(cls, globalns=vars(sys.modules[cls.__module__]))
        _HINTS[cls] = {name: _FIELD_TYPES.get((cls, name), hints[name])
                       for name in _field_names(cls)}
    return _HINTS[cls]


def _check_value(path: str, value: Any) -> None:
    numbers = value if isinstance(value, (list, tuple)) else [value]
    if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
        raise ValueError(f"{path}: expected a finite number, got {value!r}")
    if path == "optim.betas" and not all(0.0 <= b < 1.0 for b in value):
        raise ValueError(f"{path}: expected two values in [0, 1), got {list(value)!r}")
    if path == "model.projector" and not re.fullmatch(r"linear|mlp[1-9]\d*x_gelu", value):
        raise ValueError(f"{path}: expected mlp2x_gelu (the seed's), mlpNx_gelu with N >= 1, or "
                         f"linear, got {value!r}")
    if path == "train.run_name" and value is not None and (
            value.startswith("/") or any(p in ("", ".", "..") for p in value.split("/"))):
        raise ValueError(f"{path}: expected a folder inside train.output_dir (a name or a "
                         f"relative path such as exp/a, without '.' or '..'), got {value!r}")
    choices = CHOICES.get(path)
    if choices is not None and value is not None and value not in choices:
        match = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
        hint = f" (did you mean {match[0]!r}?)" if match else ""
        raise ValueError(f"{path}: expected one of {', '.join(choices)}, got {value!r}{hint}")
    low, high = RANGES.get(path, (None, None))
    if value is not None and ((low is not None and value < low) or
                              (high is not None and value > high)):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{path}: expected a value {bounds}, got {value!r}")


def _build(cls: type, data: Any, path: str) -> Any:
    """``cls(**data)`` with every key known and every value coerced to its annotation."""
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        data = dataclasses.asdict(data)
    if not isinstance(data, Mapping):
        raise _TypeMismatch(f"{path or 'config'}: expected a mapping of {cls.__name__} keys, "
                            f"got {_show(data)}")
    hints, kwargs = _hints(cls), {}
    for key, value in data.items():
        if key not in hints:
            raise _unknown(path, key, list(hints))
        sub = _join(path, key)
        kwargs[key] = _coerce(value, hints[key], sub)
        _check_value(sub, kwargs[key])
    required = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in kwargs
                and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    if required:
        raise ValueError(f"{path or 'config'}: missing required keys {required}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}" if path else str(e)) from e


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """``value`` as the annotation ``tp`` says, or a ValueError naming ``path``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def mismatch(extra: str = "") -> _TypeMismatch:
        return _TypeMismatch(f"{path}: expected {_type_name(tp)}{extra}, got {_show(value)}")

    if tp is Any:
        return _plain(value)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _coerce(value, arg, path)
                except _TypeMismatch:
                    continue
        null = type(None) in args and isinstance(value, str) and value.lower() == "none"
        raise mismatch(" (write null for None)" if null else "")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if tp is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise mismatch()
        key_tp, value_tp = args or (Any, Any)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise _TypeMismatch(f"{path}: keys must be str, got {_show(k)}")
            if path in KEY_CHOICES and k not in KEY_CHOICES[path]:
                raise _unknown(path, k, list(KEY_CHOICES[path]), "key")
            out[k] = _coerce(v, value_tp, _join(path, k))
        return out
    if tp in (tuple, list) or origin in (tuple, list):
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
            raise mismatch(" (a list)")
        kind = origin or tp
        if kind is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise mismatch(f" (a list of {len(args)})")
            return tuple(_coerce(v, a, f"{path}[{i}]")
                         for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item_tp = args[0] if args else Any
        return kind(_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise mismatch()
    if tp is int:
        if isinstance(value, bool):
            raise mismatch()
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):  # YAML reads "1e3" (no dot) as a string
            try:
                return int(value.strip())
            except ValueError:
                pass
            try:
                number = float(value.strip())
            except ValueError:
                number = math.nan
            if number.is_integer():
                return int(number)
        raise mismatch()
    if tp is float:
        if isinstance(value, bool):
            raise mismatch()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-3" (no dot) as a string
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise mismatch()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool) and {"on", "off"} <= set(CHOICES.get(path, ())):
            return "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        if isinstance(value, (_SpelledInt, _SpelledFloat)):  # run_name: 007 -> "007"
            return value.text
        if isinstance(value, int) and not isinstance(value, bool):  # run_name=2024
            return str(value)
        raise mismatch()
    if isinstance(tp, type) and isinstance(value, tp):
        return _plain(value)
    raise mismatch()


def _check_config(cfg: Config) -> None:
    """Rules that tie two fields together."""
    if cfg.teachers.mode == "cache" and not cfg.teachers.cache_dir:
        raise ValueError("teachers.mode: 'cache' needs teachers.cache_dir (a cache written by "
                         "`olavlm targets extract`); set it, or teachers.mode=online")


def config_from_dict(data: Mapping) -> Config:
    """The typed :class:`Config` of a nested mapping (a loaded file, a recipe's dict).

    Every key must be a field (an unknown one raises ValueError naming its dotted path, the
    valid keys and the closest one); every value is checked against its annotation: ints are
    taken for floats, strings that parse are taken for numbers ("1e-3") and booleans ("true"),
    a bool is never an int, lists become tuples, mappings become the nested dataclasses
    (``model.heads.<task>`` -> HeadConfig). Enumerated strings must be one of ``CHOICES``,
    numbers within ``RANGES``. Keys left out keep the dataclass defaults.
    """
    try:
        cfg = _build(Config, data, "")
    except _TypeMismatch as e:  # the private class only steers unions
        raise ValueError(str(e)) from None
    _check_config(cfg)
    return cfg


# -- files, overrides, recipes ----------------------------------------------------------------
def _yaml():
    try:
        import yaml
    except ImportError:
        return None
    return yaml


class _SpelledInt(int):
    """A number read from a file or an override that remembers how it was written: a str field
    (``train.run_name: 007``, ``2024_01``, ``0x1F``) takes the text, not YAML's re-spelling of
    the number (``7``, ``202401``, ``31``). Numeric fields take the plain number."""

    text: str


class _SpelledFloat(float):
    text: str


_SpelledInt.__name__ = "int"  # (what an error message shows as the value's type)
_SpelledFloat.__name__ = "float"


def _spelled(value: Any, text: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    out = _SpelledInt(value) if isinstance(value, int) else _SpelledFloat(value)
    out.text = text.strip()
    return out


def _plain(value: Any) -> Any:
    """``value`` with every remembered spelling dropped (plain int/float inside lists and
    mappings): what an untyped field (``dict`` of anything) keeps, so the config dumps."""
    if isinstance(value, _SpelledInt):
        return int(value)
    if isinstance(value, _SpelledFloat):
        return float(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def _spelling_loader(yaml):
    """PyYAML's safe loader whose numbers remember their text (see _SpelledInt)."""

    class Loader(yaml.SafeLoader):
        pass

    for tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
        plain = yaml.SafeLoader.yaml_constructors[tag]
        Loader.add_constructor(
            tag, lambda loader, node, plain=plain: _spelled(plain(loader, node), node.value))
    return Loader


def _cyclic(node: Any, ancestors: tuple[int, ...] = (), done: set[int] | None = None) -> bool:
    """Whether a container holds itself (YAML anchors can; a shared alias elsewhere is fine).
    ``done``: containers already found acyclic, each walked once (shared aliases nest)."""
    done = set() if done is None else done
    if not isinstance(node, (dict, list)) or id(node) in done:
        return False
    if id(node) in ancestors:
        return True
    children = node.values() if isinstance(node, dict) else node
    if any(_cyclic(child, (*ancestors, id(node)), done) for child in children):
        return True
    done.add(id(node))
    return False


def load_config_file(path: str | os.PathLike) -> dict:
    """The mapping in a .yaml/.yml (PyYAML) or .json file."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise ValueError(f"config file {str(path)!r} is a folder; expected a .yaml, .yml or "
                         ".json file (a run's saved config is RUN_DIR/config.yaml)")
    if not file.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    suffix = file.suffix.lower()
    try:
        text = file.read_text(encoding="utf-8-sig")  # (a leading BOM, as Windows editors add)
    except UnicodeDecodeError as e:
        raise ValueError(f"config file {str(path)!r} is not UTF-8 text: {e}") from None
    if suffix in (".yaml", ".yml"):
        yaml = _yaml()
        if yaml is None:
            raise ValueError(f"config file {str(path)!r}: reading YAML needs PyYAML "
                             "(pip install pyyaml); or write the config as .json")
        try:
            data = yaml.load(text, Loader=_spelling_loader(yaml))  # noqa: S506 - a SafeLoader
        except yaml.YAMLError as e:
            raise ValueError(f"config file {str(path)!r} is not valid YAML: {e}") from e
        if _cyclic(data):  # an alias inside its own anchor: a: &x [*x]
            raise ValueError(f"config file {str(path)!r}: a YAML alias refers to itself (a "
                             "recursive anchor); a config holds no cycles")
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {str(path)!r} is not valid JSON: {e}") from e
    else:
        raise ValueError(f"config file {str(path)!r}: expected a .yaml, .yml or .json file, "
                         f"got {suffix or 'no extension'!r}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of sections "
                         f"(model, data, ...), got {type(data).__name__}")
    return data


def _parse_value(text: str) -> Any:
    try:
        return _spelled(json.loads(text), text)
    except ValueError:
        return text


def apply_overrides(data: Mapping, overrides: list[str]) -> dict:
    """A copy of ``data`` with each ``dotted.key=value`` set, in order.

    Values are JSON when they parse as JSON (``2e-5``, ``true``, ``null``, ``[0.9,0.95]``,
    ``{"depth": [2, 4]}``), else the raw string (``d18-20_s10-18_g12-20``, paths). Missing
    sections are created; unknown keys are left for :func:`config_from_dict` to reject.
    """
    out = _jsonable(data)  # a deep copy, mappings as dicts
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            from olavlm.recipes import RECIPES

            named = item.strip() if not sep and item.strip() in RECIPES else None
            hint = f" (the recipe? --recipe {named})" if named else ""
            raise ValueError(f"malformed override {item!r}: expected dotted.key=value, e.g. "
                             f"optim.lr=2e-5 or model.heads.gen.output_dim=512{hint}")
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {'.'.join(parts[:depth + 1])} is not a "
                                 f"section, it holds {child!r}")
            node = child
        node[parts[-1]] = _parse_value(text)
    return out


def _merge(base: dict, top: Mapping, tp: Any = None) -> dict:
    """``top`` over ``base``, where ``tp`` is what they hold (Config when None). Sections and
    mappings merge key by key, so a file setting only ``optim.lr`` keeps the recipe's other
    optimizer settings, and ``teachers.synthetic: {seed: 3}`` the recipe's other synthetic
    keys. An empty mapping given to a mapping field (``model.heads: {}``,
    ``teachers.weights: {}``) empties it, as the override does."""
    tp = Config if tp is None else tp
    out = dict(base)
    for key, value in top.items():
        if dataclasses.is_dataclass(tp):
            inner = _hints(tp).get(key)  # (an unknown key is replaced: config_from_dict names it)
        else:
            inner = typing.get_args(tp)[1] if typing.get_args(tp) else Any
        merges = dataclasses.is_dataclass(inner) or bool(value)
        if merges and isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value, inner)
        else:
            out[key] = value
    return out


# Keys added after run configs were first saved: a config.yaml written before one of them
# existed is still a complete saved config (the key takes its dataclass default).
ADDED_KEYS = frozenset({"teachers.resize", "teachers.dtype"})


def with_added_keys(data: Mapping) -> dict:
    """``data`` (a saved config) with the ``ADDED_KEYS`` it predates set to their defaults:
    what the run ran with, comparable key by key with a config of this version."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    defaults = config_to_dict(Config())
    for key in ADDED_KEYS:
        section, name = key.split(".")
        if isinstance(out.get(section), dict) and name not in out[section]:
            out[section][name] = defaults[section][name]
    return out


def _is_complete(data: Mapping) -> bool:
    """Whether ``data`` sets every key of every section (one written before an ``ADDED_KEYS``
    key existed too): a run's saved config.yaml, which replays as is (the recipe's mappings
    are not merged into the ones the run narrowed)."""

    def covers(cls, node) -> bool:
        if not isinstance(node, Mapping) or set(_field_names(cls)) - set(node):
            return False
        return all(covers(tp, node[name]) for name, tp in _hints(cls).items()
                   if dataclasses.is_dataclass(tp))

    return covers(Config, with_added_keys(data))


def resolve_config(recipe: str | None, config_file: str | os.PathLike | None,
                   overrides: list[str] | tuple[str, ...] = (), *,
                   config_data: Mapping | None = None) -> Config:
    """The run's Config: the recipe's defaults <- the file <- the overrides.

    The recipe is ``recipe`` (or a ``recipe=`` override; both, different: ValueError), else the
    file's ``recipe`` key, else "demo"; a complete file (a saved config.yaml) naming another
    recipe than ``recipe`` raises ValueError (it would replay under a wrong label); unknown
    names raise ValueError listing the recipes. Sections merge key by key (a file that sets only
    ``optim.lr`` keeps the recipe's other optimizer settings); a file that sets every key (a
    run's saved config.yaml) is taken as is, so it replays as the config that ran.
    ``config_data``: the file's contents already read (a checkpoint's recorded config);
    ``config_file`` then only names where they came from in messages.
    """
    from olavlm.recipes import get_recipe

    if config_data is not None:
        file_data = dict(config_data)
    else:
        file_data = load_config_file(config_file) if config_file is not None else {}
    if config_file is not None:  # (an unknown key there is not an override's typo)
        try:
            _check_keys(Config, file_data, "")
        except ValueError as e:
            raise ValueError(f"config file {str(config_file)!r}: {e}") from None
    overrides, chosen = _recipe_overrides(list(overrides))
    if chosen is not None and recipe is not None and chosen != recipe:
        raise ValueError(f"recipe given twice: --recipe {recipe} and the override "
                         f"recipe={chosen}; keep one")
    in_file = file_data.get("recipe")
    given = recipe or chosen
    if (given is not None and in_file is not None and given != in_file
            and _is_complete(file_data)):  # a partial file's keys go over ``given``'s defaults
        how = f"--recipe {recipe}" if recipe else f"the override recipe={chosen}"
        raise ValueError(f"recipe given twice: {how} and recipe: {in_file!r} in --config "
                         f"{config_file}, a run's complete saved config, which replays as is "
                         f"(another recipe name would only relabel it); drop the option, or "
                         f"start from {given}'s defaults without the file")
    name = given or in_file or "demo"
    if not isinstance(name, str):
        raise ValueError(f"recipe: expected str, got {_show(name)}")
    if _is_complete(file_data):  # a run's saved config: taken as is
        merged = dict(file_data)
    else:
        merged = _merge(config_to_dict(get_recipe(name)), file_data)
    merged["recipe"] = name
    return config_from_dict(apply_overrides(merged, overrides))


def _check_keys(cls: type, data: Any, path: str) -> None:
    """Every key of ``data`` (a config file's mapping) names a field of ``cls``, recursively."""
    if not isinstance(data, Mapping):
        return  # (the type check after the merge names it)
    hints = _hints(cls)
    for key, value in data.items():
        if key not in hints:
            raise _unknown(path, key, list(hints))
        if dataclasses.is_dataclass(hints[key]):
            _check_keys(hints[key], value, _join(path, key))


def _recipe_overrides(overrides: list[str]) -> tuple[list[str], str | None]:
    """(the overrides without ``recipe=NAME``, the last NAME given). A ``recipe=`` override
    picks the recipe whose defaults the run starts from, as ``--recipe`` does; set after the
    merge, it would only rename a run that keeps another recipe's values."""
    rest, chosen = [], None
    for item in overrides:
        key, sep, text = item.partition("=")
        if sep and key.strip() == "recipe":
            chosen = _parse_value(text)  # (recipe="pt" as JSON, as any override value)
            if not isinstance(chosen, str) or not chosen.strip():
                raise ValueError(f"override {item!r}: expected recipe=NAME, a recipe name")
            chosen = chosen.strip()
        else:
            rest.append(item)
    return rest, chosen


# -- dumping the resolved run -----------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def config_to_dict(cfg: Config) -> dict:
    """The config as plain JSON-safe data (tuples as lists); ``config_from_dict`` inverts it."""
    return _jsonable(dataclasses.asdict(cfg))


# The run record (environment.json) and the saved config live in olavlm/run_record.py.
from olavlm.run_record import environment_record, save_resolved_config  # noqa: E402
