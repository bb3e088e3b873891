# Pre-training from the offline target cache gives the online teachers' losses.
from __future__ import annotations

import pytest

from olavlm.cli import main as olavlm_main
from olavlm.config import resolve_config
from olavlm.teachers import SyntheticTeacher, extract_targets
from olavlm.train import build as B
from olavlm.train.metrics import read_metrics
from olavlm.train.trainer import Trainer


def _cfg(tmp, *extra):
    return resolve_config("demo", None, [
        f"train.output_dir={tmp / 'runs'}", f"data.synthetic_dir={tmp / 'synth'}",
        "data.synthetic_num=24", "train.max_steps=3", "checkpoint.every_steps=0",
        "checkpoint.at_end=false", "logging.progress=false", "logging.plot=false",
        "data.shuffle=false", *extra])


def test_cached_targets_train_like_online_ones(tmp_path):
    online = Trainer(_cfg(tmp_path, "train.run_name=online"))
    online.train()
    root = B.synthetic_dataset_dir(online.cfg, is_main=True, barrier=lambda: None)
    cache = tmp_path / "cache"
    # Through the command line, with the demo's synthetic-teacher options.
    options = ",".join(f"{k}={v}" for k, v in online.cfg.teachers.synthetic.items())
    assert olavlm_main(["targets", "extract", "--data", str(root / "train.jsonl"), "--teachers",
                        "synthetic", "--synthetic", options, "--out", str(cache),
                        "--workers", "0"]) == 0
    cached = Trainer(_cfg(tmp_path, "train.run_name=cached", "teachers.mode=cache",
                          f"teachers.cache_dir={cache}"))
    assert cached.teachers is None  # nothing runs teachers in the step
    cached.train()
    a, b = read_metrics(online.run_dir), read_metrics(cached.run_dir)
    # bf16 storage of the targets: the first step's losses agree to bf16 rounding.
    for key in ("ntp", "gen", "depth", "seg"):
        assert b[0][key] == pytest.approx(a[0][key], rel=1e-2), key


def test_cache_mode_needs_a_cache_dir(tmp_path):
    with pytest.raises(ValueError, match="cache_dir"):
        Trainer(_cfg(tmp_path, "teachers.mode=cache"))


def test_a_cache_of_other_images_is_refused_and_a_partial_one_reported(tmp_path, caplog):
    """Targets for none of the dataset's images (extracted from other data): a clear error
    before training, not a run whose embedding losses are all masked; some missing: a warning
    with the share."""
    import json

    cfg = _cfg(tmp_path)
    root = B.synthetic_dataset_dir(cfg, is_main=True, barrier=lambda: None)
    lines = (root / "train.jsonl").read_text().splitlines()
    teacher = SyntheticTeacher(**cfg.teachers.synthetic)
    images = [json.loads(line) for line in lines if json.loads(line).get("image")]
    assert len(images) >= 4
    import shutil

    (root / "elsewhere").mkdir(exist_ok=True)  # an image of the data under another name
    shutil.copy(root / images[0]["image"], root / "elsewhere" / "x.png")
    other = [{**images[0], "image": "elsewhere/x.png"}]
    for name, keep in (("other", other), ("half", images[: len(images) // 2])):
        subset = tmp_path / f"{name}.jsonl"
        subset.write_text("".join(json.dumps(e) + "\n" for e in keep))
        extract_targets([subset], tmp_path / name, [teacher], num_workers=0, storage="bf16",
                        image_folder=root)
    with pytest.raises(ValueError, match="holds targets for none of the"):
        Trainer(_cfg(tmp_path, "teachers.mode=cache", f"teachers.cache_dir={tmp_path / 'other'}"))
    with caplog.at_level("WARNING", logger="olavlm.train"):
        Trainer(_cfg(tmp_path, "teachers.mode=cache", "train.run_name=half",
                     f"teachers.cache_dir={tmp_path / 'half'}"))
    assert "have no cached targets" in caplog.text


@pytest.mark.parametrize(("spec", "teachers", "message"), [
    ("grid=4,depth_dim=x", "synthetic", "--synthetic depth_dim must be an int, got 'x'"),
    ("grid4", "synthetic", "--synthetic must look like 'grid=4,depth_dim=32' with keys"),
    ("size=4", "synthetic", "with keys"),
    ("grid=4", "depth", "but --teachers is 'depth'"),
    ("grid=0", "synthetic", "grid must be an int >= 1, got 0"),
])
def test_cli_synthetic_options_are_checked(tmp_path, capsys, spec, teachers, message):
    data = tmp_path / "none.jsonl"
    data.write_text("")
    assert olavlm_main(["targets", "extract", "--data", str(data), "--teachers", teachers,
                        "--synthetic", spec, "--out", str(tmp_path / "c")]) == 2
    assert message in capsys.readouterr().err


def test_a_cache_of_another_dataset_with_the_same_file_names_is_refused(tmp_path, caplog):
    """Targets extracted from another synthetic dataset (same relative names, other images):
    every key is found, every target is stale. A clear error before training, not a run whose
    embedding losses are all masked; a few changed images: a warning."""
    import json

    from olavlm.data.synthetic import write_synthetic_dataset

    cfg = _cfg(tmp_path)
    root = B.synthetic_dataset_dir(cfg, is_main=True, barrier=lambda: None)
    other = tmp_path / "other-data"
    write_synthetic_dataset(other, 24, size=cfg.data.synthetic_size, seed=5)
    teacher = SyntheticTeacher(**cfg.teachers.synthetic)
    extract_targets([other / "train.jsonl"], tmp_path / "other", [teacher], num_workers=0,
                    storage="bf16")
    with pytest.raises(ValueError, match="was extracted from other image files"):
        Trainer(_cfg(tmp_path, "teachers.mode=cache", f"teachers.cache_dir={tmp_path / 'other'}"))

    extract_targets([root / "train.jsonl"], tmp_path / "own", [teacher], num_workers=0,
                    storage="bf16")
    first = next(json.loads(x) for x in (root / "train.jsonl").read_text().splitlines()
                 if json.loads(x).get("image"))
    image = root / first["image"]
    saved = image.read_bytes()
    try:
        image.write_bytes((other / first["image"]).read_bytes())  # one image replaced since
        with caplog.at_level("WARNING", logger="olavlm.train"):
            Trainer(_cfg(tmp_path, "teachers.mode=cache", "train.run_name=own",
                         f"teachers.cache_dir={tmp_path / 'own'}"))
    finally:
        image.write_bytes(saved)
    assert "images checked changed since their targets were extracted" in caplog.text


def test_a_cache_without_its_shard_files_is_refused(tmp_path, caplog):
    """index.json copied without the shards (or the shards deleted): every target is
    unreadable, so the run would train without embedding losses; refused before training.
    One shard gone: a warning naming the corrupt targets."""
    import shutil

    cfg = _cfg(tmp_path)
    root = B.synthetic_dataset_dir(cfg, is_main=True, barrier=lambda: None)
    teacher = SyntheticTeacher(**cfg.teachers.synthetic)
    full = tmp_path / "full"
    extract_targets([root / "train.jsonl"], full, [teacher], num_workers=0, shard_size=4)
    gone, one = tmp_path / "gone", tmp_path / "one"
    shutil.copytree(full, gone)
    shutil.copytree(full, one)
    for shard in gone.glob("shard-*.safetensors"):
        shard.unlink()
    (one / "shard-00000.safetensors").unlink()
    with pytest.raises(ValueError, match=r"the targets of all \d+ images read are unreadable "
                                         r"\(e.g. .*shard file is missing\)"):
        Trainer(_cfg(tmp_path, "teachers.mode=cache", f"teachers.cache_dir={gone}"))
    with caplog.at_level("WARNING", logger="olavlm.train"):
        Trainer(_cfg(tmp_path, "teachers.mode=cache", "train.run_name=one",
                     f"teachers.cache_dir={one}"))
    assert "images read are unreadable" in caplog.text and "corrupt_target" in caplog.text
