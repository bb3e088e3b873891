# The on-disk target cache: safetensors shards, per-row CRCs, atomic writes, a keyed reader.
"""Sharded target files and their reader (written by ``extract.py``, checked by ``verify.py``).

Layout of a cache folder::

    plan.json                    what the cache holds (teachers, tasks, storage, shard size,
                                 the image keys' digest); a resumed run must match it
    shard-00000.safetensors      rows of targets for up to ``shard_size`` images
    shard-00000.json             sidecar: sha256 and size of the shard, its keys, rejects;
                                 written after the shard, so its presence means "shard done"
    index.json                   written last: every shard, its checksum, keys, the digests
                                 of the images' files, and the rejects
    .extract.lock                POSIX record locks of a running extraction (extract.py)

Each shard is a standard safetensors file (readable by any safetensors tool) holding, per task,
``<task>`` (N, *shape) in bf16, or float8 e4m3 plus ``<task>.scale`` (N, R) fp32 (one scale per
row of the (R, C) view, ``R = shape[0]``), and ``<task>.crc32`` (N,) int64, the CRC-32 of each
sample's stored bytes (data, then scale). safetensors over zarr or tensorstore: it is already
installed (transformers needs it), needs no server or chunk store, and its header gives every
tensor's byte offsets, so a training worker reads one sample's row with a single ``pread`` of
exactly its bytes (1.2 MB depth, 1.8 MB seg in bf16) and no decompression. Files are written to
a temporary name, fsynced and renamed, so a crash never leaves a partial shard under a final
name; the reader checks each shard's size once and each row's CRC on every read, so a damaged
row is reported, never returned. Each key's ``image_digests`` entry (BLAKE2b-64 of the image
file's bytes at extraction) lets the training loader tell a target computed from an older
version of the image (``stale_target``) from a current one.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from olavlm._fs import host_tag

from .quantize import dequantize_fp8

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "STORAGES",
    "CorruptTargetError",
    "ShardFile",
    "TargetCache",
    "atomic_write",
    "encode_shard",
    "key_hash",
    "keys_digest",
    "read_json",
]

FORMAT = "olavlm-targets"
FORMAT_VERSION = 1
STORAGES = ("bf16", "fp8_e4m3")
INDEX, PLAN = "index.json", "plan.json"
_DTYPES = {"BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn, "F32": torch.float32,
           "I64": torch.int64}
_STORED = {"bf16": "BF16", "fp8_e4m3": "F8_E4M3"}


class CorruptTargetError(ValueError):
    """A cache file or row does not match its checksum, size or header."""


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def sidecar_name(k: int) -> str:
    return f"shard-{k:05d}.json"


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent, or old, or complete."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{host_tag()}-{os.getpid()}")
    with open(tmp, "wb") as f:
        _write_all(f, data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def _write_all(f, data: bytes) -> None:
    # One call, kept separate so a test can interrupt a write half way.
    f.write(data)


def _all_ints(values) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)


def read_json(path: Path) -> dict:
    """The JSON file's contents; a damaged file is a ValueError naming it."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: damaged, not valid JSON ({err})") from err


def keys_digest(keys: Sequence[str]) -> str:
    """What identifies a shard's rows: the SHA-256 of its keys in order."""
    return hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest()


def key_hash(key: str) -> int:
    """64-bit hash of an image key (blake2b): the reader's lookup tables hold only these."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def _digest_ints(digests, count: int) -> list[int]:
    """An index shard's ``image_digests`` (hex strings, or None per key or for the shard) as
    ints, 0 where none was recorded."""
    if digests is None:
        return [0] * count
    if len(digests) != count:
        raise ValueError(f"index.json: a shard lists {count} keys but {len(digests)} image "
                         "digests (the index is damaged); re-extract")
    return [0 if d is None else int(d, 16) for d in digests]


def _row_crcs(data: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    if data.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64)
    flat = data.contiguous().view(torch.uint8).reshape(data.shape[0], -1).numpy()
    scale_flat = None if scale is None else scale.contiguous().view(torch.uint8).reshape(
        scale.shape[0], -1).numpy()
    out = np.empty(data.shape[0], dtype=np.int64)
    for i in range(data.shape[0]):
        crc = zlib.crc32(flat[i])
        out[i] = crc if scale_flat is None else zlib.crc32(scale_flat[i], crc)
    return torch.from_numpy(out)


def encode_shard(tensors: Mapping[str, torch.Tensor], storage: str, keys: Sequence[str],
                 metadata: Mapping[str, str] | None = None) -> bytes:
    """The safetensors bytes of one shard: for each task its stored rows, scales (fp8) and
    per-row CRC-32s. ``tensors`` hold the stored form already (bf16, or fp8 with
    ``<task>.scale`` entries from ``quantize_fp8``), on the CPU, N rows each."""
    from safetensors.torch import save

    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    payload = {}
    for name, value in tensors.items():
        if name.endswith(".scale"):
            continue
        if value.shape[0] != len(keys):
            raise ValueError(f"tensors[{name!r}] must have {len(keys)} rows, got "
                             f"{value.shape[0]}")
        scale = tensors.get(f"{name}.scale")
        payload[name] = value.contiguous()
        if scale is not None:
            payload[f"{name}.scale"] = scale.contiguous()
        payload[f"{name}.crc32"] = _row_crcs(value, scale)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "storage": storage,
            "keys": list(keys)} | dict(metadata or {})
    # One metadata entry: safetensors keeps metadata in a hash map whose order changes from
    # process to process, and a resumed shard must be byte-identical to an uninterrupted one.
    return save(payload, metadata={FORMAT: json.dumps(meta, sort_keys=True)})


class ShardFile:
    """Random access to the rows of one shard: header parsed once, one ``pread`` per row."""

    def __init__(self, path: Path, expected_bytes: int | None = None):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError as err:
            raise CorruptTargetError(f"{self.path}: shard file is missing") from err
        if expected_bytes is not None and size != expected_bytes:
            raise CorruptTargetError(f"{self.path}: {size} bytes, the index says "
                                     f"{expected_bytes} (truncated or replaced)")
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            raw = os.pread(self._fd, 8, 0)
            (header_len,) = struct.unpack("<Q", raw) if len(raw) == 8 else (-1,)
            if not 0 < header_len <= min(size - 8, 1 << 28):
                raise CorruptTargetError(f"{self.path}: bad safetensors header length")
            header = json.loads(os.pread(self._fd, header_len, 8))
            self.metadata = json.loads((header.pop("__metadata__", None) or {}).get(FORMAT,
                                                                                    "{}"))
            if not isinstance(self.metadata, dict):
                raise CorruptTargetError(f"{self.path}: unreadable header (metadata is not a "
                                         "JSON object)")
            self.entries = header
            self.data_start = 8 + header_len
            self.size = size
            for name, entry in header.items():
                self._check_entry(name, entry)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError) as err:
            os.close(self._fd)
            raise CorruptTargetError(f"{self.path}: unreadable header ({err})") from err
        except BaseException:  # CorruptTargetError, an I/O error: never leak the descriptor
            os.close(self._fd)
            raise

    def _check_entry(self, name: str, entry) -> None:
        # Every tensor's shape, dtype and offsets agree, so each row read is exactly its bytes.
        if not isinstance(entry, dict):
            raise CorruptTargetError(f"{self.path}: header entry {name!r} is not an object")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and shape and _all_ints(shape)
                and isinstance(offsets, list) and len(offsets) == 2 and _all_ints(offsets)):
            raise CorruptTargetError(f"{self.path}: tensor {name!r} has a bad shape or offsets "
                                     f"in the header ({shape!r}, {offsets!r})")
        start, end = offsets
        if not 0 <= start <= end or self.data_start + end > self.size:
            raise CorruptTargetError(f"{self.path}: tensor {name!r} lies outside the file")
        dtype = _DTYPES.get(entry.get("dtype"))
        if dtype is not None and end - start != math.prod(shape) * dtype.itemsize:
            raise CorruptTargetError(f"{self.path}: tensor {name!r} holds {end - start} bytes, "
                                     f"its shape {shape} and dtype {entry['dtype']} need "
                                     f"{math.prod(shape) * dtype.itemsize}")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def spec(self, name: str, dtype: torch.dtype | None = None,
             shape: Sequence[int] | None = None) -> tuple[torch.dtype, list[int], int, int]:
        """(dtype, shape, start, end) of tensor ``name`` (checked at open); ``dtype``/``shape``:
        what it must be."""
        entry = self.entries.get(name)
        if entry is None or entry.get("dtype") not in _DTYPES:
            raise CorruptTargetError(f"{self.path}: no usable tensor {name!r} in the header")
        start, end = entry["data_offsets"]
        got = (_DTYPES[entry["dtype"]], entry["shape"])
        if (dtype is not None and got[0] != dtype) or (shape is not None
                                                      and got[1] != list(shape)):
            raise CorruptTargetError(f"{self.path}: tensor {name!r} is {got[0]} {got[1]} in "
                                     f"the header, expected {dtype} {list(shape or got[1])}")
        return got[0], got[1], start, end

    def row_bytes(self, name: str, row: int, dtype: torch.dtype | None = None,
                  shape: Sequence[int] | None = None) -> bytes:
        _, shape, start, end = self.spec(name, dtype, shape)
        if not 0 <= row < shape[0]:
            raise CorruptTargetError(f"{self.path}: row {row} of {name!r} out of {shape[0]}")
        width = (end - start) // shape[0]
        data = os.pread(self._fd, width, self.data_start + start + row * width)
        if len(data) != width:
            raise CorruptTargetError(f"{self.path}: short read of {name!r} row {row}")
        return data

    def read_row(self, task: str, row: int, *, check: bool = True, dtype=torch.bfloat16):
        """Sample ``row`` of ``task`` as a tensor of ``dtype``, its CRC checked."""
        dt, shape, _, _ = self.spec(task)
        if len(shape) < 2:
            raise CorruptTargetError(f"{self.path}: tensor {task!r} must be (N, R, ...), got "
                                     f"shape {shape} in the header")
        data = self.row_bytes(task, row)
        scale_bytes = self.row_bytes(f"{task}.scale", row, torch.float32, shape[:2]) \
            if f"{task}.scale" in self.entries else None
        if check:
            crc = zlib.crc32(data)
            if scale_bytes is not None:
                crc = zlib.crc32(scale_bytes, crc)
            stored = struct.unpack("<q", self.row_bytes(f"{task}.crc32", row, torch.int64,
                                                        shape[:1]))[0]
            if crc != stored:
                raise CorruptTargetError(f"{self.path}: row {row} of {task!r} fails its CRC "
                                         "(the file is damaged); run `olavlm targets verify`")
        value = torch.frombuffer(bytearray(data), dtype=dt).reshape(shape[1:])
        if scale_bytes is None:
            return value.to(dtype)
        scale = torch.frombuffer(bytearray(scale_bytes), dtype=torch.float32)
        return dequantize_fp8(value.unsqueeze(0), scale.unsqueeze(0), dtype)[0]


class TargetCache:
    """Targets by image key from a finished cache folder (``olavlm targets extract``).

    ``read(key)`` -> {task: tensor of ``dtype``}; ``lookup(key, image_digest=...)`` ->
    (targets or None, None or the problem: "missing_target" / "corrupt_target" /
    "stale_target") for the training loader. Keys are held as 64-bit hashes in sorted numpy
    arrays (24 bytes per image with the image digests, shared by forked workers); a lookup of
    a key that is absent matches a present one with probability ~N / 2^64.
    """

    def __init__(self, root: str | Path, *, tasks: Iterable[str] | None = None,
                 dtype: torch.dtype = torch.bfloat16, check_rows: bool = True):
        self.root = Path(root)
        if not (self.root / INDEX).is_file():
            raise FileNotFoundError(f"{self.root} holds no {INDEX}: not a finished target cache "
                                    "(run or resume `olavlm targets extract`)")
        index = read_json(self.root / INDEX)
        if index.get("format") != FORMAT or index.get("version") != FORMAT_VERSION:
            raise ValueError(f"{self.root / INDEX} must be {FORMAT} version {FORMAT_VERSION}, "
                             f"got {index.get('format')!r} {index.get('version')!r}")
        self.storage = index["storage"]
        available = {k: tuple(v["shape"]) for k, v in index["tasks"].items()}
        wanted = list(available) if tasks is None else list(tasks)
        missing = [t for t in wanted if t not in available]
        if missing:
            raise ValueError(f"tasks must be among the cache's {sorted(available)}, got "
                             f"{missing}")
        self.tasks = {t: available[t] for t in wanted}
        self.dtype = dtype
        self.check_rows = check_rows
        self.shards = [(s["file"], int(s["bytes"])) for s in index["shards"]]
        # A shard file of the right size from another extraction (swapped, or re-extracted
        # while this reader runs) passes the size and row CRC checks: its keys must match.
        self._shard_keys = [keys_digest(s["keys"]) for s in index["shards"]]
        self.rejects = index.get("rejects", [])
        self.fp8_error = index.get("fp8_error", {})
        hashes, shard_ids, rows, digests = [], [], [], []
        for k, shard in enumerate(index["shards"]):
            hashes += [key_hash(key) for key in shard["keys"]]
            shard_ids += [k] * len(shard["keys"])
            rows += range(len(shard["keys"]))
            digests += _digest_ints(shard.get("image_digests"), len(shard["keys"]))
        order = np.argsort(np.asarray(hashes, dtype=np.uint64), kind="stable")
        self._hashes = np.asarray(hashes, dtype=np.uint64)[order]
        if len(self._hashes) > 1 and bool((self._hashes[1:] == self._hashes[:-1]).any()):
            raise ValueError(f"{self.root}: two image keys share a 64-bit hash (or a key is "
                             "stored twice); re-extract")
        self._shard_ids = np.asarray(shard_ids, dtype=np.int32)[order]
        self._rows = np.asarray(rows, dtype=np.int32)[order]
        self._digests = np.asarray(digests, dtype=np.uint64)[order]  # 0: not recorded
        # Caches extracted before digests were recorded cannot tell a changed image.
        self.checks_image_digest = bool(len(self._digests)) and bool((self._digests != 0).any())
        self._files: dict[int, ShardFile | CorruptTargetError] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._hashes)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"] = {}  # file descriptors do not travel to spawned workers
        return state

    def _position(self, key: str) -> int | None:
        h = np.uint64(key_hash(key))
        i = int(np.searchsorted(self._hashes, h))
        return None if i == len(self._hashes) or self._hashes[i] != h else i

    def location(self, key: str) -> tuple[int, int] | None:
        """(shard index, row) of ``key``, or None."""
        i = self._position(key)
        return None if i is None else (int(self._shard_ids[i]), int(self._rows[i]))

    def image_digest(self, key: str) -> str | None:
        """The digest of ``key``'s image file recorded at extraction (``olavlm.data.
        image_digest``), or None (absent key, or a cache from before digests were kept)."""
        i = self._position(key)
        if i is None or int(self._digests[i]) == 0:
            return None
        return f"{int(self._digests[i]):016x}"

    def __contains__(self, key: str) -> bool:
        return self.location(key) is not None

    def _shard(self, k: int) -> ShardFile:
        if os.getpid() != self._pid:  # a forked worker: its own descriptors
            self._files, self._pid = {}, os.getpid()
        shard = self._files.get(k)
        if shard is None:
            name, size = self.shards[k]
            try:
                shard = ShardFile(self.root / name, expected_bytes=size)
                if keys_digest(shard.metadata.get("keys") or []) != self._shard_keys[k]:
                    shard.close()
                    raise CorruptTargetError(
                        f"{shard.path}: holds the targets of other images than {INDEX} lists "
                        "for it (a shard from another extraction, or one re-extracted since "
                        "this cache was opened)")
            except CorruptTargetError as err:
                shard = err  # remembered: every row of this shard is reported
            except OSError as err:  # not remembered: an I/O error may pass (network storage)
                raise CorruptTargetError(f"{self.root / name}: cannot read: {err}") from err
            self._files[k] = shard
        if isinstance(shard, CorruptTargetError):
            raise shard
        return shard

    def read(self, key: str) -> dict[str, torch.Tensor]:
        """{task: (*shape) tensor}; ``KeyError`` if absent, ``CorruptTargetError`` if damaged."""
        where = self.location(key)
        if where is None:
            raise KeyError(f"image key {key!r} is not in the target cache {self.root}")
        shard = self._shard(where[0])
        try:
            out = {t: shard.read_row(t, where[1], check=self.check_rows, dtype=self.dtype)
                   for t in self.tasks}
        except OSError as err:  # an I/O error reading the row: reported, not a crashed loader
            raise CorruptTargetError(f"{shard.path}: cannot read row {where[1]}: {err}") from err
        for t, v in out.items():
            if tuple(v.shape) != self.tasks[t]:
                raise CorruptTargetError(f"{shard.path}: {t!r} rows have shape "
                                         f"{tuple(v.shape)} in the header, the index says "
                                         f"{self.tasks[t]}")
        return out

    def lookup(self, key: str, image_digest: str | None = None
               ) -> tuple[dict[str, torch.Tensor] | None, str | None, str]:
        """(targets, None, "") or (None, "missing_target" | "corrupt_target" | "stale_target",
        detail). ``image_digest``: the digest of the image file the sample was decoded from;
        when it differs from the one recorded at extraction the targets belong to another
        version of the image (``stale_target``)."""
        if image_digest is not None:
            stored = self.image_digest(key)
            if stored is not None and stored != image_digest:
                return None, "stale_target", (
                    f"image {key!r} changed after its targets were extracted into {self.root} "
                    f"(file digest {image_digest}, cached {stored}), or the cache was "
                    "extracted from other data with the same file names; rerun `olavlm "
                    "targets extract --overwrite` for this data")
        try:
            return self.read(key), None, ""
        except KeyError as err:
            return None, "missing_target", str(err)
        except CorruptTargetError as err:
            return None, "corrupt_target", str(err)

    def get_batch(self, keys: Sequence[str | None]):
        """({task: (B, *shape)}, present (B,) bool, problems [(row, reason, detail)]): rows
        that are absent or damaged are zeros with ``present`` False, and listed."""
        out = {t: torch.zeros((len(keys), *s), dtype=self.dtype) for t, s in self.tasks.items()}
        present = torch.zeros(len(keys), dtype=torch.bool)
        problems = []
        for i, key in enumerate(keys):
            if key is None:
                continue
            values, reason, detail = self.lookup(key)
            if values is None:
                problems.append((i, reason, detail))
                continue
            for t, v in values.items():
                out[t][i] = v
            present[i] = True
        return out, present, problems

    def sample_bytes(self) -> int:
        """Stored bytes of one image's targets (all tasks)."""
        per = 0
        for shape in self.tasks.values():
            n = int(np.prod(shape))
            per += n * (2 if self.storage == "bf16" else 1) + 8
            per += 4 * shape[0] if self.storage == "fp8_e4m3" else 0
        return per
