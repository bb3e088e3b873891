# Teachers by name: "depth", "seg", "gen", "synthetic", and any registered by the user.
"""``build_teacher("depth", path)`` builds a teacher from its registered factory.

A factory is ``factory(path, **kwargs) -> Teacher``: ``path`` is the weights folder (or hub
repo id, or None for the default repository); kwargs are the teacher's options (``device``,
``dtype``, ``seed_compat``, ``max_batch``, ...). ``register_teacher`` adds one.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from . import depth, gen, seg
from .base import Teacher
from .depth import DEPTH_REPO, DepthTeacher
from .gen import GEN_REPO, GenTeacher
from .seg import SEG_REPO, SegTeacher
from .synthetic import SyntheticTeacher

__all__ = [
    "DEFAULT_WEIGHTS",
    "TEACHERS",
    "build_teacher",
    "build_teachers",
    "find_teacher_weights",
    "parse_dtypes",
    "parse_weights",
    "register_teacher",
]


def _synthetic(path, **kwargs) -> SyntheticTeacher:
    if path is not None:
        raise ValueError(f"the synthetic teacher has no weights; got path={str(path)!r}")
    kwargs.pop("seed_compat", None)  # nothing to be compatible with
    return SyntheticTeacher(**kwargs)


TEACHERS: dict[str, Callable[..., Teacher]] = {
    "depth": DepthTeacher.load,
    "seg": SegTeacher.load,
    "gen": GenTeacher.load,
    "synthetic": _synthetic,
}
DEFAULT_WEIGHTS = {"depth": DEPTH_REPO, "seg": SEG_REPO, "gen": GEN_REPO, "synthetic": None}
# name -> find_weights(path): the folder the teacher would load, found without loading it
_FIND_WEIGHTS = {"depth": (DepthTeacher.load, depth.find_weights),
                 "seg": (SegTeacher.load, seg.find_weights),
                 "gen": (GenTeacher.load, gen.find_weights)}


def find_teacher_weights(name: str, path=None):
    """The weights folder of the built-in teacher ``name`` (``TeacherWeightsNotFound`` saying
    how to get them), checked in milliseconds before anything loads; None for a teacher without
    weights or a registered one (its factory checks when it runs)."""
    factory, find = _FIND_WEIGHTS.get(name, (None, None))
    if find is None or TEACHERS.get(name) != factory:
        return None
    return find(path)


def register_teacher(name: str, factory: Callable[..., Teacher]) -> None:
    """Make ``build_teacher(name, ...)`` call ``factory(path, **kwargs)``."""
    if not isinstance(name, str) or not name or "," in name or "=" in name:
        raise ValueError(f"name must be a non-empty str without ',' or '=', got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {type(factory).__name__}")
    TEACHERS[name] = factory


def build_teacher(name: str, path=None, **kwargs) -> Teacher:
    """The teacher registered as ``name``, loaded from ``path`` (module docstring)."""
    if name not in TEACHERS:
        raise ValueError(f"teacher must be one of {sorted(TEACHERS)}, got {name!r}")
    teacher = TEACHERS[name](path, **kwargs)
    if not isinstance(teacher, Teacher):
        raise TypeError(f"the factory of {name!r} must return a Teacher, got "
                        f"{type(teacher).__name__}")
    return teacher


def parse_weights(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """``"depth=DIR,seg=DIR"`` (the CLI's --weights) or a mapping -> {teacher: path}."""
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        return {str(k): str(v) for k, v in spec.items()}
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, path = part.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"weights must look like 'depth=DIR,seg=DIR', got {spec!r}")
        out[name.strip()] = path.strip()
    return out


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_dtypes(spec: str | Mapping[str, object] | None) -> dict[str, torch.dtype]:
    """``"gen=fp16,depth=bf16"`` (the CLI's --dtype) or a mapping {teacher: "fp16" |
    torch.float16} -> {teacher: torch.dtype}. The names are checked by ``build_teachers``."""
    if spec is None:
        return {}
    if isinstance(spec, str):
        pairs = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, value = part.partition("=")
            if not sep or not name.strip() or not value.strip():
                raise ValueError(f"dtypes must look like 'gen=fp16,depth=bf16', got {spec!r}")
            pairs.append((name.strip(), value.strip()))
    elif isinstance(spec, Mapping):
        pairs = [(str(k), v) for k, v in spec.items()]
    else:
        raise TypeError(f"dtypes must be a str such as 'gen=fp16' or a mapping, got "
                        f"{type(spec).__name__}")
    out = {}
    for name, value in pairs:
        if isinstance(value, torch.dtype) and value in DTYPES.values():
            out[name] = value
        elif isinstance(value, str) and value in DTYPES:
            out[name] = DTYPES[value]
        else:
            raise ValueError(f"dtypes must give each teacher one of {list(DTYPES)}, got "
                             f"{value!r} for {name!r}")
    return out


def build_teachers(names: str | Sequence[str], weights=None, *, dtypes=None,
                   **kwargs) -> list[Teacher]:
    """Teachers for ``names`` ("depth,seg,gen" or a list); no two may produce one task.
    ``weights``: {teacher: path} or "depth=DIR,..."; ``dtypes``: {teacher: dtype} or
    "gen=fp16,...", each over the ``dtype`` of ``kwargs`` (None: each teacher's default)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"teachers must name distinct teachers, got {list(names)}")
    paths = parse_weights(weights)
    unknown = sorted(set(paths) - set(names))
    if unknown:
        raise ValueError(f"weights name teachers that are not used: {unknown} (teachers: "
                         f"{list(names)})")
    per_dtype = parse_dtypes(dtypes)
    unknown = sorted(set(per_dtype) - set(names))
    if unknown:
        raise ValueError(f"dtypes name teachers that are not used: {unknown} (teachers: "
                         f"{list(names)})")
    teachers = [build_teacher(n, paths.get(n),
                              **{**kwargs, **({"dtype": per_dtype[n]} if n in per_dtype else {})})
                for n in names]
    seen: dict[str, str] = {}
    for t in teachers:
        for task in t.tasks:
            if task in seen:
                raise ValueError(f"teachers {seen[task]!r} and {t.name!r} both produce the "
                                 f"{task!r} target; use one")
            seen[task] = t.name
    return teachers
