# `olavlm export`: a training checkpoint -> HF-format safetensors (inference) or the seed's layout.
"""``olavlm export RUN_DIR_OR_CHECKPOINT --out DIR [--format hf|seed] [--overwrite]``

Rebuilds the run's model from its saved ``config.yaml`` (the same build as training, on the
CPU, one process), loads the model weights of the checkpoint (the latest complete one of a run
directory), and writes them with ``olavlm.models.checkpoint_io``: ``hf`` = ``export_hf``
(``llm/`` for ``from_pretrained`` + ``olavlm.safetensors``), ``seed`` = ``export_seed_layout``
(the released OLA-VLM checkpoints' keys and config.json). Sharded (FSDP2) checkpoints load too.
The tokenizer the run trained with (``RUN_DIR/tokenizer``, its added pad token included) goes
along, where ``from_pretrained`` looks for it: ``llm/`` for ``hf``, the folder itself for
``seed``; the data and tokenizer folders of the config need not exist any more.
"""
from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_export_arguments", "export_checkpoint", "run_export"]


def _locate(path: Path) -> tuple[Path, Path]:
    """(run directory, checkpoint directory) from either."""
    from .checkpoint import checkpoint_problem, latest_checkpoint, no_checkpoint_reason

    path = path.expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    path = path.resolve()  # a relative checkpoint path (`step_000002`) has a run two levels up
    if (path / "checkpoints").is_dir() or (path / "config.yaml").exists():
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise FileNotFoundError(no_checkpoint_reason(path))
        return path, ckpt
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(f"{path} is neither a run directory nor a valid checkpoint: {problem}")
    return path.parent.parent, path


def _check_out(out: Path, run_dir: Path, cfg) -> None:
    """The export never replaces the run it comes from: not the run folder, nor a folder
    holding it, nor anything inside the folders the run reads back (its checkpoints, its
    tokenizer, its generated models), nor the local folders its config builds from (the LLM,
    the vision tower, init_from: a base model folder would be lost); another folder inside
    the run is fine."""
    target, run = out.expanduser().resolve(), run_dir.resolve()
    if run.is_relative_to(target) or any(target.is_relative_to(run / name)
                                         for name in ("checkpoints", "tokenizer", "models")):
        raise ValueError(f"--out {str(out)!r} would replace the run {run_dir} (or its "
                         "checkpoints, tokenizer or models): choose a folder outside them")
    sources = (("model.llm", cfg.model.llm), ("model.vision_tower", cfg.model.vision_tower),
               ("checkpoint.init_from", cfg.checkpoint.init_from))
    for key, value in sources:
        if not value or str(value).startswith("tiny:"):
            continue
        source = Path(str(value)).expanduser()
        if source.exists() and (source.resolve() == target
                                or source.resolve().is_relative_to(target)):
            raise ValueError(f"--out {str(out)!r} would replace {key} of the run ({value}), "
                             "which it builds from: choose another folder")


def _run_config_file(run_dir: Path) -> Path:
    found = next((run_dir / n for n in ("config.yaml", "config.json")
                  if (run_dir / n).is_file()), None)
    if found is None:
        raise FileNotFoundError(f"{run_dir} holds no config.yaml/config.json (not a run dir)")
    return found


def _checkpoint_config(run_dir: Path, ckpt: Path):
    """The config the checkpoint's weights were trained under: the one its marker records
    (a resumed leg may have changed layer_indices, the tower or the sequence layout without
    changing a weight's shape), else, for a checkpoint from before that record, the run's
    latest config.yaml, with a warning when the run's config changed between legs."""
    import warnings

    from olavlm.config import resolve_config

    from .checkpoint import checkpoint_extra

    settings = ["train.device=cpu", "parallel.fsdp=off", "parallel.mixed_precision=fp32"]
    recorded = checkpoint_extra(ckpt).get("config")
    if isinstance(recorded, dict):
        return resolve_config(None, ckpt, settings, config_data=recorded)
    config_file = _run_config_file(run_dir)
    changed = _model_changes_between_legs(run_dir, config_file)
    if changed:
        warnings.warn(f"{ckpt} predates the config record in checkpoints, and the run's model "
                      f"settings changed between its legs ({'; '.join(changed[:5])}): exported "
                      f"with the latest {config_file.name}; if this checkpoint was written "
                      f"before that change, the export describes its weights wrongly",
                      stacklevel=3)
    return resolve_config(None, str(config_file), settings)


# What the export records about the weights beyond their shapes.
_MODEL_KEYS = ("model.", "data.aspect", "data.template", "data.image_size")


def _model_changes_between_legs(run_dir: Path, config_file: Path) -> list[str]:
    """``"model.layer_indices: ... -> ..."`` between each archived leg's config
    (``config.<n>.yaml``, kept when a resume changed the config or the environment) and the
    latest, for the keys that describe the model (an environment-only change is none)."""
    from olavlm.config import load_config_file
    from olavlm.run_record import config_changes

    try:
        latest = load_config_file(config_file)
    except (OSError, ValueError):
        return []
    out: list[str] = []
    for earlier in sorted(run_dir.glob(f"{config_file.stem}.*{config_file.suffix}")):
        try:
            old = load_config_file(earlier)
        except (OSError, ValueError):
            continue
        out += [f"{earlier.name}: {c}" for c in config_changes(old, latest)
                if c.startswith(_MODEL_KEYS) and f"{earlier.name}: {c}" not in out]
    return out


def _seed_aspect(aspect: str) -> str:
    """The seed's ``image_aspect_ratio`` for the run's ``data.aspect``: "pad" pads to a square
    (expand2square), anything else runs the image processor as is (short side, centre crop:
    our "square"). "stretch" has no seed counterpart: recorded as is, with a warning."""
    import warnings

    if aspect == "stretch":
        warnings.warn("data.aspect=stretch has no counterpart in the seed's image_aspect_ratio "
                      "(the seed's code crops for any value but 'pad'): config.json records "
                      "'stretch'; evaluate with our ImageView(aspect='stretch')", stacklevel=3)
    return aspect


def export_checkpoint(source: str | Path, out: str | Path, *, fmt: str = "hf",
                      overwrite: bool = False) -> Path:
    """Export ``source`` (a run directory: its latest complete checkpoint; or a checkpoint)
    into ``out``; returns ``out``. See the module docstring."""
    return _export(Path(source), Path(out), fmt, overwrite)[0]


def _export(source: Path, out: Path, fmt: str, overwrite: bool) -> tuple[Path, Path]:
    """(out, the checkpoint exported). A run directory's latest checkpoint may be pruned by
    the still-running training (keep_last) while it loads: then the new latest is taken."""
    from .checkpoint import CheckpointError

    if fmt not in ("hf", "seed"):
        raise ValueError(f"--format must be hf or seed, got {fmt!r}")
    run_dir, ckpt = _locate(source)
    follow_latest = ckpt != source.expanduser().resolve()
    for attempt in range(3):
        try:
            return _export_one(run_dir, ckpt, out, fmt, overwrite), ckpt
        except (CheckpointError, FileNotFoundError, OSError, RuntimeError) as exc:
            if ckpt.exists():
                raise
            if not follow_latest or attempt == 2:
                raise CheckpointError(f"{ckpt} was removed while it was read (the run's "
                                      "training pruned it: checkpoint.keep_last); export a "
                                      "checkpoint the run keeps, or rerun") from exc
            _, ckpt = _locate(run_dir)
    raise AssertionError("unreachable")


def _export_one(run_dir: Path, ckpt: Path, out: Path, fmt: str, overwrite: bool) -> Path:
    from olavlm.models.checkpoint_io import export_hf, export_seed_layout

    from . import build as B
    from .checkpoint import Checkpointer
    from .parallel import FLASH_MODULES

    cfg = _checkpoint_config(run_dir, ckpt)
    _check_out(out, run_dir, cfg)
    # The rebuild runs on the CPU, where flash-attn's kernels cannot load (transformers
    # refuses them), and the attention kernel is no part of the weights: built with sdpa,
    # the export still records the run's choice.
    attention = cfg.model.attn_implementation
    if attention in FLASH_MODULES:
        cfg.model.attn_implementation = "sdpa"
    saved = run_dir / "tokenizer"  # the one the run trained with (the trainer saves it)
    if (saved / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(saved), local_files_only=True)
    else:  # a run from before the trainer saved it: rebuild it from the config
        data_root = None
        if not cfg.data.path:
            data_root = B.synthetic_dataset_dir(cfg, is_main=True, barrier=lambda: None)
        tokenizer = B.build_tokenizer(cfg, data_root)
    model = B.build_model(cfg, tokenizer, run_dir, is_main=True, barrier=lambda: None)
    model.config.attn_implementation = attention
    Checkpointer(run_dir).load(ckpt, {"model": model})
    # A tower the run generated (tiny:<arch>, under the run directory) travels with the export:
    # deleting or moving the run must not break the exported model.
    tower = Path(model.config.vision_tower or "")
    bundle = tower.is_dir() and tower.resolve().is_relative_to(run_dir.resolve())
    record = {"source": str(ckpt), "data.aspect": cfg.data.aspect,
              "data.template": cfg.data.template}
    if fmt == "hf":
        return export_hf(model, out, overwrite=overwrite, bundle_vision_tower=bundle,
                         tokenizer=tokenizer, record=record)
    return export_seed_layout(model, out, overwrite=overwrite, bundle_vision_tower=bundle,
                              tokenizer=tokenizer, record=record,
                              image_aspect_ratio=_seed_aspect(cfg.data.aspect))


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a run directory (its latest checkpoint) or a checkpoint")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", default="hf", choices=["hf", "seed"])
    p.add_argument("--overwrite", action="store_true")


def run_export(args) -> int:
    import sys

    from .checkpoint import CheckpointError
    from .cli import quiet_third_party

    quiet_third_party()  # no torch deprecation notice, no progress bar per save/load
    try:
        out, ckpt = _export(Path(args.source), Path(args.out), args.format, args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
            CheckpointError) as exc:
        print(f"olavlm export: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # reading the run, or writing: no space, no permission...
        print(f"olavlm export: {exc} (--out {args.out} was not changed)", file=sys.stderr)
        return 1
    print(f"exported {ckpt} ({args.format}, with the run's tokenizer) to {out}")
    return 0
