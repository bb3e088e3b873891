# Data loader throughput (samples/s) with N workers: synthetic scenes and 640x480 JPEG folders.
"""Data loader benchmark: can the input pipeline keep up with a GPU step?

    python benchmarks/bench_data.py --workers 0,2,4 --num-samples 512 --batch-size 32

For each dataset and worker count it times one epoch of ``olavlm.data.ResumableLoader``
(tokenize with the template, decode each image once, the encoder view at the tower size with
CLIP normalization, the raw image kept for the teachers, collate) after a warm-up of a few
batches, so worker start-up is not counted. Datasets:

- ``synthetic``: the built-in dataset (``olavlm data synth``, 128 px PNGs, short QA turns);
- ``jpeg``: a LLaVA-style folder of ``--jpeg-size`` (default 640x480) JPEGs with photo-like
  texture (smooth colour fields plus noise), captions of ~40 words, generated on the fly.

"ms" is the median time per batch; the note carries samples/s, the number of CPUs and the
slowest GPU step the loader keeps up with. A training step of ``t`` ms at this batch size
needs ``batch_size / t * 1000`` samples/s. Rows go to benchmarks/results/data_loader.csv
(``--no-record`` skips that).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

from olavlm.data import ImageView, LlavaDataset, ResumableLoader  # noqa: E402
from olavlm.data.synthetic import write_synthetic_dataset  # noqa: E402

OP = "data_loader"
DATASETS = ("synthetic", "jpeg")
_WORDS = ("a photo of a red car parked near a small white house with green trees and a blue "
          "sky above two people walk along the street while a dog sits on the grass").split()


def make_jpeg_folder(out: Path, num: int, width: int, height: int, seed: int = 0) -> Path:
    """``out/data.jsonl`` plus ``out/images/*.jpg``: photo-sized JPEGs with LLaVA captions."""
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    with (out / "data.jsonl").open("w") as f:
        for i in range(num):
            # Smooth colour fields plus pixel noise: JPEG sizes and decode cost like photos.
            coarse = rng.integers(0, 256, (height // 40 + 1, width // 40 + 1, 3), dtype=np.uint8)
            field = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
            base = np.asarray(field)
            noisy = base.astype(np.int16) + rng.normal(0, 10, base.shape).astype(np.int16)
            path = f"images/{i:06d}.jpg"
            Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(out / path,
                                                                          quality=90)
            caption = " ".join(rng.choice(_WORDS, size=40))
            entry = {"id": f"jpeg-{i}", "image": path, "conversations": [
                {"from": "human", "value": "<image>\nDescribe the image in detail."},
                {"from": "gpt", "value": caption}]}
            f.write(json.dumps(entry) + "\n")
    return out / "data.jsonl"


def prepare(root: Path, num: int, jpeg_size: tuple[int, int]) -> dict[str, Path]:
    synth = root / "synthetic"
    if not (synth / "train.jsonl").exists():
        write_synthetic_dataset(synth, num, workers=min(4, os.cpu_count() or 1))
    jpeg = root / f"jpeg_{jpeg_size[0]}x{jpeg_size[1]}"
    if not (jpeg / "data.jsonl").exists():
        make_jpeg_folder(jpeg, num, *jpeg_size)
    return {"synthetic": synth / "train.jsonl", "jpeg": jpeg / "data.jsonl",
            "tokenizer": synth / "tokenizer"}


def measure(dataset: LlavaDataset, *, batch_size: int, num_workers: int, warmup: int):
    """(Timing of ms per batch, samples/s) over one epoch after ``warmup`` batches."""
    loader = ResumableLoader(dataset, batch_size=batch_size, shuffle=True, seed=0,
                             num_workers=num_workers, world_size=1, rank=0)
    times, samples, start = [], 0, None
    last = time.perf_counter()
    for k, batch in enumerate(loader):
        now = time.perf_counter()
        if k >= warmup:
            start = last if start is None else start  # when the first timed batch was asked
            times.append((now - last) * 1e3)
            samples += len(batch)
        last = now
    if not times:
        raise ValueError(f"--num-samples must give more than {warmup} warm-up batches")
    vals = sorted(times)
    timing = common.Timing(float(np.median(vals)), float(np.percentile(vals, 20)),
                           float(np.percentile(vals, 80)), len(vals))
    return timing, samples / (last - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--workers", default="0,2,4", help="comma-separated worker counts")
    parser.add_argument("--num-samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=336, help="encoder view side")
    parser.add_argument("--jpeg-size", default="640x480", help="WIDTHxHEIGHT of the JPEGs")
    parser.add_argument("--warmup", type=int, default=2, help="batches not timed")
    parser.add_argument("--dir", default=None, help="keep the generated data here")
    parser.add_argument("--no-record", action="store_true", help="do not append to the CSV")
    args = parser.parse_args(argv)
    datasets = [d for d in args.datasets.split(",") if d]
    if set(datasets) - set(DATASETS):
        parser.error(f"--datasets: choose from {DATASETS}, got {datasets}")
    workers = [int(w) for w in args.workers.split(",") if w]
    jpeg_size = tuple(int(x) for x in args.jpeg_size.lower().split("x"))
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        paths = prepare(Path(args.dir or tmp), args.num_samples, jpeg_size)
        tokenizer = AutoTokenizer.from_pretrained(str(paths["tokenizer"]))
        records, rows = [], []
        for name in datasets:
            ds = LlavaDataset(paths[name], tokenizer, image_view=ImageView(size=args.image_size))
            for n in workers:
                timing, sps = measure(ds, batch_size=args.batch_size, num_workers=n,
                                      warmup=args.warmup)
                step_ms = args.batch_size / sps * 1e3
                note = (f"{sps:.1f} samples/s; {os.cpu_count()} cpus; keeps up with steps "
                        f">= {step_ms:.1f} ms")
                records.append(common.make_record(
                    op=OP, provider=f"workers{n}", mode=name,
                    shape=f"B{args.batch_size}xS{args.image_size}", dtype="float32",
                    timing=timing, note=note))
                rows.append(f"{name:10s} {n:7d} {sps:12.1f} {timing.median_ms:10.1f} "
                            f"{step_ms:14.1f}")
    if not args.no_record:
        common.append_records(records, cpu_rows=True)  # a CPU measurement by design
    print(f"{'dataset':10s} {'workers':>7s} {'samples/s':>12s} {'ms/batch':>10s} "
          f"{'min step ms':>14s}")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
