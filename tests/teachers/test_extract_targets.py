# Offline extraction: kill and resume, 2-rank split, rejects, plans, and the CLI end to end.
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from olavlm.cli import main
from olavlm.data.llava import LlavaIndex
from olavlm.teachers import (
    SyntheticTeacher,
    TargetCache,
    build_teachers,
    extract_targets,
    verify_cache,
)
from olavlm.teachers.cache import read_json
from olavlm.teachers.extract import image_items

REPO = Path(__file__).resolve().parents[2]
SHARD_SIZE = 4


def _cache_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _extract(data, out, **kwargs):
    return extract_targets(data, out, [SyntheticTeacher()], shard_size=SHARD_SIZE, batch_size=3,
                           num_workers=0, **kwargs)


KILLER = textwrap.dedent("""
    import os, signal, sys
    from olavlm.teachers import SyntheticTeacher, cache, extract_targets

    def dying_write(f, data):
        # Die (SIGKILL: no cleanup, no finally) half way through writing shard 2.
        if "shard-00002.safetensors" in f.name:
            f.write(data[: len(data) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        f.write(data)

    cache._write_all = dying_write
    extract_targets(sys.argv[1], sys.argv[2], [SyntheticTeacher()], shard_size=4, batch_size=3,
                    num_workers=0)
""")


def test_kill_and_resume_gives_the_uninterrupted_cache(teacher_synth_dir, tmp_path):
    data = teacher_synth_dir / "train.jsonl"
    whole = tmp_path / "whole"
    assert _extract(data, whole).complete
    resumed = tmp_path / "resumed"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(data), str(resumed)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    names = {p.name for p in resumed.iterdir()}
    # Shards 0 and 1 finished; shard 2 exists only as a half-written temporary file.
    assert {"shard-00000.safetensors", "shard-00001.json"} <= names
    assert "shard-00002.safetensors" not in names and "index.json" not in names
    assert any(n.startswith(".shard-00002.safetensors.tmp-") for n in names)
    assert not verify_cache(resumed).ok
    before = {n: (resumed / n).stat().st_mtime_ns for n in ("shard-00000.safetensors",
                                                             "shard-00001.safetensors")}
    report = _extract(data, resumed)
    assert report.complete and report.shards_skipped == [0, 1]
    assert report.shards_written == list(range(2, report.num_shards))
    assert {n: (resumed / n).stat().st_mtime_ns for n in before} == before  # not redone
    assert _cache_files(resumed) == _cache_files(whole)  # byte for byte, no temporary left
    assert verify_cache(resumed, data=data).ok
    again = _extract(data, resumed)  # nothing left to do
    assert again.shards_written == [] and _cache_files(resumed) == _cache_files(whole)


def test_a_cache_begun_before_resize_was_recorded_resumes(teacher_synth_dir, tmp_path):
    import hashlib

    data = teacher_synth_dir / "train.jsonl"
    out = tmp_path / "old"
    full = _extract(data, out)
    # Rewrite it as an older version left it: no "resize" in plan.json, shards marked with that
    # plan's digest; then lose the last shard and the index (an interrupted run).
    plan = read_json(out / "plan.json")
    del plan["resize"]
    (out / "plan.json").write_text(json.dumps(plan, indent=1))
    digest = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()
    for side in out.glob("shard-*.json"):
        info = read_json(side)
        side.write_text(json.dumps({**info, "plan": digest}))
    last = full.num_shards - 1
    for name in (f"shard-{last:05d}.json", f"shard-{last:05d}.safetensors", "index.json"):
        (out / name).unlink()
    report = _extract(data, out)  # the default resize ("device"), as the old version used
    assert report.complete and report.shards_written == [last]
    assert report.shards_skipped == list(range(last))
    with pytest.raises(ValueError, match="overwrite"):  # another resize still needs overwrite
        _extract(data, out, resize="host")


def _rank_worker(rank, init_file, data, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        report = _extract(data, out)
        assert report.complete and report.world_size == 2
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # spawned gloo workers sometimes abort in interpreter teardown


@pytest.mark.distributed
def test_two_ranks_cover_every_image_once(teacher_synth_dir, tmp_path):
    data = teacher_synth_dir / "train.jsonl"
    out = tmp_path / "two"
    with tempfile.NamedTemporaryFile(dir=tmp_path) as init:
        mp.start_processes(_rank_worker, args=(init.name + ".rdzv", str(data), str(out)),
                           nprocs=2, join=True, start_method="fork")
    index = read_json(out / "index.json")
    keys = [k for shard in index["shards"] for k in shard["keys"]]
    wanted = [k for k, _ in image_items(LlavaIndex(data))]
    assert sorted(keys) == sorted(wanted) and len(keys) == len(set(keys))
    assert [s["rank"] for s in index["shards"]] == [k % 2 for k in range(len(index["shards"]))]
    # The shards do not depend on how many ranks wrote them.
    single = tmp_path / "one"
    _extract(data, single)
    shards = lambda d: {n: b for n, b in _cache_files(d).items() if n.endswith(".safetensors")}
    assert shards(out) == shards(single)
    assert verify_cache(out, data=data).ok


def test_bad_images_are_counted_and_listed(teacher_synth_dir, tmp_path):
    lines = (teacher_synth_dir / "train.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    images = [e for e in entries if "image" in e]
    images[1]["image"] = "images/gone.png"
    images[2]["depth"] = "depth/gone.png"
    images.append(dict(images[0]))  # the same image twice: extracted once
    data = tmp_path / "data.jsonl"
    # Entries refused when indexing (no image to extract) are reported and listed too.
    refused = ["{not json", json.dumps({"id": "noconv", "image": "x.png"})]
    data.write_text("".join(json.dumps(e) + "\n" for e in images) + "\n".join(refused) + "\n")
    report = extract_targets(data, tmp_path / "c", [SyntheticTeacher()], shard_size=SHARD_SIZE,
                             num_workers=0, image_folder=teacher_synth_dir,
                             rejects_path=tmp_path / "rejects.jsonl")
    # Only maps are needed by the synthetic teacher: a missing image file does not matter,
    # a missing depth map does.
    assert report.rejects == {"bad_maps": 1} and report.num_images == len(images) - 1
    assert report.entries_refused == {"malformed_json": 1, "no_conversations": 1}
    assert ("data entries refused when indexing (no image to extract): malformed_json=1, "
            "no_conversations=1") in report.summary()
    listed = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in listed[:2]] == ["malformed_json", "no_conversations"]
    assert listed[0]["location"] == f"{data}:{len(images) + 1}"
    rejects = listed[2:]
    assert [r["sample_id"] for r in rejects] == [images[2]["image"]]
    index = read_json(tmp_path / "c" / "index.json")
    assert index["num_cached"] == report.num_images - 1 and len(index["rejects"]) == 1
    coverage = verify_cache(tmp_path / "c", data=data).coverage
    assert coverage["missing"] == 1 and coverage["rejected"] == {"bad_maps": 1}
    assert coverage["missing_not_rejected"] == 0
    # Run again from scratch: the rejects file lists each rejected image once, not per run.
    extract_targets(data, tmp_path / "c", [SyntheticTeacher()], shard_size=SHARD_SIZE,
                    num_workers=0, image_folder=teacher_synth_dir, overwrite=True,
                    rejects_path=tmp_path / "rejects.jsonl")
    again = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()][2:]
    assert [r["sample_id"] for r in again] == [images[2]["image"]]
    assert again[0]["reason"] == "bad_maps" and again[0]["epoch"] is None


def test_plan_mismatch_needs_overwrite(teacher_synth_dir, tmp_path):
    data = teacher_synth_dir / "train.jsonl"
    _extract(data, tmp_path / "c")
    with pytest.raises(ValueError, match="overwrite"):
        extract_targets(data, tmp_path / "c", [SyntheticTeacher(grid=8)], num_workers=0)
    report = extract_targets(data, tmp_path / "c", [SyntheticTeacher(grid=8)], num_workers=0,
                             overwrite=True)
    assert report.complete and TargetCache(tmp_path / "c").tasks["seg"] == (1536, 8, 8)
    # The resize mode changes the teachers' input pixels: a resume must not mix the two
    # (the cache above was made with the default, resize="device").
    with pytest.raises(ValueError, match="overwrite"):
        extract_targets(data, tmp_path / "c", [SyntheticTeacher(grid=8)], num_workers=0,
                        resize="host")
    for bad, match in (({"storage": "fp16"}, "storage must be one of"),
                       ({"shard_size": 0}, "shard_size must be an int >= 1"),
                       ({"resize": "gpu"}, "resize must be")):
        with pytest.raises(ValueError, match=match):
            extract_targets(data, tmp_path / "d", [SyntheticTeacher()], **bad)


def test_resume_refuses_other_weights(tiny_weights, teacher_synth_dir, tmp_path):
    from teacherhelpers import DEPTH_TINY, depth_model

    from olavlm.teachers import DepthTeacher

    torch.manual_seed(1)
    other = tmp_path / "other-depth"
    depth_model(DEPTH_TINY).save_pretrained(other)
    first, again = DepthTeacher.load(tiny_weights["depth"]), DepthTeacher.load(
        tiny_weights["depth"])
    assert first.fingerprint() == again.fingerprint()
    assert DepthTeacher.load(other).fingerprint() != first.fingerprint()
    lines = (teacher_synth_dir / "train.jsonl").read_text().splitlines()[:3]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n")
    kwargs = dict(num_workers=0, image_folder=teacher_synth_dir)
    extract_targets(data, tmp_path / "c", [first], **kwargs)
    with pytest.raises(ValueError, match="plan.json differs"):
        extract_targets(data, tmp_path / "c", [DepthTeacher.load(other)], **kwargs)
    with pytest.raises(ValueError, match="plan.json differs"):
        extract_targets(data, tmp_path / "c", [DepthTeacher.load(tiny_weights["depth"],
                                                                 dtype=torch.bfloat16)], **kwargs)


def test_cli_extract_and_verify_real_teachers(tiny_weights, teacher_synth_dir, tmp_path, capsys):
    data = str(teacher_synth_dir / "train.jsonl")
    weights = ",".join(f"{k}={v}" for k, v in tiny_weights.items())
    out = tmp_path / "cache"
    common = ["targets", "extract", "--data", data, "--teachers", "depth,seg,gen", "--weights",
              weights, "--shard-size", "8", "--batch-size", "5", "--workers", "1"]
    assert main([*common, "--out", str(out), "--storage", "fp8_e4m3"]) == 0
    printed = capsys.readouterr().out
    assert "fp8 depth: relative RMS error" in printed and "skipped 0 finished" in printed
    assert main(["targets", "verify", str(out), "--data", data, "--images"]) == 0
    verified = capsys.readouterr().out
    assert "OK" in verified and "0 changed since extraction" in verified
    assert ", 0 without a recorded digest" in verified  # decoded images have their digests
    cache = TargetCache(out, dtype=torch.float32)
    key = next(iter(read_json(out / "index.json")["shards"][0]["keys"]))
    teachers = build_teachers("depth,seg,gen", weights)
    from olavlm.data.images import load_image, pil_to_uint8

    image = pil_to_uint8(load_image(teacher_synth_dir / key))
    for teacher in teachers:
        direct = teacher([image])[teacher.name][0]
        got = cache.read(key)[teacher.name]
        assert (got - direct).abs().max() <= 0.07 * direct.abs().max(), teacher.name
    # Resize in the workers with PIL (the seed's pixels): close to the device path.
    host = tmp_path / "host"
    # (with the gen teacher in bf16 by --dtype, the others in their CPU default: the plan says)
    assert main([*common, "--out", str(host), "--resize", "host", "--dtype", "gen=bf16"]) == 0
    capsys.readouterr()
    recorded = {name: t["dtype"] for name, t in read_json(host / "plan.json")["teachers"].items()}
    assert recorded == {"depth": "float32", "seg": "float32", "gen": "bfloat16"}
    near = TargetCache(host, dtype=torch.float32).read(key)["depth"]
    assert (near - cache.read(key)["depth"]).abs().mean() < 0.1 * near.abs().mean()
    shard = out / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
    assert main(["targets", "verify", str(out)]) == 1
    assert "NOT OK" in capsys.readouterr().out


@pytest.mark.distributed
def test_torchrun_cli(teacher_synth_dir, tmp_path):
    """The documented launch: torchrun with 2 CPU processes (gloo), ranks split the shards."""
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "-m", "olavlm", "targets", "extract", "--data", str(teacher_synth_dir / "train.jsonl"),
           "--teachers", "synthetic", "--out", str(out), "--shard-size", "4", "--workers", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1/2" in proc.stdout and verify_cache(out).ok
    shutil.rmtree(out)


def test_one_image_key_naming_two_files_is_refused(tmp_path):
    """Two `data synth` folders name their images alike: one cache keyed by the relative path
    cannot hold both, so extraction and verify stop and name the key and both files (before,
    only the first folder's images were cached and verify said OK)."""
    from olavlm.data.synthetic import write_synthetic_dataset

    a, b = tmp_path / "A", tmp_path / "B"
    write_synthetic_dataset(a, 3, size=32, seed=1, text_only_fraction=0.0)
    write_synthetic_dataset(b, 3, size=32, seed=2, text_only_fraction=0.0)
    data = [a / "train.jsonl", b / "train.jsonl"]
    key = json.loads((a / "train.jsonl").read_text().splitlines()[0])["image"]
    with pytest.raises(ValueError, match="names two different files") as err:
        _extract(data, tmp_path / "c")
    assert key in str(err.value) and str(a / key) in str(err.value)
    assert str(b / key) in str(err.value)
    _extract(data[:1], tmp_path / "c")
    with pytest.raises(ValueError, match="names two different files"):
        verify_cache(tmp_path / "c", data=data)
    # The same relative paths resolving to the same files are one image each.
    c = tmp_path / "C"
    c.mkdir()
    (c / "train.jsonl").write_bytes((a / "train.jsonl").read_bytes())
    for sub in ("images", "depth", "seg"):
        if (a / sub).exists():
            (c / sub).symlink_to(a / sub)
    report = _extract([a / "train.jsonl", c / "train.jsonl"], tmp_path / "ac")
    assert report.num_images == 3 and report.num_cached == 3


def test_cli_extract_fails_on_resume_when_every_image_was_rejected(teacher_synth_dir,
                                                                  tmp_path, capsys):
    """The exit status comes from the index's count of cached images: a resumed run (nothing
    left to do, no rejects of its own) and a rank that rejected only its share say so too."""
    data = str(teacher_synth_dir / "train.jsonl")
    out = tmp_path / "t"
    argv = ["targets", "extract", "--data", data, "--teachers", "synthetic", "--out", str(out),
            "--image-folder", str(tmp_path / "nowhere"), "--workers", "0", "--shard-size", "4"]
    assert main(argv) == 1
    capsys.readouterr()
    assert main(argv) == 1  # the same command again: a resume
    assert "the cache holds no targets" in capsys.readouterr().err
    # Two ranks without a process group: the last to finish writes the index and knows.
    two = tmp_path / "two"
    first = _extract(data, two, rank=0, world_size=2, image_folder=tmp_path / "nowhere")
    last = _extract(data, two, rank=1, world_size=2, image_folder=tmp_path / "nowhere")
    assert not first.complete and first.num_cached is None
    assert last.complete and last.num_cached == 0
    assert sum(last.rejects.values()) < last.num_images  # its own rejects do not tell


def test_decompression_bomb_is_a_corrupt_image(tiny_weights, tmp_path, monkeypatch):
    """PIL refuses an image over 2 x MAX_IMAGE_PIXELS (DecompressionBombError, not an OSError):
    extraction rejects it as corrupt_image, like training does, instead of crashing."""
    import numpy as np
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "images/ok.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "images/big.png")
    conv = [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "ok"}]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": n, "image": f"images/{n}.png",
                                        "conversations": conv}) + "\n" for n in ("ok", "big")))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 2 - 1)  # 64x64 is now a bomb
    report = extract_targets(data, tmp_path / "c", build_teachers(
        "gen", f"gen={tiny_weights['gen']}"), num_workers=0, shard_size=4,
        rejects_path=tmp_path / "rejects.jsonl")
    assert report.complete and report.num_cached == 1 and report.rejects == {"corrupt_image": 1}
    reject = json.loads((tmp_path / "rejects.jsonl").read_text())
    assert reject["sample_id"] == "images/big.png"
    assert "DecompressionBombError" in reject["detail"]


def test_rejected_images_readable_now_are_extracted_on_resume(teacher_synth_dir, tmp_path,
                                                              capsys):
    """A wrong --image-folder rejects every image; rerun with the right one, the finished
    (all-rejected) shards are redone and the cache equals a direct extraction. A map restored
    after extraction is picked up too; the summary counts the whole cache's rejects."""
    data = str(teacher_synth_dir / "train.jsonl")
    out = tmp_path / "t"
    argv = ["targets", "extract", "--data", data, "--teachers", "synthetic", "--out", str(out),
            "--workers", "0", "--shard-size", "4"]
    assert main([*argv, "--image-folder", str(tmp_path / "nowhere")]) == 1
    assert "rerun with the right ones" in capsys.readouterr().err
    assert main([*argv, "--image-folder", str(teacher_synth_dir)]) == 0
    direct = tmp_path / "direct"
    assert main([*argv[:-5], str(direct), "--workers", "0", "--shard-size", "4",
                 "--image-folder", str(teacher_synth_dir)]) == 0
    a, b = TargetCache(out), TargetCache(direct)
    keys = [k for s in read_json(direct / "index.json")["shards"] for k in s["keys"]]
    assert len(a) == len(b) == len(keys) > 0
    for key in keys:
        for task, value in b.read(key).items():
            assert torch.equal(a.read(key)[task], value), (key, task)
    # A depth map missing at extraction, restored afterwards.
    data_dir = tmp_path / "data"
    shutil.copytree(teacher_synth_dir, data_dir)
    entry = next(json.loads(x) for x in (data_dir / "train.jsonl").read_text().splitlines()
                 if "image" in x)
    depth = data_dir / entry["depth"]
    saved = depth.read_bytes()
    depth.unlink()
    report = _extract(data_dir / "train.jsonl", tmp_path / "m")
    assert report.rejects == {"bad_maps": 1}
    depth.write_bytes(saved)
    again = _extract(data_dir / "train.jsonl", tmp_path / "m")
    assert len(again.shards_written) == 1 and again.rejects == {}
    assert again.cache_rejects == {} and TargetCache(tmp_path / "m").read(entry["image"])
    third = _extract(data_dir / "train.jsonl", tmp_path / "m")  # nothing left to redo
    assert third.shards_written == []
    depth.unlink()
    fresh = _extract(data_dir / "train.jsonl", tmp_path / "n")
    resumed = _extract(data_dir / "train.jsonl", tmp_path / "n")
    assert resumed.rejects == {} and resumed.cache_rejects == {"bad_maps": 1}
    assert "images rejected in the whole cache: bad_maps=1" in resumed.summary()
    assert fresh.cache_rejects == fresh.rejects


def test_a_resume_over_other_images_under_the_same_paths_is_refused(teacher_synth_dir,
                                                                    tmp_path):
    """A cache begun on one dataset, resumed on another laid out alike (same image paths,
    other pixels): the finished shards' images no longer hash to their recorded digests."""
    from olavlm.data.synthetic import write_synthetic_dataset

    first = tmp_path / "first"
    write_synthetic_dataset(first, 12, size=32, seed=1, text_only_fraction=0.0)
    second = tmp_path / "second"
    write_synthetic_dataset(second, 12, size=32, seed=2, text_only_fraction=0.0)
    out = tmp_path / "c"
    teacher = build_teachers("synthetic", None)[0]
    extract_targets(first / "train.jsonl", out, [teacher], shard_size=SHARD_SIZE,
                    num_workers=0, rank=0, world_size=2)  # half the shards: "interrupted"
    with pytest.raises(ValueError, match=r"changed since their targets were extracted .*"
                                         r"mix two datasets"):
        extract_targets(second / "train.jsonl", out, [teacher], shard_size=SHARD_SIZE,
                        num_workers=0)
    report = extract_targets(first / "train.jsonl", out, [teacher], shard_size=SHARD_SIZE,
                             num_workers=0)  # the same data: resumes
    assert report.complete


def test_a_plan_mismatch_names_what_changed(teacher_synth_dir, tmp_path):
    data = teacher_synth_dir / "train.jsonl"
    _extract(data, tmp_path / "c")
    with pytest.raises(ValueError, match=r"plan.json differs: storage: 'bf16' -> 'fp8_e4m3'"):
        _extract(data, tmp_path / "c", storage="fp8_e4m3")


_HOLD_LOCK = textwrap.dedent("""
    import fcntl, os, sys
    handle = open(sys.argv[1], "a+")
    for byte in map(int, sys.argv[2:]):
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, byte, os.SEEK_SET)
    print("locked", flush=True)
    sys.stdin.read()
""")


def _hold_lock(out: Path, *bytes_):
    """Another process holding bytes of out/.extract.lock as a running extraction does
    (POSIX record locks never conflict within one process)."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out / ".extract.lock"),
                             *map(str, bytes_)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_extraction_into_the_same_folder_stops_at_once(teacher_synth_dir, tmp_path):
    """While an extraction runs, another one into the same --out stops before touching
    anything (it deleted the first one's temporary files and killed it): a second rank 0
    (the folder), or a rank of another world size reaching a shard the first one writes.
    Afterwards the same command resumes, and killed writers' plan/index temporaries (dead
    processes of this host) are removed."""
    data = teacher_synth_dir / "train.jsonl"
    out = tmp_path / "c"
    holder = _hold_lock(out, 0)  # a running job's rank 0
    try:
        with pytest.raises(ValueError, match="in use by another extraction .*the folder"):
            _extract(data, out)
        assert not (out / "plan.json").exists()
    finally:
        holder.communicate("")
    _extract(data, out, rank=0, world_size=2)  # half the shards done
    tmp = out / ".shard-00001.safetensors.tmp-12345"  # another job's shard 1 in progress
    tmp.write_bytes(b"partial")
    holder = _hold_lock(out, 1 + 1)  # its rank 1 of 2 holds shard 1
    try:
        with pytest.raises(ValueError, match="in use by another extraction .*shard 1"):
            _extract(data, out)  # one process: shard 1 is in its work list
        assert tmp.read_bytes() == b"partial"  # not deleted under the other job
    finally:
        holder.communicate("")
    from olavlm._fs import host_tag

    dead = out / f".index.json.tmp-{host_tag()}-999999999"  # a killed writer's
    running = out / f".plan.json.tmp-{host_tag()}-{os.getppid()}"  # a running one's: kept
    elsewhere = out / ".plan.json.tmp-otherhost-999999999"  # another host's: not ours to judge
    for path in (dead, running, elsewhere):
        path.write_text("{")
    assert _extract(data, out).complete and not tmp.exists()
    assert not dead.exists() and running.exists() and elsewhere.exists()


def test_an_image_path_that_is_a_folder_is_not_retried_forever(tiny_weights, teacher_synth_dir,
                                                                tmp_path):
    """A rejected image whose path exists but is no file (a folder) is still unreadable: a
    rerun over the finished cache redoes nothing (it redid that shard every time)."""
    data_dir = tmp_path / "data"
    shutil.copytree(teacher_synth_dir, data_dir)
    entry = next(json.loads(x) for x in (data_dir / "train.jsonl").read_text().splitlines()
                 if "image" in x)
    image = data_dir / entry["image"]
    image.unlink()
    image.mkdir()
    teachers = build_teachers("depth", {"depth": str(tiny_weights["depth"])})
    kwargs = dict(shard_size=SHARD_SIZE, batch_size=3, num_workers=0)
    first = extract_targets(data_dir / "train.jsonl", tmp_path / "c", teachers, **kwargs)
    assert first.rejects == {"missing_image": 1}
    again = extract_targets(data_dir / "train.jsonl", tmp_path / "c", teachers, **kwargs)
    assert again.shards_written == [] and again.cache_rejects == {"missing_image": 1}
