# `olavlm targets verify`: every shard's checksum, header and rows; coverage against a dataset.
"""``verify_cache(root, data=...)`` reads a whole target cache back and reports what is wrong.

Per shard: the file exists with the size and SHA-256 the index names, its safetensors header
holds every task with the right dtype and shape and the index's keys, and every row matches
its CRC-32. Across shards: no key stored twice, no stray shard file. With ``data`` (LLaVA
files): how many of the dataset's images are cached, missing (of which rejected during
extraction, with the reason) or extra; with ``check_images`` as well, how many cached images'
files have changed since extraction (their digest differs from the recorded one: training
would mask them as ``stale_target``). A cache without ``index.json`` (extraction still
running or interrupted) is reported with its progress.
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from pathlib import Path

from olavlm.data.images import image_digest, read_image_file
from olavlm.data.llava import LlavaIndex, resolve_image_path

from .cache import (
    FORMAT,
    FORMAT_VERSION,
    INDEX,
    PLAN,
    CorruptTargetError,
    ShardFile,
    read_json,
    sidecar_name,
)
from .extract import image_items
from .quantize import stored_dtypes

__all__ = ["VerifyReport", "verify_cache"]

_SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float8_e4m3fn": "F8_E4M3", "float32": "F32"}


@dataclasses.dataclass
class VerifyReport:
    root: Path
    complete: bool
    num_shards: int
    shards_ok: int
    num_cached: int
    problems: list[str]
    coverage: dict | None = None
    fp8_error: dict | None = None
    num_damaged: int = 0  # images whose shard failed a check (not counted as cached)

    @property
    def none_cached(self) -> bool:
        """Coverage asked for, and not one of the dataset's images has targets."""
        c = self.coverage
        return c is not None and c["dataset_images"] > 0 and c["cached"] == 0

    @property
    def ok(self) -> bool:
        c = self.coverage
        uncovered = c is not None and c["missing_not_rejected"] > 0
        stale = c is not None and c.get("stale", 0) > 0
        return (self.complete and not self.problems and not uncovered and not self.none_cached
                and not stale and not self.no_image_read)

    @property
    def no_image_read(self) -> bool:
        """Images asked to be checked (``--images``) and not one could be read: a wrong
        image folder, most likely; nothing was checked."""
        c = self.coverage
        return (c is not None and "images_checked" in c and c["images_checked"] == 0
                and c["unreadable"] > 0)

    def summary(self) -> str:
        state = "complete" if self.complete else "INCOMPLETE (no index.json)"
        # Without the index the cached images are not counted (an unfinished extraction).
        cached = f"; {self.num_cached} images cached" if self.complete else ""
        if self.num_damaged:
            cached += f" ({self.num_damaged} more in damaged shards)"
        lines = [f"{self.root}: {state}; {self.shards_ok}/{self.num_shards} shards ok{cached}"]
        lines += [f"  PROBLEM: {p}" for p in self.problems]
        if self.coverage is not None:
            c = self.coverage
            reasons = ", ".join(f"{r}={n}" for r, n in sorted(c["rejected"].items()))
            damaged = (f"; {c['in_damaged_shards']} in damaged shards"
                       if c.get("in_damaged_shards") else "")
            lines.append(f"  coverage: {c['cached']}/{c['dataset_images']} dataset images "
                         f"cached ({c['fraction']:.2%}); {c['missing']} missing ("
                         f"{c['missing_not_rejected']} never extracted{damaged}"
                         f"{'; rejected: ' + reasons if reasons else ''}); {c['extra']} extra")
            if c["missing_examples"]:
                lines.append(f"  missing, e.g.: {c['missing_examples']}")
            if "stale" in c:
                lines.append(f"  images checked: {c['images_checked']} of the cached ones; "
                             f"{c['stale']} changed since extraction (stale targets), "
                             f"{c['unreadable']} unreadable, {c['no_digest']} without a "
                             "recorded digest")
                if c["stale"]:
                    lines.append(f"  PROBLEM: stale targets, e.g.: {c['stale_examples']} "
                                 "(rerun `olavlm targets extract --overwrite`)")
            if self.no_image_read:
                lines.append(f"  PROBLEM: none of the {c['unreadable']} cached images could be "
                             "read, so none was checked (check --image-folder)")
            if self.none_cached:
                lines.append("  PROBLEM: none of the dataset's images has targets (every one "
                             "rejected at extraction, or a cache of other data)")
        for task, err in (self.fp8_error or {}).items():
            lines.append(f"  fp8 {task}: relative RMS error {err['rel_rms']:.4f}, max "
                         f"{err['max_over_bound']:.3f} of the bound")
        lines.append("OK" if self.ok else "NOT OK")
        return "\n".join(lines)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_header(shard: ShardFile, info: dict, expected: dict) -> None:
    if shard.metadata.get("keys") != info["keys"]:
        raise CorruptTargetError(f"{shard.path}: its keys differ from the index's")
    n = info["num_rows"]
    for name, (shape, dtype) in expected.items():
        for tensor, want_shape, want_dtype in ((name, [n, *shape], dtype),
                                               (f"{name}.crc32", [n], None)):
            if tensor.endswith(".scale.crc32"):
                continue
            entry = shard.entries.get(tensor)
            if entry is None or entry["shape"] != want_shape:
                got = None if entry is None else entry["shape"]
                raise CorruptTargetError(f"{shard.path}: tensor {tensor!r} must have shape "
                                         f"{want_shape}, got {got}")
            if want_dtype is not None and entry["dtype"] != _SAFETENSORS_DTYPES[
                    str(want_dtype).removeprefix("torch.")]:
                raise CorruptTargetError(f"{shard.path}: tensor {tensor!r} has dtype "
                                         f"{entry['dtype']}, expected {want_dtype}")
        shard.spec(name)  # offsets inside the file


def _check_shard(root: Path, info: dict, expected: dict, tasks, check_rows: bool) -> None:
    path = root / info["file"]
    if not path.is_file():
        raise CorruptTargetError(f"{path}: missing")
    shard = ShardFile(path, expected_bytes=info["bytes"])  # the size first: cheap and telling
    try:
        if _sha256(path) != info["sha256"]:
            raise CorruptTargetError(f"{path}: SHA-256 differs from the index (the file "
                                     "changed)")
        _check_header(shard, info, expected)
        if check_rows:
            for row in range(info["num_rows"]):
                for task in tasks:
                    shard.read_row(task, row, check=True)
    finally:
        shard.close()


def _image_changes(dataset: LlavaIndex, items, digests: dict[str, str | None],
                   image_folder) -> dict:
    """Read every cached image of the dataset and compare its digest with the recorded one."""
    stale, unreadable, no_digest, checked = [], 0, 0, 0
    for key, i in items:
        if key not in digests:
            continue
        if digests[key] is None:
            no_digest += 1
            continue
        try:
            data = read_image_file(resolve_image_path(dataset, i, dataset.entry(i)["image"],
                                                      image_folder))
        except OSError:
            unreadable += 1  # training rejects it (missing_/unreadable_image); not a target problem
            continue
        checked += 1
        if image_digest(data) != digests[key]:
            stale.append(key)
    return {"images_checked": checked, "stale": len(stale), "stale_examples": stale[:5],
            "unreadable": unreadable, "no_digest": no_digest}


def _coverage(index: dict, data, cached: set[str], *, digests=None, image_folder=None,
              damaged: frozenset[str] = frozenset()) -> dict:
    dataset = LlavaIndex(data)
    items = image_items(dataset, image_folder)
    keys = [k for k, _ in items]
    rejected = {r["sample_id"]: r["reason"] for r in index.get("rejects", [])}
    missing = [k for k in keys if k not in cached]
    reasons = Counter(rejected[k] for k in missing if k in rejected)
    in_damaged = sum(k in damaged for k in missing if k not in rejected)
    wanted = set(keys)
    out = {"dataset_images": len(keys), "cached": len(keys) - len(missing),
           "fraction": (len(keys) - len(missing)) / len(keys) if keys else 1.0,
           "missing": len(missing), "rejected": dict(reasons),
           "missing_not_rejected": len(missing) - sum(reasons.values()) - in_damaged,
           "in_damaged_shards": in_damaged,
           "missing_examples": [k for k in missing if k not in rejected
                                and k not in damaged][:5],
           "extra": len(cached - wanted)}
    if digests is not None:
        out |= _image_changes(dataset, items, digests, image_folder)
    return out


def _incomplete(root: Path) -> VerifyReport:
    if not (root / PLAN).is_file():
        raise FileNotFoundError(f"{root} is not a target cache (no {INDEX} or {PLAN})")
    plan = read_json(root / PLAN)
    num_shards = -(-plan["num_images"] // plan["shard_size"])
    done = sum((root / sidecar_name(k)).is_file() for k in range(num_shards))
    return VerifyReport(root=root, complete=False, num_shards=num_shards, shards_ok=done,
                        num_cached=0, problems=[f"extraction unfinished: {done} of "
                                                f"{num_shards} shards done; resume it"])


def verify_cache(root: str | Path, *, data=None, check_rows: bool = True,
                 check_images: bool = False, image_folder=None) -> VerifyReport:
    """Check every shard of the cache at ``root`` (module docstring); ``data``: LLaVA files
    to report coverage against. ``check_rows=False`` skips the per-row CRCs (the SHA-256 of
    each file is always checked). ``check_images`` (needs ``data``) reads each cached image
    of the data, under ``image_folder`` (default: beside its data file), and reports those
    changed since extraction."""
    root = Path(root)
    if check_images and data is None:
        raise ValueError("check_images=True needs data= (the LLaVA files whose images to "
                         "read), got data=None")
    if not (root / INDEX).is_file():
        return _incomplete(root)
    index = read_json(root / INDEX)
    if index.get("format") != FORMAT or index.get("version") != FORMAT_VERSION:
        raise ValueError(f"{root / INDEX} must be {FORMAT} version {FORMAT_VERSION}, got "
                         f"{index.get('format')!r} {index.get('version')!r}")
    shapes = {t: tuple(v["shape"]) for t, v in index["tasks"].items()}
    expected = stored_dtypes(shapes, index["storage"])
    problems, ok, seen, cached, digests = [], 0, Counter(), set(), {}
    damaged_keys: set[str] = set()
    damaged_files: list[str] = []
    for info in index["shards"]:
        recorded = info.get("image_digests") or [None] * len(info["keys"])
        if len(recorded) != len(info["keys"]):
            problems.append(f"{info['file']}: the index lists {len(info['keys'])} keys but "
                            f"{len(recorded)} image digests")
            recorded = [None] * len(info["keys"])
        digests.update(zip(info["keys"], recorded, strict=True))
        seen.update(info["keys"])
        try:
            _check_shard(root, info, expected, list(shapes), check_rows)
        except (CorruptTargetError, OSError, ValueError, KeyError) as err:
            problems.append(str(err))
            damaged_keys.update(info["keys"])  # unusable: training masks them (corrupt_target)
            damaged_files.append(info["file"])
            continue
        ok += 1
        cached.update(info["keys"])
    twice = [k for k, n in seen.items() if n > 1]
    if twice:
        problems.append(f"{len(twice)} keys are stored in more than one shard, e.g. {twice[:3]}")
    listed = {info["file"] for info in index["shards"]}
    stray = sorted(p.name for p in root.glob("shard-*.safetensors") if p.name not in listed)
    if stray:
        problems.append(f"shard files not in the index: {stray[:5]}")
    if damaged_files:  # a resume redoes a shard without its sidecar (extract.py)
        sidecars = [f.removesuffix(".safetensors") + ".json" for f in damaged_files]
        problems.append(f"to redo the {len(damaged_files)} damaged shards: delete their "
                        f"sidecars ({', '.join(sidecars[:5])}{', ...' if len(sidecars) > 5 else ''}"
                        f") in {root} and rerun the same `olavlm targets extract` command")
    coverage = None if data is None else _coverage(
        index, [data] if isinstance(data, (str, Path)) else list(data), cached,
        digests=digests if check_images else None, image_folder=image_folder,
        damaged=frozenset(damaged_keys - cached))
    return VerifyReport(root=root, complete=True, num_shards=len(index["shards"]), shards_ok=ok,
                        num_cached=len(cached), problems=problems, coverage=coverage,
                        fp8_error=index.get("fp8_error") or None,
                        num_damaged=len(damaged_keys - cached))
