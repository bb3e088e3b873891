# What a run directory records about its run: the resolved config and the environment.
"""``save_resolved_config`` writes ``config.yaml`` (``config.json`` without PyYAML) and
``environment.json`` into a run directory. A resumed run writes them again; when the folder
already holds a different record (other overrides, another machine, newer versions), the old
pair is kept as ``config.<n>.yaml`` / ``environment.<n>.json`` (n = 1, 2, ...): the record of
every leg of a run survives, and ``config.yaml`` is always the latest (what export rebuilds).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["config_changes", "environment_record", "previous_config", "save_resolved_config"]


def _git_sha() -> dict:
    if os.environ.get("OLAVLM_GIT_SHA"):  # copies without .git (the GPU machines)
        return {"git_sha": os.environ["OLAVLM_GIT_SHA"], "git_dirty": None}
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10,
                               check=True).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "git_dirty": None}
    return {"git_sha": sha or None, "git_dirty": dirty}


def _devices() -> dict:
    try:
        import torch
    except ImportError:
        return {"devices": "cpu", "num_devices": 0}
    info: dict[str, Any] = {"cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None)}
    if not torch.cuda.is_available():
        return info | {"devices": "cpu", "num_devices": 0}
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    info |= {"devices": names, "num_devices": len(names)}
    try:  # driver and memory as the tool reports them (absent on ROCm)
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv"],
            capture_output=True, text=True, timeout=20, check=True).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def environment_record() -> dict:
    """Versions, git sha, host, devices, ranks, command line and time of this process."""
    versions = {}
    for dist in ("torch", "triton", "transformers", "olavlm"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "versions": versions,
        **_git_sha(),
        "hostname": socket.gethostname(),
        **_devices(),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "rank": int(os.environ.get("RANK", "0")),
        "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
        "argv": list(sys.argv),
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _archive_previous(out: Path, config_name: str, new_config_text: str) -> None:
    """Keep the previous leg's config and environment under the next free index when the
    config differs, or when the environment differs in anything but the time and the argv."""
    config_path, env_path = out / config_name, out / "environment.json"
    if not config_path.exists():
        return
    same_config = config_path.read_text(encoding="utf-8") == new_config_text
    if same_config and env_path.exists():
        try:
            old = json.loads(env_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            old = None
        new = environment_record()
        volatile = ("time_utc", "argv")
        if isinstance(old, dict) and ({k: v for k, v in old.items() if k not in volatile}
                                      == {k: v for k, v in new.items() if k not in volatile}):
            return
    stem, suffix = config_name.rsplit(".", 1)
    n = 1
    while (out / f"{stem}.{n}.{suffix}").exists() or (out / f"environment.{n}.json").exists():
        n += 1
    config_path.rename(out / f"{stem}.{n}.{suffix}")
    if env_path.exists():
        env_path.rename(out / f"environment.{n}.json")


def save_resolved_config(cfg, run_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``config.yaml`` (``config.json`` without PyYAML) and ``environment.json`` into
    ``run_dir`` (created), keeping a differing previous pair (see the module docstring); call
    it on rank 0 only. Returns both paths."""
    from olavlm.config import _yaml, config_to_dict

    out = Path(run_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    data, yaml = config_to_dict(cfg), _yaml()
    if yaml is not None:
        name, text = "config.yaml", yaml.safe_dump(data, sort_keys=False)
    else:
        name, text = "config.json", json.dumps(data, indent=2) + "\n"
    _archive_previous(out, name, text)
    config_path = out / name
    config_path.write_text(text, encoding="utf-8")
    env_path = out / "environment.json"
    env_path.write_text(json.dumps(environment_record(), indent=2) + "\n", encoding="utf-8")
    return config_path, env_path


def previous_config(run_dir: str | os.PathLike) -> dict | None:
    """The config a run directory recorded last (``config.yaml`` or ``config.json``), or None
    (none, or unreadable)."""
    from olavlm.config import _yaml

    out = Path(run_dir).expanduser()
    try:
        if (out / "config.yaml").is_file() and _yaml() is not None:
            data = _yaml().safe_load((out / "config.yaml").read_text(encoding="utf-8"))
        elif (out / "config.json").is_file():
            data = json.loads((out / "config.json").read_text(encoding="utf-8"))
        else:
            return None
    except Exception:  # noqa: BLE001 - a damaged record is not worth a failed resume
        return None
    return data if isinstance(data, dict) else None


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_changes(old: dict, new: dict) -> list[str]:
    """``"key: old -> new"`` for every leaf that differs (lists and tuples compare equal)."""
    a, b = _flatten(old), _flatten(new)
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    return [f"{key}: {a.get(key, '(unset)')!r} -> {b.get(key, '(unset)')!r}"
            for key in sorted(set(a) | set(b)) if norm(a.get(key)) != norm(b.get(key))]
