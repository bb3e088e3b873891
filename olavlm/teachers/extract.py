# Offline target extraction: dataset -> teachers (batched) -> sharded cache, resumable, by rank.
"""``extract_targets`` fills a target cache (layout in cache.py) from LLaVA data files.

The plan is a pure function of the data and the teachers: the distinct image keys in order of
first appearance, cut into shards of ``shard_size`` keys. Rank ``r`` of ``W`` (torchrun, or
the arguments) writes the shards ``k`` with ``k % W == r``, so together the ranks write every
shard once. A shard counts as done when its sidecar exists and the shard has the size the
sidecar names (both are written atomically, the shard first), so a resumed run skips finished
shards without rereading them and redoes only the one that was interrupted; stale temporary
files of an interrupted write are deleted. When all shards are done rank 0 writes
``index.json``. Images that cannot be used (``missing_image``, ``unreadable_image``,
``corrupt_image``, ``bad_maps``, ``nonfinite_target``) are left out of the cache, counted,
listed in the index and, with ``rejects_path``, written one JSON line each (as they happen,
then rewritten from the index when it is written: every rejected image once, whatever the
resumes); ``on_bad_sample="raise"`` stops at the first. A rerun redoes the finished shards
whose missing, unreadable or corrupt images can be used now (``_rejects_now_readable``).
Each cached image's file digest (``image_digest`` of its bytes) is recorded beside its key, so
training notices an image that changed after extraction (``stale_target``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image

from olavlm._fs import dead_writer
from olavlm.data.bad_data import BadSampleError, Reject, RejectLog, check_policy
from olavlm.data.images import (
    ImageProblem,
    image_digest,
    open_image_file,
    pil_to_uint8,
    read_image_file,
)
from olavlm.data.llava import LlavaIndex, image_key, resolve_image_path

from .base import Teacher
from .cache import (
    FORMAT,
    FORMAT_VERSION,
    INDEX,
    PLAN,
    STORAGES,
    atomic_write,
    encode_shard,
    read_json,
    shard_name,
    sidecar_name,
)
from .quantize import Fp8ErrorStats, stored_dtypes, to_storage

__all__ = ["ExtractReport", "ImageKeyDataset", "extract_targets", "image_items"]

logger = logging.getLogger("olavlm.teachers")


# Where the image teachers' inputs are resized: on their device, or by PIL in the loader workers.
RESIZE_MODES = ("device", "host")


def image_items(index: LlavaIndex, image_folder=None) -> list[tuple[str, int]]:
    """(image key, entry index of its first use) for each distinct image, in data order.

    A key is the image's path as written in the data file, so it must name one file: the same
    relative path in data files of different folders (two ``olavlm data synth`` outputs), each
    resolved beside its own data file, is a ValueError naming the key and both files, unless
    both resolve to the same file. ``image_folder`` resolves every path under one folder."""
    seen: dict[str, int] = {}
    for i in range(len(index)):
        relative = index.entry(i).get("image")
        if not relative:
            continue
        key = image_key(relative)
        first = seen.setdefault(key, i)
        if (first != i and image_folder is None
                and index.source_path(first).parent != index.source_path(i).parent):
            _check_same_file(index, key, first, i)
    return list(seen.items())


def _check_same_file(index: LlavaIndex, key: str, first: int, i: int) -> None:
    a, b = (resolve_image_path(index, j, index.entry(j)["image"]) for j in (first, i))
    if os.path.realpath(a) != os.path.realpath(b):
        raise ValueError(
            f"image key {key!r} names two different files: {a} (entry {index.location(first)}) "
            f"and {b} (entry {index.location(i)}); the target cache keys an image by its path "
            "as written in the data file, so one cache cannot hold both. Extract each data "
            "folder into its own cache, or give the images distinct paths (e.g. relative to one "
            "--image-folder)")


@dataclasses.dataclass
class _Item:
    key: str
    raw: torch.Tensor | None
    views: dict[str, torch.Tensor]
    maps: dict[str, torch.Tensor] | None
    digest: str | None = None  # of the image file's bytes; None: not read (maps-only teachers)


class ImageKeyDataset(torch.utils.data.Dataset):
    """Decodes each image once (and reads its maps) for the teachers; a bad one is a Reject."""

    def __init__(self, index: LlavaIndex, items: Sequence[tuple[str, int]], *,
                 image_folder=None, views=None, keep_raw: bool = True, keep_maps: bool = False,
                 decode: bool = True):
        self.index, self.items = index, list(items)
        self.image_folder = image_folder
        self.views = dict(views or {})
        self.keep_raw, self.keep_maps, self.decode = keep_raw, keep_maps, decode

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, j: int) -> _Item | Reject:
        key, i = self.items[j]
        entry = self.index.entry(i)
        bad = lambda reason, detail: Reject(reason=reason, sample_id=key, detail=detail,
                                            location=self.index.location(i), index=i)
        item = _Item(key=key, raw=None, views={}, maps=None)
        path = resolve_image_path(self.index, i, entry["image"], self.image_folder)
        if self.decode:
            try:  # (as LlavaDataset: missing, unreadable or corrupt is a reject)
                data, pil = open_image_file(path)
            except ImageProblem as problem:
                return bad(problem.reason, problem.detail)
            try:
                item.views = {name: view(pil) for name, view in self.views.items()}
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                return bad("corrupt_image", f"{path}: {type(err).__name__}: {err}")
            item.digest = image_digest(data)
            item.raw = pil_to_uint8(pil) if self.keep_raw else None
        if self.keep_maps:
            from olavlm.data.synthetic import load_scene_maps

            folder = self.image_folder or self.index.source_path(i).parent
            try:
                item.maps = load_scene_maps(entry, folder)
            except (OSError, ValueError) as err:
                return bad("bad_maps", f"{type(err).__name__}: {err}")
            if item.digest is None:  # the image is not decoded, but training checks its digest
                try:
                    item.digest = image_digest(read_image_file(path))
                except OSError:
                    pass  # training rejects the sample itself (missing_/unreadable_image)
        return item


def _collate(items):
    good = [x for x in items if isinstance(x, _Item)]
    rejects = [x for x in items if isinstance(x, Reject)]
    views = {name: torch.stack([x.views[name] for x in good]) for name in
             (good[0].views if good else {})}
    maps = ({k: [x.maps[k] for x in good] for k in good[0].maps}
            if good and good[0].maps is not None else None)
    raw = [x.raw for x in good] if good and good[0].raw is not None else None
    return [x.key for x in good], [x.digest for x in good], raw, views, maps, rejects


@dataclasses.dataclass
class ExtractReport:
    """What one rank did (``complete``: the index is written; then ``num_cached`` counts the
    images with targets in the whole cache, every rank's and every earlier run's)."""

    out: Path
    rank: int
    world_size: int
    num_images: int
    num_shards: int
    shards_written: list[int]
    shards_skipped: list[int]
    rejects: dict[str, int]
    num_written: int
    seconds: float
    storage: str
    fp8_error: dict[str, dict[str, float]]
    complete: bool
    num_cached: int | None = None  # images with targets in the whole cache (the index's count)
    # Entries of the data files refused when indexing (malformed JSON, bad structure): they
    # name no image to extract, and training refuses them too (the rejects file lists them).
    entries_refused: dict[str, int] = dataclasses.field(default_factory=dict)
    # Images the whole cache rejected (the index's list: earlier runs' and other ranks' too);
    # None until the index is written.
    cache_rejects: dict[str, int] | None = None

    def summary(self) -> str:
        rate = self.num_written / self.seconds if self.seconds > 0 else 0.0
        rejects = ", ".join(f"{r}={n}" for r, n in sorted(self.rejects.items())) or "none"
        text = (f"rank {self.rank}/{self.world_size}: {self.num_images} images in "
                f"{self.num_shards} shards; wrote {len(self.shards_written)} shards "
                f"({self.num_written} images, {rate:.1f} images/s), skipped "
                f"{len(self.shards_skipped)} finished; rejected: {rejects}; storage "
                f"{self.storage}")
        if self.cache_rejects is not None and self.cache_rejects != self.rejects:
            total = ", ".join(f"{r}={n}" for r, n in sorted(self.cache_rejects.items()))
            text += f"\n  images rejected in the whole cache: {total or 'none'}"
        if self.entries_refused:
            refused = ", ".join(f"{r}={n}" for r, n in sorted(self.entries_refused.items()))
            text += (f"\n  data entries refused when indexing (no image to extract): "
                     f"{refused}")
        for task, err in self.fp8_error.items():
            text += (f"\n  fp8 {task}: relative RMS error {err['rel_rms']:.4f}, max error "
                     f"{err['max_over_bound']:.3f} of the bound (2^-4 |x| + 2^-10 scale)")
        return text + ("" if self.complete else "\n  index not written yet (other ranks)")


def _plan(teachers, items, storage: str, shard_size: int, resize: str) -> dict:
    # Everything that changes the stored values: a resume with another plan must not mix
    # shards (``resize`` moves the teachers' input pixels, so their targets, too).
    digest = hashlib.sha256("\n".join(k for k, _ in items).encode("utf-8")).hexdigest()
    tasks = {task: {"shape": list(shape), "teacher": t.name}
             for t in teachers for task, shape in t.target_shapes().items()}
    return {"format": FORMAT, "version": FORMAT_VERSION, "storage": storage,
            "shard_size": shard_size, "num_images": len(items), "keys_sha256": digest,
            "resize": resize, "tasks": tasks,
            "teachers": {t.name: t.fingerprint() for t in teachers}}


def _with_old_defaults(plan: dict) -> dict:
    """A plan written before "resize" was recorded: those runs used the default, "device"."""
    return plan if "resize" in plan else {**plan, "resize": "device"}


def _clear_cache_files(out: Path) -> None:
    # The index first: interrupted later, the folder is no cache a reader accepts (an index
    # left behind would name deleted shards).
    for pattern in (INDEX, "shard-*", ".shard-*", PLAN, f".{INDEX}*", f".{PLAN}*"):
        for path in out.glob(pattern):
            path.unlink() if path.is_file() else shutil.rmtree(path)


def _prepare(out: Path, plan: dict, overwrite: bool, rank: int, barrier) -> None:
    # Rank 0 alone may delete; without a process group every rank writes the (identical)
    # plan when it is absent, so no rank waits for another.
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        old = _with_old_defaults(read_json(out / PLAN)) if (out / PLAN).is_file() else None
        if old is not None and old != plan and not overwrite:
            raise ValueError(f"out={str(out)!r} holds a cache made for other data, teachers "
                             f"or options (plan.json differs: {_plan_changes(old, plan)}); "
                             "pass overwrite=True (--overwrite) to replace it, or choose "
                             "another folder")
        if overwrite:
            _clear_cache_files(out)
    if rank == 0 or barrier is None:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / PLAN).is_file():
            atomic_write(out / PLAN, json.dumps(plan, indent=1).encode())
    if barrier is not None:
        barrier()
    if _with_old_defaults(read_json(out / PLAN)) != plan:
        raise ValueError(f"rank {rank}: plan.json in {out} differs from this rank's plan; all "
                         "ranks must see the same data, teachers and options")


def _plan_changes(old: dict, new: dict) -> str:
    """``"storage: 'bf16' -> 'fp8_e4m3'"`` for each differing leaf (the data: its keys)."""
    from olavlm.run_record import config_changes

    names = {"keys_sha256": "the data's images (keys_sha256)"}
    changes = config_changes(old, new)
    return "; ".join(names.get(c.split(":", 1)[0], "") or c for c in changes) or "format"


LOCK_NAME = ".extract.lock"


class _ExtractionLock:
    """POSIX record locks on one byte each of ``out/.extract.lock``: byte 0 by a job's rank 0
    (it writes the plan, may clear the folder, writes the index), byte ``1 + k`` by the rank
    working on shard ``k``. A second extraction into the same folder (a requeued copy, the
    same command in another terminal, another world size) stops before touching anything
    instead of deleting this one's temporary files. Closing releases every lock (the OS does
    when the process dies). Where the file system has no locks: a warning, no lock."""

    def __init__(self, out: Path):
        self.out, self.handle = out, None
        try:
            import fcntl  # noqa: F401 - POSIX only
        except ImportError:  # pragma: no cover
            return
        out.mkdir(parents=True, exist_ok=True)
        try:
            self.handle = open(out / LOCK_NAME, "a+")  # noqa: SIM115 - held while extracting
        except OSError as exc:
            logger.warning("cannot lock %s (%s): extracting without the lock", out, exc)

    def take(self, byte: int, what: str) -> None:
        if self.handle is None:
            return
        import errno
        import fcntl

        try:
            fcntl.lockf(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, byte, os.SEEK_SET)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                self.close()
                raise ValueError(f"out={str(self.out)!r} is in use by another extraction "
                                 f"(it holds {what}): wait for it to finish or stop it; "
                                 "nothing was changed") from None
            logger.warning("cannot lock %s (%s: file locks unsupported here?): extracting "
                           "without the lock", self.out, exc)
            self.close()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def _remove_dead_temporaries(out: Path) -> None:
    """``.plan.json.tmp-<host>-<pid>`` / ``.index.json.tmp-...`` left by a killed process of
    this host (the shard ones are removed with their shard's redo, under its lock)."""
    for path in [*out.glob(f".{PLAN}.tmp-*"), *out.glob(f".{INDEX}.tmp-*")]:
        if dead_writer(path.name.split(".tmp-", 1)[1]):
            path.unlink(missing_ok=True)


def _done_sidecar(out: Path, k: int, plan_digest: str) -> dict | None:
    """Shard ``k``'s sidecar when the shard is done (the sidecar is of this plan and the
    shard has the size it names), else None (a damaged sidecar: redo the shard)."""
    side = out / sidecar_name(k)
    if not side.is_file():
        return None
    try:
        info = read_json(side)
        done = (info.get("plan") == plan_digest and
                (out / info["file"]).stat().st_size == info["bytes"])
    except (OSError, ValueError, KeyError):
        return None
    return info if done else None


def _shard_done(out: Path, k: int, plan_digest: str) -> bool:
    return _done_sidecar(out, k, plan_digest) is not None


def _rejects_now_readable(out: Path, k: int, info: dict, index: LlavaIndex, entry_of: dict,
                          image_folder) -> bool:
    """Whether finished shard ``k`` (its sidecar ``info``) rejected an image that is there
    now: a missing one that exists (a wrong --image-folder fixed, files restored), one that
    could not be read and reads now (permissions fixed, a disk or network error gone: no
    mtime tells), a corrupt one whose file changed after the shard was written, or one whose
    maps load now. Such a shard is redone on resume."""
    from olavlm.data.synthetic import load_scene_maps

    rejects = info.get("rejects") or []
    if not rejects:
        return False
    try:
        since = (out / sidecar_name(k)).stat().st_mtime
    except OSError:
        return False
    for r in rejects:
        i = entry_of.get(r.get("sample_id"))
        if i is None or r.get("reason") not in ("missing_image", "unreadable_image",
                                                "corrupt_image", "bad_maps"):
            continue
        entry = index.entry(i)
        try:
            if r["reason"] == "bad_maps":
                load_scene_maps(entry, image_folder or index.source_path(i).parent)
                return True
            path = resolve_image_path(index, i, entry["image"], image_folder)
            if r["reason"] == "unreadable_image":
                read_image_file(path)  # an OSError while it still cannot be read
                return True
            st = os.stat(path)
        except (OSError, ValueError):
            continue
        if not os.path.isfile(path):  # a folder or a device is still no image file
            continue
        if r["reason"] == "missing_image" or st.st_mtime > since:
            return True
    return False


def _check_finished_images(out: Path, finished: Sequence[dict], index: LlavaIndex,
                           entry_of: dict, image_folder, sample: int = 64) -> None:
    """Before resuming: the images of up to ``sample`` rows of the finished shards (their
    sidecars) still hash to the digests recorded when they were extracted. Other images
    under the same paths (a resume with another dataset laid out alike) would mix two
    datasets' targets in one cache; ValueError."""
    rows = []
    for info in finished:
        rows += [(key, d) for key, d in zip(info.get("keys") or [],
                                            info.get("image_digests") or [], strict=False) if d]
    checked, changed = 0, []
    for key, digest in rows[:: max(1, len(rows) // sample)][:sample]:
        i = entry_of.get(key)
        if i is None:
            continue
        try:
            data = read_image_file(resolve_image_path(index, i, index.entry(i)["image"],
                                                      image_folder))
        except (OSError, ValueError):
            continue  # gone since: training rejects the sample itself
        checked += 1
        if image_digest(data) != digest:
            changed.append(key)
    if changed:
        raise ValueError(
            f"out={str(out)!r}: {len(changed)} of {checked} images checked in its finished "
            f"shards changed since their targets were extracted (e.g. {changed[0]!r}): the "
            "data under these paths is not the data the cache was begun with; resuming would "
            "mix two datasets' targets. Pass overwrite=True (--overwrite) to re-extract, or "
            "restore the images (`olavlm targets verify <cache> --data ... --images` lists "
            "the changed ones)")


def _run_teachers(teachers: Sequence[Teacher], raw, views, maps, resize: str):
    out = {}
    for t in teachers:
        images = None
        if t.needs_images:
            images = views[t.name] if resize == "host" else raw
        out.update(t(images, maps=maps if t.needs_maps else None))
    return out


def _write_shard(out: Path, k: int, keys, digests, parts, rejects, meta: dict) -> dict:
    if parts:
        tensors = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    else:  # every image of the shard was rejected: an empty shard keeps the layout
        tensors = {name: torch.empty(0, *shape, dtype=dt) for name, (shape, dt) in
                   meta["empty"].items()}
    blob = encode_shard(tensors, meta["storage"], keys, {"shard": str(k)})
    atomic_write(out / shard_name(k), blob)
    info = {"shard": k, "file": shard_name(k), "bytes": len(blob),
            "sha256": hashlib.sha256(blob).hexdigest(), "num_rows": len(keys), "keys": keys,
            "image_digests": digests,
            "rejects": [dataclasses.asdict(r) for r in rejects], "rank": meta["rank"],
            "plan": meta["plan"], "fp8": meta["fp8"]}
    atomic_write(out / sidecar_name(k), json.dumps(info).encode())
    return info


def _dist_rank_world(rank, world_size):
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_initialized() else 1
    if rank is None:
        rank = dist.get_rank() if dist.is_initialized() else 0
    if not isinstance(world_size, int) or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) with world_size >= 1, got rank={rank}"
                         f", world_size={world_size}")
    return rank, world_size


def _options(storage, shard_size, batch_size, num_workers, resize, on_bad_sample):
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    for name, value, low in (("shard_size", shard_size, 1), ("batch_size", batch_size, 1),
                             ("num_workers", num_workers, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be 'device' or 'host', got {resize!r}")
    check_policy(on_bad_sample)


# Both storages are read as bf16 by training: a finite fp32 value above bf16's largest
# (3.39e38) would be stored (bf16) or read back (fp8, dequantized) as inf.
_STORABLE_MAX = torch.finfo(torch.bfloat16).max


def _finite_rows(outputs) -> torch.Tensor:
    ok = None
    for v in outputs.values():
        # NaN compares False: one test rejects NaN, inf and values a bf16 read cannot hold.
        row_ok = (v.float().abs() <= _STORABLE_MAX).flatten(1).all(dim=1)
        ok = row_ok if ok is None else ok & row_ok
    return ok.cpu()


def _write_index(out: Path, plan: dict, num_shards: int) -> dict:
    infos = [read_json(out / sidecar_name(k)) for k in range(num_shards)]
    stats = Fp8ErrorStats()
    for info in infos:
        stats.merge(info.get("fp8") or {})
    index = {"format": FORMAT, "version": FORMAT_VERSION, "storage": plan["storage"],
             "tasks": plan["tasks"], "teachers": plan["teachers"],
             "num_images": plan["num_images"],
             "num_cached": sum(i["num_rows"] for i in infos),
             # A sidecar written before image digests were recorded has none: its images
             # are not checked for changes.
             "shards": [{k: i.get(k) for k in ("file", "bytes", "sha256", "num_rows", "keys",
                                               "image_digests", "rank")} for i in infos],
             "rejects": [r for i in infos for r in i["rejects"]],
             "fp8_error": stats.as_dict()}
    blob = json.dumps(index).encode()
    try:  # a rerun over a finished cache changes nothing: no write (a read-only copy works)
        if (out / INDEX).read_bytes() == blob:
            return index
    except OSError:
        pass
    atomic_write(out / INDEX, blob)
    return index


def _rewrite_rejects(path: Path, rejects: list[dict]) -> None:
    """The rejects file, once the cache is complete: every rejected image of every shard once.
    Lines are appended as rejects happen, so an interrupted run's file is incomplete and its
    resume would repeat the redone shard's; the index holds the true list."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r | {"epoch": None}, ensure_ascii=True) + "\n" for r in rejects)
    atomic_write(path, lines.encode("utf-8"))


class _ShardWriter:
    """Collects one shard's rows batch by batch and writes it when the shard is complete."""

    def __init__(self, out: Path, meta: dict, storage: str):
        self.out, self.meta, self.storage = out, meta, storage
        self.written: list[int] = []
        self.num_written = 0
        self.stats = Fp8ErrorStats()  # this run's, for the report
        self._reset()

    def _reset(self) -> None:
        self.keys, self.digests, self.parts, self.rejects = [], [], [], []
        self.shard_stats = Fp8ErrorStats() if self.storage == "fp8_e4m3" else None

    def add(self, keys, digests, outputs, rejects) -> None:
        self.rejects += rejects
        if not keys:
            return
        self.parts.append(to_storage(outputs, self.storage, self.shard_stats))
        self.keys += keys
        self.digests += digests

    def finish(self, k: int) -> None:
        fp8 = self.shard_stats.as_dict() if self.shard_stats is not None else {}
        _write_shard(self.out, k, self.keys, self.digests, self.parts, self.rejects,
                     self.meta | {"fp8": fp8})
        self.stats.merge(fp8)
        self.written.append(k)
        self.num_written += len(self.keys)
        logger.info("targets: shard %d written (%d images, %d rejected)", k, len(self.keys),
                    len(self.rejects))
        self._reset()


def _extract_shards(teachers, index, items, todo, shard_size, writer: _ShardWriter, log,
                    *, image_folder, batch_size, num_workers, resize, on_bad_sample) -> None:
    needs_images = any(t.needs_images for t in teachers)
    views = ({t.name: t.host_view() for t in teachers if t.needs_images}
             if resize == "host" else {})
    chosen, batches, owner = [], [], []
    for k in todo:
        shard_items = items[k * shard_size:(k + 1) * shard_size]
        for lo in range(0, len(shard_items), batch_size):
            size = min(batch_size, len(shard_items) - lo)
            batches.append(list(range(len(chosen) + lo, len(chosen) + lo + size)))
            owner.append(k)
        chosen += shard_items
    dataset = ImageKeyDataset(index, chosen, image_folder=image_folder, views=views,
                              keep_raw=needs_images and resize == "device",
                              keep_maps=any(t.needs_maps for t in teachers),
                              decode=needs_images)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, collate_fn=_collate, num_workers=num_workers,
        pin_memory=any(t.device.type == "cuda" for t in teachers))
    for b, (keys, digests, raw, host_views, maps, rejects) in enumerate(loader):
        for reject in rejects:
            if on_bad_sample == "raise":
                raise BadSampleError(reject)
            log.add(reject)
        outputs = _run_teachers(teachers, raw, host_views, maps, resize) if keys else {}
        if keys:
            ok = _finite_rows(outputs)
            if not bool(ok.all()):
                for i in (~ok).nonzero().flatten().tolist():
                    reject = Reject(reason="nonfinite_target", sample_id=keys[i],
                                    location=keys[i], detail="a teacher returned NaN, inf or "
                                    "a value beyond bf16's range (3.39e38)")
                    if on_bad_sample == "raise":
                        raise BadSampleError(reject)
                    log.add(reject)
                    rejects.append(reject)
                keep = ok.to(next(iter(outputs.values())).device)
                outputs = {t: v[keep] for t, v in outputs.items()}
                good = ok.tolist()
                keys = [key for key, g in zip(keys, good, strict=True) if g]
                digests = [d for d, g in zip(digests, good, strict=True) if g]
        writer.add(keys, digests, outputs, rejects)
        if b + 1 == len(batches) or owner[b + 1] != owner[b]:
            writer.finish(owner[b])


def extract_targets(data, out, teachers: Sequence[Teacher], *, image_folder=None,
                    storage: str = "bf16", shard_size: int = 256, batch_size: int = 32,
                    num_workers: int = 2, resize: str = "device", rank: int | None = None,
                    world_size: int | None = None, overwrite: bool = False,
                    on_bad_sample: str = "skip", rejects_path=None) -> ExtractReport:
    """Run ``teachers`` over every distinct image of ``data`` (LLaVA .json/.jsonl files) and
    write their targets to the cache folder ``out`` (module docstring).

    ``resize="device"`` sends decoded uint8 images to the teachers, which resize on their
    device; ``"host"`` resizes with PIL in the ``num_workers`` loader processes (the seed's
    exact pixels). ``rank``/``world_size`` default to torch.distributed's when a process group
    is initialized (then ranks wait for each other and rank 0 writes the index), else 0/1;
    given explicitly without a process group, whichever rank finishes last writes the index.
    """
    _options(storage, shard_size, batch_size, num_workers, resize, on_bad_sample)
    if rejects_path is not None and Path(rejects_path).is_dir():  # found at the end otherwise
        raise ValueError(f"rejects_path must be a file, got the directory {str(rejects_path)!r}")
    if not teachers or not all(isinstance(t, Teacher) for t in teachers):
        raise TypeError(f"teachers must be a non-empty list of Teacher, got {teachers!r}")
    start = time.perf_counter()
    rank, world_size = _dist_rank_world(rank, world_size)
    grouped = world_size > 1 and dist.is_available() and dist.is_initialized()
    barrier = dist.barrier if grouped else None
    if overwrite and world_size > 1 and barrier is None:
        raise ValueError("overwrite=True needs a process group when world_size > 1 (rank 0 "
                         "deletes while the others wait); clear the folder first instead")
    data = [data] if isinstance(data, (str, Path)) else list(data)
    index = LlavaIndex(data, on_bad_sample=on_bad_sample)
    items = image_items(index, image_folder)
    plan = _plan(teachers, items, storage, shard_size, resize)
    out = Path(out)
    lock = _ExtractionLock(out)
    try:
        if rank == 0:
            lock.take(0, "the folder")
        return _extract_locked(teachers, index, items, plan, out, rank, world_size, barrier,
                               start, lock, image_folder=image_folder, storage=storage,
                               shard_size=shard_size, batch_size=batch_size,
                               num_workers=num_workers, resize=resize, overwrite=overwrite,
                               on_bad_sample=on_bad_sample, rejects_path=rejects_path)
    finally:
        lock.close()


def _extract_locked(teachers, index, items, plan, out, rank, world_size, barrier, start, lock, *,
                    image_folder, storage, shard_size, batch_size, num_workers, resize,
                    overwrite, on_bad_sample, rejects_path) -> ExtractReport:
    _prepare(out, plan, overwrite, rank, barrier)
    if rank == 0 or barrier is None:
        _remove_dead_temporaries(out)
    # The stored plan's digest marks finished shards: a cache begun before a plan key existed
    # (its default then applied) keeps its shards.
    digest = hashlib.sha256(json.dumps(read_json(out / PLAN), sort_keys=True).encode()).hexdigest()
    num_shards = -(-len(items) // shard_size)
    mine = [k for k in range(num_shards) if k % world_size == rank]
    entry_of = dict(items)  # image key -> the entry that first uses it
    finished = {k: info for k in mine if (info := _done_sidecar(out, k, digest)) is not None}
    _check_finished_images(out, list(finished.values()), index, entry_of, image_folder)
    retried = [k for k, info in finished.items()
               if _rejects_now_readable(out, k, info, index, entry_of, image_folder)]
    if retried:
        logger.info("targets: redoing %d finished shards whose rejected images are readable "
                    "now", len(retried))
    todo = [k for k in mine if k not in finished or k in retried]
    for k in todo:  # before deleting their temporaries: another job may be writing them
        lock.take(1 + k, f"shard {k}")
    for k in todo:  # leftovers of an interrupted write of these shards
        for stale in [*out.glob(f".{shard_name(k)}.tmp-*"), *out.glob(f".{sidecar_name(k)}.tmp-*")]:
            stale.unlink()
    shapes = {task: tuple(v["shape"]) for task, v in plan["tasks"].items()}
    meta = {"storage": storage, "rank": rank, "plan": digest,
            "empty": stored_dtypes(shapes, storage)}
    writer = _ShardWriter(out, meta, storage)
    log = RejectLog(rejects_path)
    if todo:
        _extract_shards(teachers, index, items, todo, shard_size, writer, log,
                        image_folder=image_folder, batch_size=batch_size,
                        num_workers=num_workers, resize=resize, on_bad_sample=on_bad_sample)
    if barrier is not None:
        barrier()
    all_done = all(_shard_done(out, k, digest) for k in range(num_shards))
    if all_done and (rank == 0 or barrier is None):
        written = _write_index(out, plan, num_shards)
        if rejects_path is not None:
            refused = [dataclasses.asdict(r) for r in index.rejects]
            _rewrite_rejects(Path(rejects_path), refused + written["rejects"])
    if barrier is not None:
        barrier()
    complete = all_done and (out / INDEX).is_file()
    final = read_json(out / INDEX) if complete else None
    report = ExtractReport(
        out=out, rank=rank, world_size=world_size, num_images=len(items),
        num_shards=num_shards, shards_written=writer.written,
        shards_skipped=[k for k in mine if k not in todo], rejects=dict(log.counts),
        num_written=writer.num_written, seconds=time.perf_counter() - start, storage=storage,
        fp8_error={t: {k: v for k, v in d.items() if not k.startswith("sum")}
                   for t, d in writer.stats.as_dict().items()},
        complete=complete, num_cached=final["num_cached"] if final else None,
        entries_refused=dict(Counter(r.reason for r in index.rejects)),
        cache_rejects=(dict(Counter(r.get("reason") for r in final.get("rejects", [])))
                       if final else None))
    logger.info("targets: %s", report.summary())
    return report
