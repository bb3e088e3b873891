# Building a run's parts from its Config: tokenizer, model, dataset and loader, teachers.
"""Everything here fails before any training work starts: bad paths, an unknown teacher, heads
whose target shapes disagree with the teachers' are reported with the config key to change.

``model.llm`` / ``model.vision_tower`` may be ``"tiny:<kind>"`` (llama, phi3, qwen2 /
clip, siglip, convnext): a tiny random-weight model of that real architecture is written under
the run directory and loaded through the normal loading code (the demo recipe uses this).
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import torch

from olavlm._fs import process_alive
from olavlm.models.config import ModelConfig
from olavlm.models.ola import OlaVLM

__all__ = ["build_data", "build_model", "build_teachers_for", "build_tokenizer",
           "generate_folder", "synthetic_dataset_dir"]

logger = logging.getLogger("olavlm.train")

TINY_LLM = dict(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2)
TINY_TOWER = dict(hidden_size=32, num_layers=2)


def synthetic_dataset_dir(cfg, *, is_main: bool, barrier) -> Path:
    """The built-in synthetic dataset for DataConfig.path == "": generated on first use (rank 0
    writes, the others wait) under synthetic_dir, one folder per (num, size, seed)."""
    d = cfg.data
    root = Path(d.synthetic_dir).expanduser() / f"n{d.synthetic_num}-s{d.synthetic_size}-seed0"
    if is_main and not (root / "meta.json").is_file():
        from olavlm.data.synthetic import write_synthetic_dataset

        logger.info("generating the synthetic dataset (%d samples) in %s", d.synthetic_num, root)
        generate_folder(root, lambda tmp: write_synthetic_dataset(
            tmp, d.synthetic_num, size=d.synthetic_size, seed=0),
            is_complete=lambda folder: (folder / "meta.json").is_file())
    barrier()
    return root


def generate_folder(final: Path, build: Callable[[Path], object], *,
                    is_complete: Callable[[Path], bool]) -> None:
    """Write a generated folder (a tiny model, the synthetic dataset) under a temporary name
    beside ``final``, then rename it into place: a process killed while writing leaves a
    ``.tmp-`` folder (removed by a later call once its writer is gone), never a half-written
    ``final`` that every later run would take as complete and fail to load. A ``final`` that
    is incomplete (written by a version without this) is replaced; one that another job
    finished first is kept, and this one's copy dropped."""
    final.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    for stale in final.parent.glob(f".tmp-{final.name}-{host}-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".tmp-{final.name}-{host}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        build(tmp)
        if final.exists() and not is_complete(final):
            logger.warning("%s is incomplete (an earlier run stopped while writing it): "
                           "replacing it", final)
            shutil.rmtree(final)
        try:
            os.replace(tmp, final)
        except OSError:
            if not is_complete(final):  # not "another job got there first"
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


REJECTS_FILE = "rejects.jsonl"  # in the run folder (one per rank: rank_rejects_path)


def _data_files(cfg, data_root: Path | None) -> tuple[list[Path], Path | None]:
    if data_root is not None:
        return [data_root / "train.jsonl"], data_root
    paths = [Path(p).expanduser() for p in str(cfg.data.path).split(",") if p]
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"data.path: {str(p)!r} does not exist")
        if p.is_dir():
            hint = (f"; for a dataset folder written by `olavlm data synth` pass "
                    f"data.path={p / 'train.jsonl'} data.tokenizer={p / 'tokenizer'}"
                    if (p / "train.jsonl").is_file() else "")
            raise ValueError(f"data.path: expected .json/.jsonl files (comma-separated), got "
                             f"the directory {str(p)!r}{hint}")
        if p.suffix not in (".json", ".jsonl"):
            raise ValueError(f"data.path: expected .json/.jsonl files (comma-separated), got "
                             f"{str(p)!r}")
    folder = Path(cfg.data.image_folder).expanduser() if cfg.data.image_folder else None
    return paths, folder


def check_inputs(cfg, data_root: Path | None) -> None:
    """The inputs a run reads after its models loaded (minutes for an 8B LLM, on every rank)
    checked first, in milliseconds: data.path, data.image_folder, checkpoint.init_from, and
    the targets' source (the built-in teachers' weights, or teachers.cache_dir). Each error is
    the one the later step would give."""
    _data_files(cfg, data_root)
    for key, value in (("data.image_folder", cfg.data.image_folder if cfg.data.path else None),
                       ("checkpoint.init_from", cfg.checkpoint.init_from)):
        if value and not Path(value).expanduser().is_dir():
            raise FileNotFoundError(f"{key}: {str(Path(value).expanduser())!r} is not a "
                                    "directory")
    tc = cfg.teachers
    if cfg.train.stage not in ("pt", "full") or not cfg.model.tasks:
        return  # (no embedding losses: no targets read)
    if tc.mode == "online":
        from olavlm.teachers.registry import find_teacher_weights

        weights = tc.weights or {}
        for name in (n.strip() for n in tc.names.split(",")):
            if name:  # (unknown names are reported with the choices when the teachers build)
                find_teacher_weights(name, weights.get(name))
    elif tc.mode == "cache" and tc.cache_dir:
        from olavlm.teachers.cache import INDEX

        root = Path(tc.cache_dir).expanduser()
        if not (root / INDEX).is_file():
            what = "does not exist" if not root.exists() else f"holds no {INDEX}"
            raise FileNotFoundError(f"teachers.cache_dir: {str(root)!r} {what}: not a finished "
                                    "target cache (write one with `olavlm targets extract`, "
                                    "docs/teachers.md)")


def build_tokenizer(cfg, data_root: Path | None):
    from olavlm.data.tokenizer import load_local_tokenizer

    path = cfg.data.tokenizer
    if path is None:
        if data_root is not None:
            path = data_root / "tokenizer"
        elif cfg.model.llm and not cfg.model.llm.startswith("tiny:"):
            path = cfg.model.llm  # the LLM's own tokenizer
            if not Path(path).expanduser().exists():  # (the first path a run reads: say
                raise missing_weights("model.llm", path)  # which key, and where to get it)
        else:
            raise ValueError("data.tokenizer: give a tokenizer folder (the data is not the "
                             "built-in synthetic dataset, which ships its own)")
    what = ("data.tokenizer" if cfg.data.tokenizer is not None else
            "data.tokenizer (the synthetic dataset's)" if data_root is not None else
            "data.tokenizer (model.llm's)")
    tokenizer = load_local_tokenizer(path, what)
    ensure_pad_token(tokenizer)
    return tokenizer


def ensure_pad_token(tokenizer) -> bool:
    """Llama-3's tokenizer has no pad token: the seed adds "<pad>" (vocabulary 128256 ->
    128257, SPEC 1.3) and build_model grows the embeddings to match. True if one was added."""
    if tokenizer.pad_token_id is not None:
        return False
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    logger.info("the tokenizer has no pad token: added '<pad>' (id %d), as the seed does",
                tokenizer.pad_token_id)
    return True


def resize_embeddings_like_seed(llm, num_tokens: int) -> int:
    """Grow the input and output embeddings to ``num_tokens`` rows, each new row the mean of the
    old ones (the seed's ``smart_tokenizer_and_embedding_resize``). Returns rows added."""
    old = llm.get_input_embeddings().num_embeddings
    if num_tokens <= old:
        return 0
    llm.resize_token_embeddings(num_tokens, mean_resizing=False)
    with torch.no_grad():
        for emb in {id(e): e for e in (llm.get_input_embeddings(),
                                       llm.get_output_embeddings()) if e is not None}.values():
            emb.weight[old:] = emb.weight[:old].mean(0, keepdim=True)
    return num_tokens - old


_END_OF_TURN = ("<|eot_id|>", "<|end|>", "<|im_end|>")  # Llama-3, Phi-3, Qwen2 chat templates


def _end_ids(tokenizer) -> list[int] | None:
    """The ids that end generation for a tiny LLM: the tokenizer's eos and its chat template's
    end-of-turn token (as Llama-3's generation config lists both)."""
    vocab = tokenizer.get_vocab()
    ids = [tokenizer.eos_token_id] + [vocab[t] for t in _END_OF_TURN if t in vocab]
    ids = list(dict.fromkeys(i for i in ids if i is not None))
    return ids or None


def missing_weights(key: str, spec: str) -> FileNotFoundError:
    """A model folder that is not there: the config key to set and, for the recipes' models,
    the Hugging Face repository to download (as the teachers' own message does)."""
    from olavlm.models.vision import strip_res_suffix
    from olavlm.recipes.llava import WEIGHTS_REPOS

    repo = WEIGHTS_REPOS.get(Path(strip_res_suffix(str(spec)).rstrip("/")).name)
    gated = "; gated: accept its license on the Hub first" \
        if repo and repo.startswith("meta-llama/") else ""
    how = (f"download {repo} on a machine with network access (`hf download {repo} "
           f"--local-dir DIR`{gated}) and pass {key}=DIR" if repo else
           f"pass {key}=DIR, a local copy of the model")
    return FileNotFoundError(f"{key}: {str(spec)!r} does not exist (models are never "
                             f"downloaded): {how}; or {key}=tiny:<arch> for a tiny "
                             "random-weight one")


def _materialize(spec: str, kind: str, work: Path, tokenizer) -> str:
    if not spec.startswith("tiny:"):
        local = Path(spec).expanduser()
        # A ConvNeXt tower named the seed's way ("...-soup-res768", the recipes' placeholder)
        # is the hub folder without the suffix, read at that size: the loader strips it.
        from olavlm.models.vision import strip_res_suffix

        if not local.exists() and not (kind == "vision_tower"
                                       and Path(strip_res_suffix(str(local))).exists()):
            raise missing_weights(f"model.{kind}", spec)
        return str(local)
    arch = spec.split(":", 1)[1]
    if kind == "llm":
        from olavlm.models.tiny_llm import TINY_LLM_KINDS, build_tiny_llm

        if arch not in TINY_LLM_KINDS:
            raise ValueError(f"model.llm: tiny:{arch} is unknown; use one of "
                             f"{[f'tiny:{k}' for k in TINY_LLM_KINDS]}")
        out = work / f"tiny-{arch}"
        if not _tiny_llm_complete(out):
            generate_folder(out, lambda tmp: build_tiny_llm(
                arch, tmp, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=_end_ids(tokenizer),
                **TINY_LLM), is_complete=_tiny_llm_complete)
        return str(out)
    from olavlm.models.vision import VISION_TOWERS, build_tiny_vision_tower

    if arch not in VISION_TOWERS:
        raise ValueError(f"model.vision_tower: tiny:{arch} is unknown; use one of "
                         f"{[f'tiny:{k}' for k in VISION_TOWERS]}")
    folder = work / f"tiny-{arch}"  # (build_tiny_vision_tower's layout)
    if _tiny_tower_complete(folder):
        return str(folder)  # written already (by rank 0, or an earlier run in this folder)
    size = 64 if arch != "convnext" else None

    def build(tmp: Path) -> None:  # build_tiny_vision_tower writes <dir>/tiny-<arch>: lift it
        written = build_tiny_vision_tower(arch, tmp, image_size=size,
                                          **(TINY_TOWER if arch != "convnext" else {}))
        for part in list(written.iterdir()):
            os.replace(part, tmp / part.name)
        written.rmdir()

    generate_folder(folder, build, is_complete=_tiny_tower_complete)
    return str(folder)


def _tiny_llm_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _tiny_tower_complete(folder: Path) -> bool:
    hf = (folder / "config.json").is_file() and (folder / "preprocessor_config.json").is_file()
    clip = (folder / "open_clip_config.json").is_file()
    return (hf or clip) and any(folder.glob("*.safetensors"))


def build_model(cfg, tokenizer, work_dir: Path, *, is_main: bool, barrier,
                device: torch.device | None = None, meta: bool = False) -> OlaVLM:
    """The OlaVLM of cfg.model (the trainer moves it to ``device``; the LLM's weights are loaded
    straight onto a GPU ``device`` when accelerate is installed); tiny:* parts written first.

    ``meta``: the LLM, projector, task tokens, heads and logit scales on the meta device (no
    storage; ``parallel.load=rank0`` fills them from rank 0 after sharding), built by the same
    code as the real model, so their structure is the same (olavlm.train.load checks it). The
    vision tower is loaded as usual (frozen and comparatively small; rank 0's copy is then sent
    over it with the rest, so that read is redundant)."""
    mc: ModelConfig = cfg.model
    work_dir = Path(work_dir) / "models"
    if is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
        llm = _materialize(mc.llm, "llm", work_dir, tokenizer)
        tower = _materialize(mc.vision_tower, "vision_tower", work_dir, tokenizer)
    barrier()
    if not is_main:
        llm = _materialize(mc.llm, "llm", work_dir, tokenizer)
        tower = _materialize(mc.vision_tower, "vision_tower", work_dir, tokenizer)
    from dataclasses import replace

    from olavlm.models.vision import build_vision_tower, tower_kind

    resolved = replace(mc, llm=llm, vision_tower=tower)
    options = {"image_size": cfg.data.image_size} if cfg.data.image_size and \
        (mc.vision_kind or tower_kind(tower)) == "convnext" else {}
    vision = build_vision_tower(tower, kind=mc.vision_kind, select_layer=mc.vision_select_layer,
                                dtype=torch.float32, **options)
    if cfg.data.image_size and vision.image_size != cfg.data.image_size:
        raise ValueError(f"data.image_size is {cfg.data.image_size} but the vision tower "
                         f"{tower} takes {vision.image_size} px images")
    # Every rank must draw the same initial weights (FSDP2 shards each rank's own copy), and
    # whether a rank wrote the tiny models or the dataset above must not change the draws.
    from olavlm.models.llm import load_llm

    llm_model = load_llm(llm, dtype=mc.dtype, attn_implementation=mc.attn_implementation,
                         device=None if meta else device, meta=meta)
    torch.manual_seed(cfg.train.seed)
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = OlaVLM(resolved, llm=llm_model, vision_tower=vision)
        added = resize_embeddings_like_seed(model.llm, len(tokenizer))
    if added:
        model.llm.config.pad_token_id = tokenizer.pad_token_id
        logger.info("grew the LLM's embeddings by %d rows (mean-initialized) to the tokenizer's "
                    "%d tokens", added, len(tokenizer))
    return model


def build_teachers_for(cfg, model: OlaVLM, device: torch.device):
    """OnlineTargets for teachers.mode == "online" (None otherwise), checked against the heads."""
    tc = cfg.teachers
    if tc.mode not in ("online", "cache", "none"):
        raise ValueError(f"teachers.mode must be online, cache or none, got {tc.mode!r}")
    if tc.mode != "online" or not model.tasks:
        return None
    from olavlm.teachers import OnlineTargets, build_teachers

    names = [n.strip() for n in tc.names.split(",") if n.strip()]
    kwargs = dict(getattr(tc, "synthetic", None) or {}) if names == ["synthetic"] else {}
    from olavlm.teachers.registry import DTYPES, TEACHERS

    unknown = [n for n in names if n not in TEACHERS]
    if unknown or not names:  # (before any teacher loads: not a missing weight of another)
        what = f"names no teacher: {tc.names!r}" if not names else \
            f"{unknown[0]!r} is not a teacher"
        match = difflib.get_close_matches(unknown[0], list(TEACHERS), n=1) if unknown else []
        hint = f" (did you mean {match[0]!r}?)" if match else ""
        raise ValueError(f"teachers.names: {what}{hint}; the teachers: {sorted(TEACHERS)} "
                         "(comma-separated)")
    for name in tc.weights or {}:
        if name not in names:
            raise ValueError(f"teachers.weights names {name!r}, which is not one of "
                             f"teachers.names {names}")
    for name, value in (tc.dtype or {}).items():
        if name not in names:
            raise ValueError(f"teachers.dtype names {name!r}, which is not one of "
                             f"teachers.names {names}")
        if value not in DTYPES:
            raise ValueError(f"teachers.dtype.{name} must be one of {list(DTYPES)}, got "
                             f"{value!r}")
    teachers = build_teachers(names, tc.weights or None, dtypes=tc.dtype or None,
                              device=device, **kwargs)
    online = OnlineTargets(teachers, compile=tc.compile, side_stream=tc.side_stream)
    _check_shapes(model, online.tasks, "teachers")
    return online


def _check_cache_coverage(dataset, cache, where: str, sample: int = 1000,
                          digests: int = 64) -> None:
    """Look up the images of up to ``sample`` entries spread over the dataset in the target
    cache before training: a cache built for other data (or another image folder layout) would
    otherwise mask every embedding loss for a whole run and only show in rejects.jsonl. None
    found: ValueError; some missing: a warning with the estimate. The files of up to
    ``digests`` found ones are hashed against the digests recorded at extraction: a cache of
    another dataset whose files have the same names (``images/train-000001.png``) is found by
    key but stale for every image (ValueError; some stale: a warning). As many targets are
    read: shard files missing or damaged for all of them is a ValueError (some: a warning)."""
    from olavlm.data.images import image_digest, read_image_file
    from olavlm.data.llava import image_key

    index = dataset.index
    step = max(1, len(index) // sample)
    images = found = 0
    hits: list[tuple[int, str]] = []
    for i in range(0, len(index), step):
        entry = index.entry(i)
        if isinstance(entry, dict) and entry.get("image"):
            images += 1
            key = image_key(entry["image"])
            if key in cache:
                found += 1
                hits.append((i, entry["image"]))
    if images == 0:
        return
    if found == 0:
        raise ValueError(
            f"teachers.cache_dir: {where} holds targets for none of the {images} images "
            f"sampled from data.path: was it extracted from another dataset? (`olavlm targets "
            "verify <cache> --data <file>` reports the coverage)")
    if found < images:
        logger.warning("teachers.cache_dir: %d of %d images sampled from data.path (%.1f%%) "
                       "have no cached targets; those samples train without embedding losses "
                       "(teachers.on_missing_target)", images - found, images,
                       100.0 * (images - found) / images)
    # Up to ``digests`` of the found ones: their image files against the recorded digests,
    # and their targets read (an index copied without its shard files, shards gone or
    # replaced, would mask every embedding loss of the run).
    checked, stale, example = 0, 0, ""
    read, damaged, problem = 0, 0, ""
    for i, relative in hits[:: max(1, len(hits) // digests)][:digests]:
        key = image_key(relative)
        _, reason, detail = cache.lookup(key)
        read += 1
        if reason is not None:
            damaged += 1
            problem = problem or detail
        stored = cache.image_digest(key)
        try:
            data = read_image_file(dataset.image_path(i, relative))
        except (FileNotFoundError, OSError):
            continue  # a missing image is the loader's to count (missing_image)
        if stored is None:
            continue  # a cache from before digests were kept
        checked += 1
        if image_digest(data) != stored:
            stale += 1
            example = example or relative
    if checked and stale == checked:
        raise ValueError(
            f"teachers.cache_dir: {where} was extracted from other image files: all {checked} "
            f"images checked differ from the ones its targets were computed on (e.g. "
            f"{example!r}); a cache of another dataset with the same file names? Extract "
            "targets for this data (`olavlm targets extract --data <data.path> ...`)")
    if stale:
        logger.warning("teachers.cache_dir: %d of %d images checked changed since their "
                       "targets were extracted (e.g. %r); those samples train without "
                       "embedding losses (stale_target)", stale, checked, example)
    if read and damaged == read:
        raise ValueError(
            f"teachers.cache_dir: {where}: the targets of all {read} images read are unreadable "
            f"(e.g. {problem}); were the shard files copied along with index.json? `olavlm "
            "targets verify <cache>` checks every shard; a resumed `olavlm targets extract` "
            "redoes missing or truncated ones")
    if damaged:
        logger.warning("teachers.cache_dir: the targets of %d of %d images read are "
                       "unreadable (e.g. %s); those samples train without embedding losses "
                       "(corrupt_target); `olavlm targets verify` lists the damaged shards",
                       damaged, read, problem)


def _check_shapes(model: OlaVLM, shapes: dict, source: str) -> None:
    for task in model.tasks:
        if task not in shapes:
            raise ValueError(f"{source}: no {task!r} target, but model.aux_mode "
                             f"{model.config.aux_mode!r} trains a {task} head; targets: "
                             f"{sorted(shapes)}")
        want = tuple(model.config.heads[task].target_shape)
        if tuple(shapes[task]) != want:
            raise ValueError(f"{source}: the {task} target is {tuple(shapes[task])} per sample "
                             f"but model.heads.{task}.target_shape is {want}")


def build_data(cfg, model: OlaVLM, tokenizer, data_root: Path | None, *, rank: int,
               world_size: int, run_dir: Path, online=None):
    """(dataset, loader) for this rank; the image view follows the vision tower."""
    from olavlm.data import ImageView, LlavaDataset, ResumableLoader

    files, image_folder = _data_files(cfg, data_root)
    tower = model.vision_tower
    # ConvNeXt's open_clip transform centre-crops with torchvision's rounding (images.py).
    view = ImageView(size=tower.image_size, aspect=cfg.data.aspect, mean=tuple(tower.mean),
                     std=tuple(tower.std),
                     crop="round" if getattr(tower, "kind", "") == "convnext" else "floor")
    cache = None
    if cfg.teachers.mode == "cache" and model.tasks:
        from olavlm.teachers import TargetCache

        if not cfg.teachers.cache_dir:
            raise ValueError("teachers.mode=cache needs teachers.cache_dir (written by "
                             "`olavlm targets extract`)")
        cache = TargetCache(Path(cfg.teachers.cache_dir).expanduser(), tasks=model.tasks)
        _check_shapes(model, cache.tasks, "teachers.cache_dir")
    image_teachers = [t for t in online.teachers if t.needs_images] if online else []
    needs_maps = online is not None and any(t.needs_maps for t in online.teachers)
    # teachers.resize=host: the workers compute each image teacher's PIL view (the seed's
    # pixels); a teacher without one (none today) still gets the raw images.
    teacher_views = ({t.name: t.host_view() for t in image_teachers
                      if t.host_view() is not None}
                     if cfg.teachers.resize == "host" else {})
    needs_images = any(t.name not in teacher_views for t in image_teachers)
    num_inserted = model.num_image_tokens + model.config.num_task_tokens * len(model.tasks)
    dataset = LlavaDataset(
        files, tokenizer, image_folder=image_folder, template=cfg.data.template,
        image_view=view, keep_raw_image=needs_images, max_length=cfg.model.max_length,
        num_image_tokens=num_inserted, on_bad_sample=cfg.data.on_bad_sample, targets=cache,
        on_missing_target=cfg.teachers.on_missing_target, keep_maps=needs_maps,
        teacher_views=teacher_views)
    if cache is not None:
        _check_cache_coverage(dataset, cache, cfg.teachers.cache_dir)
    loader = ResumableLoader(
        dataset, batch_size=cfg.data.batch_size, shuffle=cfg.data.shuffle, seed=cfg.train.seed,
        rank=rank, world_size=world_size, num_workers=_worker_count(cfg.data.num_workers),
        group_by_modality_length=cfg.data.group_by_modality_length,
        grad_accum=cfg.optim.grad_accum, rejects_path=run_dir / REJECTS_FILE,
        max_reject_fraction=cfg.data.max_reject_fraction)
    return dataset, loader


def _worker_count(wanted: int) -> int:
    """data.num_workers, at most the CPUs this process may use (said in a warning): more
    decoding processes than CPUs rarely load faster, and a typo (1000000) would fork until
    memory runs out."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # (not on every OS)
        cpus = os.cpu_count() or 1
    if wanted > cpus:
        logger.warning("data.num_workers=%d is more than the %d CPUs this process may use: "
                       "%d loader workers", wanted, cpus, cpus)
        return cpus
    return wanted


def load_initial_weights(model: OlaVLM, path: str) -> list[str]:
    """checkpoint.init_from: start a stage from an earlier one's weights (VPT or IFT from PT,
    or IFT from VPT). Accepts a run folder (its latest complete checkpoint), a training
    checkpoint (``<run>/checkpoints/step_N``), an ``export_hf`` folder (``llm/`` +
    ``olavlm.safetensors``) or a seed checkpoint folder (SPEC 11 keys). Every parameter of the
    LLM, the projector and the task tokens must be there; heads and logit scales may be missing
    (VPT/IFT do not use them). Returns the keys that kept their fresh initialization."""
    from olavlm.models.checkpoint_io import read_safetensors_dir, seed_key_to_ola

    from .checkpoint import MARKER, latest_checkpoint, no_checkpoint_reason, read_model_weights

    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint.init_from: {str(root)!r} is not a directory")
    if (root / "checkpoints").is_dir() and not (root / "olavlm_config.json").is_file():
        latest = latest_checkpoint(root)
        if latest is None:
            raise FileNotFoundError(f"checkpoint.init_from: {no_checkpoint_reason(root)}")
        if not (root / "FINISHED").is_file():
            logger.warning("checkpoint.init_from: %s did not finish; starting from its latest "
                           "checkpoint %s", root, latest.name)
        root = latest
    if (root / MARKER).is_file() or (root / ".metadata").is_file():
        state = read_model_weights(root)
    elif (root / "olavlm_config.json").is_file():
        state = {f"llm.{k}": v for k, v in read_safetensors_dir(root / "llm").items()}
        from safetensors.torch import load_file

        state.update(load_file(str(root / "olavlm.safetensors")))
    elif (root / "config.json").is_file():
        state = {}
        for key, value in read_safetensors_dir(root).items():
            mapped = seed_key_to_ola(key)
            if mapped is not None:  # the seed's logit scales are 0-d, ours (1,) (as checkpoint_io)
                state[mapped] = value.reshape(1) if mapped.endswith("_logit_scale") else value
    else:
        raise FileNotFoundError(f"checkpoint.init_from: {root} is none of a run folder "
                                "(checkpoints/), a training checkpoint (COMPLETE), an export "
                                "folder (olavlm_config.json) or a seed checkpoint (config.json)")
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("vision_tower.")}
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise ValueError(f"checkpoint.init_from: {len(unexpected)} keys the model does not have, "
                         f"e.g. {unexpected[:5]}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(f"checkpoint.init_from: {key!r} has shape {tuple(value.shape)}, the "
                             f"model's is {tuple(own[key].shape)}")
    kept = sorted(k for k in own if k not in state and not k.startswith("vision_tower."))
    required = [k for k in kept if k.startswith(("llm.", "mm_projector", "task_tokens"))
                and "rotary_emb" not in k]
    if required:
        raise ValueError(f"checkpoint.init_from: {root} lacks {len(required)} weights the stage "
                         f"needs, e.g. {required[:5]}")
    model.load_state_dict(state, strict=False)
    return kept
