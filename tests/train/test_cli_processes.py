# The launcher as users run it: torchrun with 2 processes, and SIGTERM to a real process.
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _args(tmp, *extra):
    return [f"train.output_dir={tmp / 'runs'}", f"data.synthetic_dir={tmp / 'synth'}",
            "data.synthetic_num=24", "logging.progress=false", "logging.plot=false",
            "train.run_name=job", *extra]


def _steps(tmp) -> list[int]:
    path = tmp / "runs" / "job" / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "-m", "olavlm.train", *_args(tmp_path, "train.max_steps=2", "data.batch_size=2",
                                        "parallel.fsdp=on")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _steps(tmp_path) == [1, 2]
    assert (tmp_path / "runs" / "job" / "FINISHED").exists()
    assert "fsdp" in proc.stderr and "2 ranks" in proc.stderr


@pytest.mark.slow
def test_sigterm_to_a_running_job_then_rerun_resumes(tmp_path):
    cmd = [sys.executable, "-m", "olavlm.train",
           *_args(tmp_path, "train.max_steps=400", "checkpoint.every_steps=0")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env())
    deadline = time.time() + 300
    while len(_steps(tmp_path)) < 3:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "the job did not start stepping"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    stopped_at = _steps(tmp_path)[-1]
    assert f"stopped by SIGTERM at step {stopped_at}" in out
    ckpts = sorted((tmp_path / "runs" / "job" / "checkpoints").glob("step_*"))
    assert ckpts and int(ckpts[-1].name.split("_")[1]) == stopped_at
    # The same command again continues from there to the end (fewer steps for speed).
    again = subprocess.run([sys.executable, "-m", "olavlm.train", *_args(
        tmp_path, f"train.max_steps={stopped_at + 3}", "checkpoint.every_steps=0")],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=_env())
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr
    # The console carries the run's own log, not third-party noise (pytree notices that
    # importing torchao triggers, transformers' progress bars for the tiny models' save/load).
    for noise in ("_pytree", "Writing model shards", "Loading weights"):
        assert noise not in err + again.stderr, noise
    assert _steps(tmp_path)[-3:] == [stopped_at + 1, stopped_at + 2, stopped_at + 3]


@pytest.mark.distributed
@pytest.mark.slow
def test_one_rank_failing_alone_gives_one_line_per_rank(tmp_path):
    """A corrupt image under data.on_bad_sample=raise stops the rank that loads it; the other,
    waiting in a collective, says so in one line instead of a gloo traceback."""
    from olavlm.data.synthetic import write_synthetic_dataset

    data = tmp_path / "d"
    write_synthetic_dataset(data, 8, size=32, text_only_fraction=0.0)
    first = json.loads((data / "train.jsonl").read_text().splitlines()[1])
    (data / first["image"]).write_bytes(b"not an image")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "-m", "olavlm.train", *_args(tmp_path, f"data.path={data / 'train.jsonl'}",
                                        f"data.tokenizer={data / 'tokenizer'}",
                                        "data.on_bad_sample=raise", "data.shuffle=false",
                                        "data.batch_size=2", "train.max_steps=2")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=_env())
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("olavlm train:")]
    assert len(ours) == 2, proc.stderr[-3000:]
    assert any("corrupt_image" in line and first["image"] in line for line in ours)
    assert any("another rank stopped" in line for line in ours)
    assert "[rank0]:   File" not in proc.stderr and "[rank1]:   File" not in proc.stderr
