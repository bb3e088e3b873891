# Teacher throughput: the seed's per-image path vs batched on-device teachers vs cache reads.
"""Teacher benchmark: images/s of each way to get a step's targets (SPEC 3, 9 items 1-3).

    python benchmarks/bench_teachers.py                       # GPU: real shapes, random weights
    python benchmarks/bench_teachers.py --preset tiny         # CPU smoke run

Providers, per teacher (depth: DINOv2-L at 336 px; seg: Swin-L at 800 px; gen: ViT-H/14 at 224
px; random weights at the real sizes, ``--preset full``):

- ``per_image``: the seed's path. For each image: PIL resize (and the seg processor's second
  resize) on the host, float32 normalization on the host (the depth one in BGR), a float32
  host-to-device copy, and a batch-1 forward.
- ``batched``: ``Teacher(list of uint8 images)``: the uint8 pixels go to the device, resize and
  normalization run there, one forward for the whole batch.
- ``cache``: ``TargetCache.get_batch(B random keys)`` from a cache the batched teachers wrote
  (``extract_targets``; its images/s is reported as ``extract``). Files are in the page cache
  (warm): what a training step sees after the first epoch or on a machine whose RAM holds
  the cache; a cold read is bounded by the disk instead.

"ms" is the host wall time per batch of ``--batch-size`` images (synchronized), the note
carries images/s, the speedup over ``per_image`` and, for ``cache``, GB/s read next to the
GB/s a training step of ``--step-ms`` consumes at this batch size. Goal (issue 7) on an H100:
batched >= 10x per_image; cache reads well above what a step consumes. Peak CUDA memory of
the batched forward goes in ``peak_mib``. Rows go to benchmarks/results/teachers.csv.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

from olavlm.data.images import CLIP_MEAN, CLIP_STD  # noqa: E402
from olavlm.teachers import (  # noqa: E402
    DepthTeacher,
    GenTeacher,
    SegTeacher,
    TargetCache,
    extract_targets,
)
from olavlm.teachers.base import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

OP = "teachers"
TEACHER_NAMES = ("depth", "seg", "gen")
PROVIDERS = ("per_image", "batched", "cache")
# Real sizes (SPEC 3): Depth-Anything-V2-L's DINOv2-L, OneFormer's Swin-L, unCLIP's ViT-H/14.
CONFIGS = {
    "full": {
        "depth": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                      intermediate_size=4096, image_size=518, patch_size=14,
                      layerscale_value=1.0, out_indices=[5, 12, 18, 24], apply_layernorm=True,
                      reshape_hidden_states=False),
        "seg": dict(image_size=384, embed_dim=192, depths=[2, 2, 18, 2],
                    num_heads=[6, 12, 24, 48], window_size=12,
                    out_features=["stage1", "stage2", "stage3", "stage4"]),
        "gen": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                    num_attention_heads=16, image_size=224, patch_size=14, projection_dim=1024,
                    hidden_act="gelu"),
    },
    "tiny": {
        "depth": dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                      intermediate_size=64, image_size=56, patch_size=14,
                      out_indices=[1, 2, 3, 4], apply_layernorm=True,
                      reshape_hidden_states=False),
        "seg": dict(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1],
                    num_heads=[1, 1, 2, 2], window_size=4,
                    out_features=["stage1", "stage2", "stage3", "stage4"]),
        "gen": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, image_size=224, patch_size=14, projection_dim=24),
    },
}


def build(name: str, preset: str, device, dtype):
    """A teacher of the real architecture with random weights (nothing is downloaded)."""
    torch.manual_seed(0)
    return build_from_config(name, CONFIGS[preset][name], device=device, dtype=dtype)


def build_from_config(name: str, config: dict, *, device, dtype, on_device: bool = False,
                      **teacher_kwargs):
    """The ``name`` teacher ("depth" | "seg" | "gen") around a random-weight backbone of
    ``config`` (transformers' Dinov2 / Swin / CLIP vision configs). ``on_device``: create the
    backbone's weights on ``device`` in ``dtype`` directly (no host copy of a full-size model:
    the step benchmark builds three on the GPU)."""
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        Dinov2Backbone,
        Dinov2Config,
        SwinBackbone,
        SwinConfig,
    )

    kinds = {"depth": (DepthTeacher, Dinov2Backbone, Dinov2Config),
             "seg": (SegTeacher, SwinBackbone, SwinConfig),
             "gen": (GenTeacher, CLIPVisionModelWithProjection, CLIPVisionConfig)}
    teacher_cls, model_cls, config_cls = kinds[name]
    if on_device:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                backbone = model_cls(config_cls(**config))
        finally:
            torch.set_default_dtype(previous)
    else:
        backbone = model_cls(config_cls(**config))
    return teacher_cls(backbone, device=device, dtype=dtype, **teacher_kwargs)


def photos(num: int, width: int, height: int, seed: int = 0) -> list[torch.Tensor]:
    """Photo-like (3, H, W) uint8 images: smooth colour fields plus pixel noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        coarse = rng.integers(0, 256, (height // 40 + 2, width // 40 + 2, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((width, height),
                                                          Image.Resampling.BICUBIC))
        noisy = field.astype(np.int16) + rng.normal(0, 10, field.shape).astype(np.int16)
        pixels = np.clip(noisy, 0, 255).astype(np.uint8)
        out.append(torch.from_numpy(pixels).permute(2, 0, 1).contiguous())
    return out


def seed_input(teacher, pil: Image.Image) -> torch.Tensor:
    """The seed's host preprocessing of one image: (1, 3, S, S) float32 on the host."""
    pixels = teacher.host_view()(pil).float()
    if teacher.name == "seg":  # the OneFormer processor's second (bilinear) resize
        size = teacher.input_size
        resized = Image.fromarray(pixels.permute(1, 2, 0).byte().numpy()).resize(
            (size, size), Image.Resampling.BILINEAR)
        pixels = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float()
    mean, std = (CLIP_MEAN, CLIP_STD) if teacher.name == "gen" else (IMAGENET_MEAN, IMAGENET_STD)
    if teacher.name == "depth":
        pixels = pixels.flip(0)  # the seed's BGR
    mean_t, std_t = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    return ((pixels / 255.0 - mean_t) / std_t).unsqueeze(0)


def timed(fn, *, warmup: int, rep: int, device) -> common.Timing:
    """Host wall time of ``fn()`` with a device sync after each call (what a caller waits)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    vals = sorted(times)
    return common.Timing(float(np.median(vals)), float(np.percentile(vals, 20)),
                         float(np.percentile(vals, 80)), len(vals))


def write_dataset(root: Path, images: list[torch.Tensor]) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    with (root / "data.jsonl").open("w") as f:
        for i, image in enumerate(images):
            path = f"images/{i:06d}.png"
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / path, compress_level=1)
            f.write(json.dumps({"id": str(i), "image": path, "conversations": [
                {"from": "human", "value": "<image>\nDescribe."},
                {"from": "gpt", "value": "ok"}]}) + "\n")
    return root / "data.jsonl"


def bench_teacher(teacher, images, args, device) -> dict:
    """{provider: (Timing, peak bytes or None)} for the per-image and batched paths."""
    def per_image():
        with torch.inference_mode():
            for image in images:
                pil = Image.fromarray(image.permute(1, 2, 0).numpy())
                x = seed_input(teacher, pil).to(device)  # float32 copy, as the seed did
                teacher.encode(x.to(teacher.dtype))

    def batched():
        teacher(images)

    out = {}
    for name, fn in (("per_image", per_image), ("batched", batched)):
        if name not in args.providers:
            continue
        timing = timed(fn, warmup=args.warmup, rep=args.rep, device=device)
        peak = common.peak_memory_delta(fn, device=device) if name == "batched" else None
        out[name] = (timing, peak)
    return out


def bench_cache(teachers, images, args, device, folder: Path):
    """(extract Timing, read Timing, bytes per read, bytes per sample)."""
    data = write_dataset(folder / "data", images)
    start = time.perf_counter()
    extract_targets(data, folder / "cache", teachers, shard_size=args.shard_size,
                    batch_size=args.batch_size, num_workers=args.workers, overwrite=True,
                    storage=args.storage)
    seconds = time.perf_counter() - start
    extract = common.Timing(seconds * 1e3 * args.batch_size / len(images), 0.0, 0.0, 1)
    cache = TargetCache(folder / "cache")
    keys = [f"images/{i:06d}.png" for i in range(len(images))]
    rng = random.Random(0)
    read = timed(lambda: cache.get_batch(rng.sample(keys, args.batch_size)),
                 warmup=args.warmup, rep=max(args.rep, 5), device="cpu")
    return extract, read, cache.sample_bytes() * args.batch_size, cache.sample_bytes()


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["full", "tiny"], default=None,
                        help="model sizes: full (real, default on GPU) or tiny (CPU smoke)")
    parser.add_argument("--teachers", default=",".join(TEACHER_NAMES))
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per teacher forward (default 32, tiny: 4)")
    parser.add_argument("--num-images", type=int, default=None,
                        help="images in the cache (default 4 batches)")
    parser.add_argument("--image-size", default=None, help="WIDTHxHEIGHT (default 640x480, "
                        "tiny: 160x120)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                        help="default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--storage", choices=["bf16", "fp8_e4m3"], default="bf16")
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="decode workers for extract")
    parser.add_argument("--step-ms", type=float, default=300.0,
                        help="training step time the cache must keep up with")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rep", type=int, default=3)
    parser.add_argument("--dir", default=None, help="keep the generated data and cache here")
    parser.add_argument("--no-record", action="store_true", help="do not append to the CSV")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.preset = args.preset or ("full" if cuda else "tiny")
    args.batch_size = args.batch_size or (32 if args.preset == "full" else 4)
    args.teachers = [t for t in args.teachers.split(",") if t]
    args.providers = [p for p in args.providers.split(",") if p]
    if set(args.teachers) - set(TEACHER_NAMES) or set(args.providers) - set(PROVIDERS):
        parser.error(f"--teachers from {TEACHER_NAMES}, --providers from {PROVIDERS}")
    size = args.image_size or ("640x480" if args.preset == "full" else "160x120")
    args.width, args.height = (int(x) for x in size.lower().split("x"))
    args.num_images = args.num_images or 4 * args.batch_size
    if args.num_images < args.batch_size:
        parser.error("--num-images must be >= --batch-size")
    args.device = "cuda" if cuda else "cpu"
    args.torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.dtype]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    images = photos(args.num_images, args.width, args.height)
    batch = images[:args.batch_size]
    shape = f"B{args.batch_size}x{args.width}x{args.height}"
    rows, teachers = [], []

    def keep(record) -> None:  # appended at once: a run cut by its time limit keeps it
        if not args.no_record:
            common.append_records([record])

    for name in args.teachers:
        teacher = build(name, args.preset, args.device, args.torch_dtype)
        dtype = str(teacher.dtype).removeprefix("torch.")
        results = bench_teacher(teacher, batch, args, args.device)
        base = results.get("per_image", (None,))[0]
        for provider, (timing, peak) in results.items():
            rate = args.batch_size / timing.median_ms * 1e3
            speedup = (f"; {base.median_ms / timing.median_ms:.1f}x per_image"
                       if base and provider != "per_image" else "")
            keep(common.make_record(
                op=OP, provider=provider, mode=name, shape=shape, dtype=dtype, timing=timing,
                peak_bytes=peak, note=f"{rate:.1f} images/s{speedup}; preset {args.preset}"))
            rows.append(f"{name:6s} {provider:10s} {rate:12.1f} {timing.median_ms:10.1f}"
                        f"{speedup}")
        teachers.append(teacher)
    if "cache" in args.providers:
        with tempfile.TemporaryDirectory() as tmp:
            extract, read, nbytes, per = bench_cache(teachers, images, args, args.device,
                                                     Path(args.dir or tmp))
        need = per * args.batch_size / (args.step_ms * 1e-3) / 1e9
        got = nbytes / (read.median_ms * 1e-3) / 1e9
        for provider, timing, extra in (
                ("extract", extract, f"{args.storage}, {args.workers} decode workers"),
                ("cache", read, f"{got:.2f} GB/s read; a {args.step_ms:.0f} ms step needs "
                 f"{need:.3f} GB/s ({per / 2**20:.2f} MiB/image)")):
            rate = args.batch_size / timing.median_ms * 1e3
            keep(common.make_record(
                op=OP, provider=provider, mode="+".join(args.teachers), shape=shape,
                dtype=args.storage, timing=timing,
                num_bytes=nbytes if provider == "cache" else None,
                note=f"{rate:.1f} images/s; {extra}; preset {args.preset}"))
            rows.append(f"{'all':6s} {provider:10s} {rate:12.1f} {timing.median_ms:10.1f}; "
                        f"{extra}")
    print(f"{'task':6s} {'provider':10s} {'images/s':>12s} {'ms/batch':>10s}")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
