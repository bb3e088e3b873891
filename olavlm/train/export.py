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
    if (path / "checkpoints").is_dir() or (path / "config.yaml").exists():
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise FileNotFoundError(no_checkpoint_reason(path))
        return path, ckpt
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(f"{path} is neither a run directory nor a valid checkpoint: {problem}")
    return path.parent.parent, path


def _check_out(out: Path, run_dir: Path) -> None:
    """The export never replaces the run it comes from: not the run folder, nor a folder
    holding it, nor anything inside the folders the run reads back (its checkpoints, its
    tokenizer, its generated models); another folder inside the run is fine."""
    target, run = out.expanduser().resolve(), run_dir.resolve()
    if run.is_relative_to(target) or any(target.is_relative_to(run / name)
                                         for name in ("checkpoints", "tokenizer", "models")):
        raise ValueError(f"--out {str(out)!r} would replace the run {run_dir} (or its "
                         "checkpoints, tokenizer or models): choose a folder outside them")


def export_checkpoint(source: str | Path, out: str | Path, *, fmt: str = "hf",
                      overwrite: bool = False) -> Path:
    from dataclasses import replace

    from olavlm.config import resolve_config
    from olavlm.models.checkpoint_io import export_hf, export_seed_layout

    from . import build as B
    from .checkpoint import Checkpointer

    if fmt not in ("hf", "seed"):
        raise ValueError(f"--format must be hf or seed, got {fmt!r}")
    run_dir, ckpt = _locate(Path(source))
    _check_out(Path(out), run_dir)
    config_file = next((run_dir / n for n in ("config.yaml", "config.json")
                        if (run_dir / n).is_file()), None)
    if config_file is None:
        raise FileNotFoundError(f"{run_dir} holds no config.yaml/config.json (not a run dir)")
    cfg = resolve_config(None, str(config_file), ["train.device=cpu", "parallel.fsdp=off"])
    cfg = replace(cfg, parallel=replace(cfg.parallel, mixed_precision="fp32"))
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
    Checkpointer(run_dir).load(ckpt, {"model": model})
    # A tower the run generated (tiny:<arch>, under the run directory) travels with the export:
    # deleting or moving the run must not break the exported model.
    tower = Path(model.config.vision_tower or "")
    bundle = tower.is_dir() and tower.resolve().is_relative_to(run_dir.resolve())
    if fmt == "hf":
        return export_hf(model, out, overwrite=overwrite, bundle_vision_tower=bundle,
                         tokenizer=tokenizer)
    return export_seed_layout(model, out, overwrite=overwrite, bundle_vision_tower=bundle,
                              tokenizer=tokenizer)


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
        _, ckpt = _locate(Path(args.source))
        out = export_checkpoint(args.source, args.out, fmt=args.format,
                                overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, CheckpointError) as exc:
        print(f"olavlm export: {exc}", file=sys.stderr)
        return 2
    print(f"exported {ckpt} ({args.format}, with the run's tokenizer) to {out}")
    return 0
