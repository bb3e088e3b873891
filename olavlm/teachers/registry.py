# Teachers by name: "depth", "seg", "gen", "synthetic", and any registered by the user.
"""``build_teacher("depth", path)`` builds a teacher from its registered factory.

A factory is ``factory(path, **kwargs) -> Teacher``: ``path`` is the weights folder (or hub
repo id, or None for the default repository); kwargs are the teacher's options (``device``,
``dtype``, ``seed_compat``, ``max_batch``, ...). ``register_teacher`` adds one.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

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


def build_teachers(names: str | Sequence[str], weights=None, **kwargs) -> list[Teacher]:
    """Teachers for ``names`` ("depth,seg,gen" or a list); no two may produce one task."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"teachers must name distinct teachers, got {list(names)}")
    paths = parse_weights(weights)
    unknown = sorted(set(paths) - set(names))
    if unknown:
        raise ValueError(f"weights name teachers that are not used: {unknown} (teachers: "
                         f"{list(names)})")
    teachers = [build_teacher(n, paths.get(n), **kwargs) for n in names]
    seen: dict[str, str] = {}
    for t in teachers:
        for task in t.tasks:
            if task in seen:
                raise ValueError(f"teachers {seen[task]!r} and {t.name!r} both produce the "
                                 f"{task!r} target; use one")
            seen[task] = t.name
    return teachers
