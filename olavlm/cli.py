# Command line: `olavlm data synth|check`, `olavlm targets extract|verify`, `olavlm train`.
"""The ``olavlm`` command (also ``python -m olavlm``).

    olavlm data synth --out DIR --num N [--num-val M] [--seed S] [--size 128] [--workers W]
    olavlm data check DATA.jsonl --tokenizer DIR [--template llava_llama_3] [--rejects FILE]
    olavlm targets extract --data DATA.jsonl --teachers depth,seg,gen --out CACHE
                           [--weights depth=DIR,seg=DIR,gen=DIR] [--storage bf16|fp8_e4m3]
                           [--synthetic grid=4,depth_dim=32,...]
    olavlm targets verify CACHE [--data DATA.jsonl [--images]]

    olavlm train [--recipe NAME] [--config FILE] [--resume auto|none|PATH] [key=value ...]
    olavlm export RUN_DIR_OR_CHECKPOINT --out DIR [--format hf|seed]

``targets extract`` also runs under ``torchrun --nproc-per-node N -m olavlm targets extract
...``: the ranks split the shards. ``olavlm train`` runs under ``torchrun --nproc-per-node N
-m olavlm.train ...`` (olavlm/train/cli.py).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time

__all__ = ["build_parser", "main"]


def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="write the built-in synthetic dataset (LLaVA layout)",
                       description="Write procedural shape scenes with QA, exact depth and "
                       "segmentation maps, and a tokenizer, in LLaVA layout.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num", type=int, required=True, help="training samples")
    p.add_argument("--num-val", type=int, default=0, help="validation samples (val.jsonl)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--max-objects", type=int, default=4)
    p.add_argument("--text-only-fraction", type=float, default=0.05)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")


def _add_check(sub) -> None:
    p = sub.add_parser("check", help="load every sample once and report the bad ones",
                       description="Tokenize and decode every sample of a LLaVA json/jsonl "
                       "file as training would, and summarize rejects and truncations.")
    p.add_argument("data", nargs="+", help=".json/.jsonl files")
    p.add_argument("--tokenizer", required=True, help="a local tokenizer folder")
    p.add_argument("--image-folder", default=None)
    p.add_argument("--template", default="llava_llama_3")
    p.add_argument("--max-length", type=int, default=4096)
    p.add_argument("--num-image-tokens", type=int, default=600)
    p.add_argument("--image-size", type=int, default=336)
    p.add_argument("--rejects", default=None,
                   help="write one JSON line per rejected sample (the file is replaced)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))


def _add_extract(sub) -> None:
    p = sub.add_parser("extract", help="run teachers over a dataset into a sharded target cache",
                       description="Compute the teachers' targets for every distinct image of "
                       "LLaVA data files and store them as safetensors shards plus an index "
                       "keyed by image; rerun the same command to resume.")
    p.add_argument("--data", nargs="+", required=True, help=".json/.jsonl files")
    p.add_argument("--teachers", required=True,
                   help="comma-separated: depth, seg, gen, synthetic (or registered names)")
    p.add_argument("--out", required=True, help="cache folder")
    p.add_argument("--weights", default=None,
                   help="teacher=DIR,... local weight folders (default: the hub cache)")
    p.add_argument("--image-folder", default=None)
    p.add_argument("--storage", default="bf16", choices=["bf16", "fp8_e4m3"])
    p.add_argument("--shard-size", type=int, default=256, help="images per shard")
    p.add_argument("--batch-size", type=int, default=32, help="images per teacher forward")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="image decoding processes")
    p.add_argument("--device", default=None, help="default: cuda[:LOCAL_RANK] if present, else cpu")
    p.add_argument("--dtype", default="auto", metavar="auto|bf16|fp16|fp32|TEACHER=DTYPE,...",
                   help="teacher compute dtype, one for all or per teacher such as "
                        "'gen=fp16,depth=bf16' (auto, and teachers not named: the seed's on "
                        "GPU, bf16 but fp16 for gen; fp32 on CPU)")
    p.add_argument("--resize", default="device", choices=["device", "host"],
                   help="resize on the teachers' device, or with PIL in the workers (seed-exact)")
    p.add_argument("--no-seed-compat", action="store_true",
                   help="drop the seed's quirks (BGR depth input, double seg resize)")
    p.add_argument("--synthetic", default=None, metavar="KEY=INT,...",
                   help="options of the synthetic teacher, as the training config's "
                   "teachers.synthetic: grid, depth_dim, seg_dim, gen_dim, seed (the demo "
                   "recipe: grid=4,depth_dim=32,seg_dim=24,gen_dim=64)")
    p.add_argument("--on-bad-sample", default="skip", choices=["skip", "raise"])
    p.add_argument("--rejects", default=None,
                   help="one JSON line per rejected image; when the cache is complete, "
                   "every rejected image of the whole cache once (the file is replaced)")
    p.add_argument("--overwrite", action="store_true", help="replace a cache of another plan")


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", help="check every shard of a target cache",
                       description="Check each shard's SHA-256, header and per-row CRCs, and "
                       "report coverage against LLaVA data files. Exit status 1 if not OK.")
    p.add_argument("cache", help="cache folder")
    p.add_argument("--data", nargs="+", default=None, help=".json/.jsonl files for coverage")
    p.add_argument("--no-rows", action="store_true", help="skip the per-row CRC checks")
    p.add_argument("--images", action="store_true",
                   help="with --data: read each cached image and report those changed since "
                   "extraction (stale targets)")
    p.add_argument("--image-folder", default=None,
                   help="where --images finds the images (default: beside each data file)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="olavlm",  # (the docstring's RST quotes dropped)
                                     description=__doc__.splitlines()[0].replace("``", ""))
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="datasets").add_subparsers(dest="data_command",
                                                                       required=True)
    _add_synth(data)
    _add_check(data)
    targets = commands.add_parser("targets", help="teacher targets").add_subparsers(
        dest="targets_command", required=True)
    _add_extract(targets)
    _add_verify(targets)
    from olavlm.train.cli import add_train_arguments

    add_train_arguments(commands.add_parser(
        "train", help="train (no arguments: the CPU demo recipe)",
        description="Train OLA-VLM from a recipe, a config file and dotted overrides."))
    from olavlm.train.export import add_export_arguments

    add_export_arguments(commands.add_parser(
        "export", help="a training checkpoint -> HF-format safetensors or the seed's layout",
        description="Export a run's checkpoint for inference (hf) or in the seed's layout."))
    return parser


def _synth(args) -> int:
    from olavlm.data.synthetic import write_synthetic_dataset

    start = time.perf_counter()
    meta = write_synthetic_dataset(
        args.out, args.num, num_val=args.num_val, seed=args.seed, size=args.size,
        max_objects=args.max_objects, text_only_fraction=args.text_only_fraction,
        vocab_size=args.vocab_size, workers=args.workers, overwrite=args.overwrite)
    print(f"wrote {meta['num_train']} train + {meta['num_val']} val samples "
          f"({meta['num_text_only']} text-only) and a tokenizer to {args.out} in "
          f"{time.perf_counter() - start:.1f} s")
    return 0


class _DropSummaryRecord(logging.Filter):
    """Drops a library's own summary log line while a command prints that summary to stdout
    (the command's result), so a terminal shows it once. Every other record passes."""

    def __init__(self, template: str):
        super().__init__()
        self.template = template

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != self.template


@contextlib.contextmanager
def _printing_summary(logger_name: str, template: str):
    """While it holds, ``logger_name``'s records logged with ``template`` are dropped."""
    log, drop = logging.getLogger(logger_name), _DropSummaryRecord(template)
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


def _check(args) -> int:
    from olavlm.data import ImageView, LlavaDataset, ResumableLoader
    from olavlm.data.tokenizer import load_local_tokenizer

    tokenizer = load_local_tokenizer(args.tokenizer, "--tokenizer")
    if args.rejects:  # this check's rejects only, not a rerun's appended to an earlier one's
        with open(args.rejects, "w", encoding="utf-8"):
            pass
    dataset = LlavaDataset(args.data, tokenizer, image_folder=args.image_folder,
                           template=args.template, image_view=ImageView(size=args.image_size),
                           keep_raw_image=False, max_length=args.max_length,
                           num_image_tokens=args.num_image_tokens)
    loader = ResumableLoader(dataset, batch_size=32, shuffle=False, num_workers=args.workers,
                             rejects_path=args.rejects, world_size=1, rank=0)
    with _printing_summary("olavlm.data", "data: %s"):
        for _ in loader:
            pass
    print(loader.last_summary)
    rejected = sum(loader.last_stats["counts"].values())
    if rejected:  # where the first ones are, without opening a file
        shown = loader.last_first_rejects
        print(f"first {len(shown)} of {rejected} rejects" + (
            f" (all in {args.rejects}):" if args.rejects else " (--rejects FILE lists all):"))
        for reject in shown:
            print(f"  {reject.message()}")
    return 1 if loader.last_stats["counts"] else 0


def _init_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; a gloo group for the
    barriers (the teachers' work needs no collectives), with a long timeout because ranks
    finish their shards at different times."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(hours=12))
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def _synthetic_options(spec: str | None, teachers: str) -> dict[str, int]:
    """``--synthetic grid=4,depth_dim=32`` -> {"grid": 4, "depth_dim": 32}, checked."""
    if spec is None:
        return {}
    from olavlm.config import KEY_CHOICES

    allowed = KEY_CHOICES["teachers.synthetic"]
    if [n.strip() for n in teachers.split(",") if n.strip()] != ["synthetic"]:
        raise ValueError(f"--synthetic sets the synthetic teacher's options, but --teachers is "
                         f"{teachers!r}; use --teachers synthetic")
    options = {}
    for part in filter(None, (x.strip() for x in spec.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in allowed:
            raise ValueError(f"--synthetic must look like 'grid=4,depth_dim=32' with keys "
                             f"{list(allowed)}, got {part!r}")
        try:
            options[key] = int(value)
        except ValueError:
            raise ValueError(f"--synthetic {key} must be an int, got {value.strip()!r}") from None
    return options


def _dtype_option(value: str):
    """--dtype: (one dtype for all or None, {teacher: dtype spec} or None)."""
    from olavlm.teachers.registry import DTYPES

    whole = {"auto": None, **DTYPES}
    if value in whole:
        return whole[value], None
    if "=" not in value:
        raise ValueError(f"--dtype must be one of {list(whole)} or per teacher such as "
                         f"'gen=fp16,depth=bf16', got {value!r}")
    return None, value


def _extract(args) -> int:
    import torch
    import torch.distributed as dist

    from olavlm.teachers import build_teachers, extract_targets
    from olavlm.train.cli import quiet_third_party

    quiet_third_party()  # (torch's pytree notices on importing torchao, as `olavlm train`)
    rank, world, local_rank = _init_distributed()
    try:
        device = args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        dtype, dtypes = _dtype_option(args.dtype)
        options = _synthetic_options(args.synthetic, args.teachers)
        teachers = build_teachers(args.teachers, args.weights, device=device, dtype=dtype,
                                  dtypes=dtypes, seed_compat=not args.no_seed_compat, **options)
        with _printing_summary("olavlm.teachers", "targets: %s"):
            report = extract_targets(
                args.data, args.out, teachers, image_folder=args.image_folder,
                storage=args.storage, shard_size=args.shard_size, batch_size=args.batch_size,
                num_workers=args.workers, resize=args.resize, overwrite=args.overwrite,
                on_bad_sample=args.on_bad_sample, rejects_path=args.rejects)
        print(report.summary())
        # The index's count: this run's rejects miss those of a resumed run's finished shards
        # and of the other ranks.
        none_cached = (report.num_cached == 0 if report.num_cached is not None
                       else sum(report.rejects.values()) >= report.num_images)
        if report.num_images == 0 or none_cached:
            what = ("the data files hold no images" if report.num_images == 0 else
                    f"every one of the {report.num_images} images was rejected")
            print(f"olavlm targets extract: {what}: the cache holds no targets (check --data "
                  "and --image-folder; rerun with the right ones: shards whose images were "
                  "missing are redone)", file=sys.stderr)
            return 1
        return 0
    except KeyboardInterrupt:  # finished shards are on disk; the one being written is redone
        print(f"olavlm targets extract: interrupted; finished shards are kept in {args.out}: "
              "rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        if world > 1:
            dist.destroy_process_group()


def _verify(args) -> int:
    from olavlm.teachers import verify_cache

    if args.images and not args.data:
        raise ValueError("--images needs --data (the data files whose images to read)")
    report = verify_cache(args.cache, data=args.data, check_rows=not args.no_rows,
                          check_images=args.images, image_folder=args.image_folder)
    print(report.summary())
    return 0 if report.ok else 1


# Library argument names whose command-line option is spelled otherwise.
_FLAG_OF = {"data_path": "--data", "out_dir": "--out", "teacher": "--teachers",
            "rejects_path": "--rejects", "dtypes": "--dtype"}


def _with_flag_names(message: str, args) -> str:
    """"num must be an int >= 1" -> "--num must be ...": the library functions the commands
    call name their Python arguments; the user typed options."""
    name, sep, rest = message.partition(" ")
    if sep and name == "data_path" and getattr(args, "data_command", None) == "check":
        return f"DATA (the data files to check) {rest}"  # a positional there, not --data
    if sep and name.isidentifier():
        flag = _FLAG_OF.get(name) or (f"--{name.replace('_', '-')}" if name in vars(args)
                                      else None)
        if flag is not None:
            return f"{flag} {rest}"
    return message


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if args.command == "train":
        from olavlm.train.cli import take_late_overrides

        take_late_overrides(parser, args, extras)
    elif extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    commands = {("data", "synth"): _synth, ("data", "check"): _check,
                ("targets", "extract"): _extract, ("targets", "verify"): _verify}
    sub = getattr(args, f"{args.command}_command", None)
    if (args.command, sub) in commands:
        try:
            return commands[args.command, sub](args)
        except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as exc:
            # Bad arguments or inputs (each names the argument, what it expects and got):
            # the message, not a traceback. BadSampleError is a ValueError too.
            print(f"olavlm {args.command} {sub}: {_with_flag_names(str(exc), args)}",
                  file=sys.stderr)
            return 2
        except OSError as exc:  # the disk: full, read-only, no permission, an I/O error
            resume = (" (finished shards are kept: rerun the same command to resume)"
                      if (args.command, sub) == ("targets", "extract") else "")
            print(f"olavlm {args.command} {sub}: {exc}{resume}", file=sys.stderr)
            return 1
    if args.command == "train":
        from olavlm.train.cli import run_train

        return run_train(args)
    if args.command == "export":
        from olavlm.train.export import run_export

        return run_export(args)
    raise AssertionError(f"unhandled command {args}")  # argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
