# LLaVA json/jsonl data: an offset index (streamed, never parsed twice) and the training dataset.
"""Reading LLaVA data (SPEC 5.2) into tokenized, image-bearing samples.

An entry is ``{"id", "image" (path relative to the image folder, optional), "conversations":
[{"from": "human"|"gpt", "value": str}, ...]}``; other keys are kept (the synthetic dataset
stores its scene there).

``LlavaIndex`` reads the files once. A ``.jsonl`` file is streamed line by line: each line is
parsed once to validate it and to measure its length for grouping, and only where it is stays
(22 bytes per entry: a 665K-entry file costs ~15 MB, not a second parsed copy); the entry is
parsed again from disk when a worker needs it. A ``.json`` file (one list) has to be parsed
whole; each entry is then re-encoded into one compact byte buffer and the parsed list is
dropped, so the workers share flat numpy buffers instead of millions of Python objects (whose
reference counts would copy them into every forked worker).

``LlavaDataset`` turns entry ``i`` into a ``Sample``: tokens and labels (templates.py), the
encoder view, the raw image and optional teacher views, all from one decode.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image

from .bad_data import BadSampleError, Reject, check_policy
from .images import ImageProblem, ImageView, image_digest, open_image_file, pil_to_uint8
from .templates import (
    ConversationError,
    check_template_tokens,
    get_template,
    prepare_turns,
    tokenize_conversation,
)

__all__ = [
    "MISSING_TARGET_POLICIES",
    "LlavaDataset",
    "LlavaIndex",
    "Sample",
    "image_key",
    "resolve_image_path",
    "validate_entry",
]

_JSON_SUFFIXES = (".json", ".jsonl")
MISSING_TARGET_POLICIES = ("mask", "raise")


def image_key(relative: str) -> str:
    """The key of an entry's image in a target cache: its ``image`` path as written in the data
    file, normalized (``/`` separators, no ``./`` or doubled slashes)."""
    return PurePosixPath(relative.replace("\\", "/")).as_posix()


def resolve_image_path(index: LlavaIndex, i: int, relative: str,
                       image_folder: str | Path | None = None) -> Path:
    """Where entry ``i``'s ``relative`` file lives: absolute paths as they are, others under
    ``image_folder`` (default: the folder of the data file holding the entry)."""
    path = Path(relative)
    if path.is_absolute():
        return path
    base = Path(image_folder) if image_folder is not None else index.source_path(i).parent
    found = base / path
    if "\\" in relative and not found.exists():  # a data file written on Windows: the same
        # separators image_key normalizes (a name with a literal backslash is tried first)
        found = base / PurePosixPath(relative.replace("\\", "/"))
    return found


def validate_entry(entry) -> tuple[str, str] | None:
    """(reason, detail) when ``entry`` cannot be a sample, else None (structure only: files
    and tokenization are checked when the sample is loaded)."""
    if not isinstance(entry, dict):
        return "bad_entry", f"an entry must be a JSON object, got {type(entry).__name__}"
    conversations = entry.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        return ("no_conversations",
                f"'conversations' must be a non-empty list, got {conversations!r:.60}")
    image = entry.get("image")
    if image is not None and not isinstance(image, str):
        return "bad_entry", f"'image' must be one relative path (str), got {image!r:.60}"
    if isinstance(image, str) and not image.strip():  # LLaVA's loader would open the folder
        return "bad_entry", ("'image' is an empty string: give the image's path, or drop the "
                             "key for a text-only sample")
    if isinstance(image, str):
        try:
            image.encode("utf-8")
        except UnicodeEncodeError as err:
            return "bad_entry", f"'image' is not valid Unicode: {err.reason} at {err.start}"
    try:
        prepare_turns(conversations, has_image=bool(image))
    except ConversationError as err:
        return err.reason, str(err)
    return None


def _modality_length(entry: dict) -> int:
    # LLaVA's modality_lengths: word count, negative for text-only samples (never 0, so the
    # sign always tells the modality).
    words = sum(len(turn["value"].split()) for turn in entry["conversations"])
    return max(words, 1) if entry.get("image") else -max(words, 1)


def _sample_id(entry, location: str) -> str:
    if isinstance(entry, dict) and entry.get("id") is not None:
        return str(entry["id"])
    return location


class LlavaIndex:
    """Where each valid entry of one or more LLaVA ``.json``/``.jsonl`` files lives.

    ``rejects`` lists the entries left out while indexing (malformed lines, entries without
    conversations, other malformed entries); with ``on_bad_sample="raise"`` the first one
    raises ``BadSampleError`` instead. ``modality_lengths[i]`` is LLaVA's signed word count.
    """

    def __init__(self, paths: str | Path | Sequence[str | Path], *, on_bad_sample: str = "skip"):
        check_policy(on_bad_sample)
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        if not paths or len(paths) > np.iinfo(np.int16).max:
            raise ValueError("data_path must name 1 to 32767 .json/.jsonl files, got "
                             f"{len(paths)}")
        self.paths = [Path(p) for p in paths]
        self.on_bad_sample = on_bad_sample
        self.rejects: list[Reject] = []
        self._buffers: list[np.ndarray | None] = []
        file_idx, offsets, sizes, linenos, lengths = [], [], [], [], []
        for k, path in enumerate(self.paths):
            if path.suffix not in _JSON_SUFFIXES or not path.is_file():
                raise ValueError(f"data_path must be existing {_JSON_SUFFIXES} files, got "
                                 f"{str(path)!r}")
            reader = self._scan_jsonl if path.suffix == ".jsonl" else self._scan_json
            for offset, size, lineno, length in reader(k, path):
                file_idx.append(k)
                offsets.append(offset)
                sizes.append(size)
                linenos.append(lineno)
                lengths.append(length)
        # 22 bytes per entry in flat arrays, shared by forked workers without copies.
        self._file_idx = np.asarray(file_idx, dtype=np.int16)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._sizes = np.asarray(sizes, dtype=np.int32)
        self._linenos = np.asarray(linenos, dtype=np.int32)
        self.modality_lengths = np.asarray(lengths, dtype=np.int32)
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()

    def _reject(self, reason: str, entry, location: str, detail: str) -> None:
        reject = Reject(reason=reason, sample_id=_sample_id(entry, location), location=location,
                        detail=detail)
        if self.on_bad_sample == "raise":
            raise BadSampleError(reject)
        self.rejects.append(reject)

    def _scan_jsonl(self, k: int, path: Path):
        self._buffers.append(None)  # entries stay on disk
        offset = 0
        first = True
        with path.open("rb") as f:
            for lineno, line in enumerate(f, start=1):
                start, offset = offset, offset + len(line)
                if not line.strip():
                    continue  # blank lines hold no sample
                if first and line.lstrip(b"\xef\xbb\xbf \t").startswith(b"["):
                    # a pretty-printed JSON list (LLaVA's own files are lists): one document,
                    # not one malformed_json reject per printed line
                    raise ValueError(f"{path}: a .jsonl file holds one JSON object per line, "
                                     "but this one starts a JSON list ('['); name it .json")
                first = False
                location = f"{path}:{lineno}"
                try:
                    entry = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    self._reject("malformed_json", None, location, f"not valid JSON: {err}")
                    continue
                problem = validate_entry(entry)
                if problem is not None:
                    self._reject(problem[0], entry, location, problem[1])
                    continue
                yield start, len(line), lineno, _modality_length(entry)

    def _scan_json(self, k: int, path: Path):
        try:
            with path.open("rb") as f:
                entries = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            # One document: nothing can be skipped, whatever the policy.
            hint = (" (one JSON object per line? name it .jsonl)"
                    if isinstance(err, json.JSONDecodeError) and err.msg == "Extra data" else "")
            raise ValueError(f"{path}: not valid JSON ({err}){hint}") from err
        if not isinstance(entries, list):
            raise ValueError(f"{path}: a .json data file must hold a list of entries, got "
                             f"{type(entries).__name__}")
        chunks, offset = [], 0
        for j, entry in enumerate(entries):
            location = f"{path}[#{j}]"
            problem = validate_entry(entry)
            if problem is not None:
                self._reject(problem[0], entry, location, problem[1])
                continue
            try:
                blob = json.dumps(entry, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate ("\ud800" in the file): kept escaped
                blob = json.dumps(entry).encode("ascii")
            chunks.append(blob)
            yield offset, len(blob), j, _modality_length(entry)
            offset += len(blob)
        del entries
        self._buffers.append(np.frombuffer(b"".join(chunks), dtype=np.uint8))

    def __len__(self) -> int:
        return len(self._offsets)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = {}  # open files do not travel to spawned workers
        return state

    def location(self, i: int) -> str:
        k = int(self._file_idx[i])
        if self._buffers[k] is None:
            return f"{self.paths[k]}:{int(self._linenos[i])}"
        return f"{self.paths[k]}[#{int(self._linenos[i])}]"

    def source_path(self, i: int) -> Path:
        return self.paths[int(self._file_idx[i])]

    def _read(self, k: int, offset: int, size: int) -> bytes:
        if os.getpid() != self._pid:  # a forked worker: its own file handles
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get(k)
        if handle is None:
            handle = self._handles[k] = self.paths[k].open("rb")
        handle.seek(offset)
        return handle.read(size)

    def entry(self, i: int) -> dict:
        """The parsed entry ``i`` (0 <= i < len(self))."""
        if not 0 <= i < len(self):
            raise IndexError(f"index must be in [0, {len(self)}), got {i}")
        k, offset, size = int(self._file_idx[i]), int(self._offsets[i]), int(self._sizes[i])
        buffer = self._buffers[k]
        blob = self._read(k, offset, size) if buffer is None else buffer[offset:offset + size]
        return json.loads(bytes(blob))


# The stand-in sample's conversation (``LlavaDataset.stand_in_sample``): short, so that it fits
# any max_length a template leaves room for; its labels are cleared before it runs.
STAND_IN_CONVERSATION = ({"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hi"})


@dataclasses.dataclass
class Sample:
    """One training sample. ``input_ids``/``labels``: (T,) int64 with IMAGE_TOKEN_INDEX at the
    image; ``image``: (3, S, S) encoder view (zeros without an image); ``raw_image``: the
    decoded RGB pixels (3, H, W) uint8 for the teachers (a black S x S image without one);
    ``teacher_views``: name -> (3, s, s) tensor; ``image_key``: the image's target-cache key;
    ``targets``: task -> cached target (zeros unless ``target_present``); ``target_problem``:
    why an image sample has no target (a counted ``Reject``); ``maps``: the synthetic
    dataset's exact maps (``load_scene_maps``)."""

    index: int
    sample_id: str
    input_ids: torch.Tensor
    labels: torch.Tensor
    image: torch.Tensor
    has_image: bool
    truncated: bool
    raw_image: torch.Tensor | None = None
    teacher_views: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    image_key: str | None = None
    targets: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    target_present: bool = False
    target_problem: Reject | None = None
    maps: dict[str, torch.Tensor] | None = None


class LlavaDataset(torch.utils.data.Dataset):
    """Tokenized LLaVA samples with their image views (module docstring).

    ``__getitem__`` returns a ``Sample``, or, for a bad sample under ``on_bad_sample="skip"``,
    the ``Reject`` describing it (the collator leaves it out and the loader counts it). Image
    paths are relative to ``image_folder`` (default: the data file's folder).

    ``targets`` (e.g. ``olavlm.teachers.TargetCache``: ``.tasks`` {task: shape}, ``.dtype``,
    ``.lookup(key) -> (values | None, problem, detail)``) adds each image's cached targets. An
    image without them gets zero targets with ``target_present=False`` (its loss mask is 0)
    and is counted and logged as ``missing_target``/``corrupt_target``, or raises
    ``BadSampleError`` with ``on_missing_target="raise"``. When ``targets.checks_image_digest``
    is true, ``lookup`` also gets ``image_digest=`` (of the bytes just decoded), and targets
    extracted from an image file that has changed since are ``stale_target``, handled alike.
    ``keep_maps`` adds the synthetic dataset's depth and segmentation maps (for the synthetic
    teacher run online).
    """

    def __init__(
        self,
        data_path: str | Path | Sequence[str | Path] | LlavaIndex,
        tokenizer,
        *,
        image_folder: str | Path | None = None,
        template: str = "llava_llama_3",
        image_view: ImageView | None = None,
        teacher_views: Mapping[str, ImageView] | None = None,
        keep_raw_image: bool = True,
        max_length: int = 4096,
        num_image_tokens: int = 600,
        on_bad_sample: str = "skip",
        targets=None,
        on_missing_target: str = "mask",
        keep_maps: bool = False,
    ):
        self.on_bad_sample = check_policy(on_bad_sample)
        if on_missing_target not in MISSING_TARGET_POLICIES:
            raise ValueError(f"on_missing_target must be one of {MISSING_TARGET_POLICIES}, got "
                             f"{on_missing_target!r}")
        if targets is not None and not all(hasattr(targets, a) for a in ("tasks", "lookup")):
            raise TypeError("targets must have .tasks and .lookup(key) (a TargetCache), got "
                            f"{type(targets).__name__}")
        self.targets = targets
        self.on_missing_target = on_missing_target
        self.keep_maps = keep_maps
        self.template = get_template(template)
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError("tokenizer must be a fast transformers tokenizer (it must report "
                            f"character offsets), got {type(tokenizer).__name__}")
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer must have a pad token (the seed adds '<pad>' to Llama-3),"
                             " got pad_token_id=None")
        for name, value, low in (("max_length", max_length, 2),
                                 ("num_image_tokens", num_image_tokens, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        check_template_tokens(tokenizer, self.template)
        self.tokenizer = tokenizer
        self.image_folder = None if image_folder is None else Path(image_folder)
        self.image_view = image_view if image_view is not None else ImageView()
        if not isinstance(self.image_view, ImageView):
            raise TypeError(f"image_view must be an ImageView, got {type(image_view).__name__}")
        self.teacher_views = dict(teacher_views or {})
        self.keep_raw_image = keep_raw_image
        self.max_length = max_length
        self.num_image_tokens = num_image_tokens
        if isinstance(data_path, LlavaIndex):
            self.index = data_path
        else:
            self.index = LlavaIndex(data_path, on_bad_sample=on_bad_sample)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def modality_lengths(self) -> np.ndarray:
        return self.index.modality_lengths

    def image_path(self, i: int, relative: str) -> Path:
        return resolve_image_path(self.index, i, relative, self.image_folder)

    def _blank_targets(self) -> dict[str, torch.Tensor]:
        dtype = getattr(self.targets, "dtype", torch.bfloat16)
        return {t: torch.zeros(shape, dtype=dtype) for t, shape in self.targets.tasks.items()}

    def _add_targets(self, i: int, entry: dict, sample: Sample, image_bytes: bytes) -> None:
        if getattr(self.targets, "checks_image_digest", False):
            values, reason, detail = self.targets.lookup(
                sample.image_key, image_digest=image_digest(image_bytes))
        else:
            values, reason, detail = self.targets.lookup(sample.image_key)
        if values is not None:
            sample.targets, sample.target_present = values, True
            return
        location = self.index.location(i)
        problem = Reject(reason=reason, sample_id=sample.sample_id, location=location,
                         detail=detail, index=i)
        if self.on_missing_target == "raise":
            raise BadSampleError(problem)
        sample.targets, sample.target_problem = self._blank_targets(), problem

    def _add_maps(self, i: int, entry: dict, sample: Sample) -> Reject | None:
        from .synthetic import load_scene_maps

        folder = self.image_folder or self.index.source_path(i).parent
        try:
            sample.maps = load_scene_maps(entry, folder)
        except (OSError, ValueError) as err:  # the image itself was fine: its maps are not
            return self._bad(i, entry, "bad_maps", f"{type(err).__name__}: {err}")
        return None

    def _text_only(self, sample: Sample) -> Sample:
        """``sample`` (no image) with the blank views, targets and maps every sample carries."""
        size = self.image_view.size
        if self.keep_raw_image:
            sample.raw_image = torch.zeros(3, size, size, dtype=torch.uint8)
        sample.teacher_views = {k: v.blank() for k, v in self.teacher_views.items()}
        if self.targets is not None:
            sample.targets = self._blank_targets()  # masked: no image, nothing to count
        if self.keep_maps:
            sample.maps = {"depth_mm": torch.zeros(size, size, dtype=torch.int32),
                           "seg_class": torch.zeros(size, size, dtype=torch.uint8)}
        return sample

    def stand_in_sample(self) -> Sample:
        """A text-only sample built from no entry of the data: what a rank runs (with nothing
        to learn from, ``Batch.as_stand_in``) when its batch was rejected whole before it had
        a batch of its own. It has every view, target and map a real sample of this dataset
        has, so its forward runs the same modules (and collectives) as the other ranks'."""
        tokens = tokenize_conversation(
            STAND_IN_CONVERSATION, self.tokenizer, self.template, has_image=False,
            max_length=self.max_length, num_image_tokens=self.num_image_tokens)
        return self._text_only(Sample(
            index=-1, sample_id="stand-in", input_ids=tokens.input_ids, labels=tokens.labels,
            image=self.image_view.blank(), has_image=False, truncated=False))

    def _bad(self, i: int, entry: dict, reason: str, detail: str) -> Reject:
        location = self.index.location(i)
        reject = Reject(reason=reason, sample_id=_sample_id(entry, location), location=location,
                        detail=detail, index=i)
        if self.on_bad_sample == "raise":
            raise BadSampleError(reject)
        return reject

    def __getitem__(self, i: int) -> Sample | Reject:
        entry = self.index.entry(i)
        has_image = bool(entry.get("image"))
        try:
            tokens = tokenize_conversation(
                entry["conversations"], self.tokenizer, self.template, has_image=has_image,
                max_length=self.max_length, num_image_tokens=self.num_image_tokens)
        except ConversationError as err:
            return self._bad(i, entry, err.reason, str(err))
        sample = Sample(index=i, sample_id=_sample_id(entry, self.index.location(i)),
                        input_ids=tokens.input_ids, labels=tokens.labels,
                        image=self.image_view.blank(), has_image=has_image,
                        truncated=tokens.truncated)
        if not has_image:
            return self._text_only(sample)
        sample.image_key = image_key(entry["image"])
        path = self.image_path(i, entry["image"])
        try:  # the one read and decode every view below derives from
            data, pil = open_image_file(path)
        except ImageProblem as problem:  # a counted reject, never a dead worker
            return self._bad(i, entry, problem.reason, problem.detail)
        try:  # (a pad view of a huge image refuses its canvas with a ValueError)
            sample.image = self.image_view(pil)
            sample.teacher_views = {k: v(pil) for k, v in self.teacher_views.items()}
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            return self._bad(i, entry, "corrupt_image", f"{path}: {type(err).__name__}: {err}")
        if self.keep_raw_image:
            sample.raw_image = pil_to_uint8(pil)
        if self.keep_maps:
            bad = self._add_maps(i, entry, sample)
            if bad is not None:
                return bad
        if self.targets is not None:
            self._add_targets(i, entry, sample, data)
        return sample
