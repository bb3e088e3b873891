# Command line: `olavlm data synth` (built-in dataset) and `olavlm data check` (validate data).
"""The ``olavlm`` command (also ``python -m olavlm``).

    olavlm data synth --out DIR --num N [--num-val M] [--seed S] [--size 128] [--workers W]
    olavlm data check DATA.jsonl --tokenizer DIR [--template llava_llama_3] [--rejects FILE]

Training, target extraction and probing join here as their issues land.
"""
from __future__ import annotations

import argparse
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
    p.add_argument("--rejects", default=None, help="write one JSON line per rejected sample")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="olavlm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="datasets").add_subparsers(dest="data_command",
                                                                       required=True)
    _add_synth(data)
    _add_check(data)
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


def _check(args) -> int:
    from transformers import AutoTokenizer

    from olavlm.data import ImageView, LlavaDataset, ResumableLoader

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    dataset = LlavaDataset(args.data, tokenizer, image_folder=args.image_folder,
                           template=args.template, image_view=ImageView(size=args.image_size),
                           keep_raw_image=False, max_length=args.max_length,
                           num_image_tokens=args.num_image_tokens)
    loader = ResumableLoader(dataset, batch_size=32, shuffle=False, num_workers=args.workers,
                             rejects_path=args.rejects, world_size=1, rank=0)
    for _ in loader:
        pass
    print(loader.last_summary)
    return 1 if loader.last_stats["counts"] else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "data" and args.data_command == "synth":
        return _synth(args)
    if args.command == "data" and args.data_command == "check":
        return _check(args)
    raise AssertionError(f"unhandled command {args}")  # argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
