# `olavlm export`: a trained run's checkpoint -> HF-format and seed-layout folders, loadable.
from __future__ import annotations

import pytest
import torch

from olavlm.config import resolve_config
from olavlm.models.checkpoint_io import load_exported, load_seed_checkpoint
from olavlm.train.export import export_checkpoint
from olavlm.train.trainer import Trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    cfg = resolve_config("demo", None, [
        f"train.output_dir={tmp / 'runs'}", f"data.synthetic_dir={tmp / 'synth'}",
        "data.synthetic_num=24", "train.max_steps=2", "logging.progress=false",
        "logging.plot=false"])
    trainer = Trainer(cfg)
    trainer.train()
    return trainer, tmp


def _assert_same(model, trainer):
    want = trainer.model.state_dict()
    got = model.state_dict()
    for key, value in want.items():
        if key.startswith("vision_tower."):
            continue
        assert torch.equal(got[key], value), key


def _assert_same_tokenizer(folder, trainer):
    """The run's tokenizer travels with the export (its added pad token included)."""
    from transformers import AutoTokenizer

    got = AutoTokenizer.from_pretrained(str(folder))
    want = trainer.tokenizer
    assert len(got) == len(want) and got.pad_token == want.pad_token
    text = "a red cube left of a blue ball"
    assert got(text)["input_ids"] == want(text)["input_ids"]


def test_export_hf_round_trip(trained, monkeypatch):
    trainer, tmp = trained
    from olavlm.train import build

    def gone(*args, **kwargs):  # the data/tokenizer folders may be gone: the run's copy is used
        raise AssertionError("export rebuilt the tokenizer instead of using the run's")

    monkeypatch.setattr(build, "build_tokenizer", gone)
    monkeypatch.setattr(build, "synthetic_dataset_dir", gone)
    out = export_checkpoint(trainer.run_dir, tmp / "hf")
    tower = trainer.model.vision_tower
    _assert_same(load_exported(out, tower=tower), trainer)
    _assert_same_tokenizer(out / "llm", trainer)


def test_export_seed_layout_round_trip(trained):
    trainer, tmp = trained
    ckpt = trainer.checkpointer.latest()
    out = export_checkpoint(ckpt, tmp / "seed", fmt="seed")
    model = load_seed_checkpoint(out, tower=trainer.model.vision_tower,
                                 heads=trainer.model.config.heads)
    _assert_same(model, trainer)
    _assert_same_tokenizer(out, trainer)


def test_export_errors(trained, tmp_path):
    trainer, tmp = trained
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_checkpoint(tmp_path / "nope", tmp_path / "out")
    with pytest.raises(ValueError, match="--format must be hf or seed"):
        export_checkpoint(trainer.run_dir, tmp_path / "out", fmt="onnx")


@pytest.mark.parametrize("fmt", ["hf", "seed"])
def test_init_from_an_export_starts_the_next_stage_from_its_weights(trained, tmp_path, fmt):
    """checkpoint.init_from (VPT from PT): both export layouts, the seed's with its 0-d logit
    scales, load into a fresh run's model before any step."""
    trainer, tmp = trained
    out = export_checkpoint(trainer.checkpointer.latest(), tmp_path / fmt, fmt=fmt)
    cfg = resolve_config("demo", None, [
        f"train.output_dir={tmp_path / 'runs'}", f"data.synthetic_dir={tmp / 'synth'}",
        "data.synthetic_num=24", "train.max_steps=1", "logging.progress=false",
        "logging.plot=false", f"checkpoint.init_from={out}"])
    nxt = Trainer(cfg)
    try:
        _assert_same(nxt.model, trainer)
    finally:
        nxt.close()


@pytest.mark.parametrize("what", ["checkpoint", "run"])
def test_init_from_a_training_checkpoint_or_run_starts_another_stage(trained, tmp_path, what):
    """The stage-change error's advice, checkpoint.init_from=<run>/checkpoints/step_N, works
    (it was refused: only export and seed folders were read), and so does the run folder
    itself (its latest checkpoint), into a stage that trains other parameters."""
    trainer, tmp = trained
    source = trainer.checkpointer.latest() if what == "checkpoint" else trainer.run_dir
    cfg = resolve_config("demo", None, [
        f"train.output_dir={tmp_path / 'runs'}", f"data.synthetic_dir={tmp / 'synth'}",
        "data.synthetic_num=24", "train.max_steps=1", "logging.progress=false",
        "logging.plot=false", "train.stage=vpt", "teachers.mode=none",
        f"checkpoint.init_from={source}"])
    nxt = Trainer(cfg)
    try:
        _assert_same(nxt.model, trainer)
        nxt.train()
    finally:
        nxt.close()


def test_init_from_refuses_a_folder_it_cannot_read(trained, tmp_path):
    from olavlm.train.build import load_initial_weights
    from olavlm.train.checkpoint import CheckpointError

    trainer, _ = trained
    empty_run = tmp_path / "run"
    (empty_run / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint .*no step_N"):
        load_initial_weights(trainer.model, str(empty_run))
    (empty_run / "checkpoints" / "step_000003").mkdir()  # an interrupted write: say so
    with pytest.raises(FileNotFoundError, match="step_000003: the COMPLETE marker is missing"):
        export_checkpoint(empty_run, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="is none of a run folder"):
        load_initial_weights(trainer.model, str(tmp_path))
    broken = tmp_path / "step_000001"
    broken.mkdir()
    (broken / ".metadata").write_bytes(b"")
    with pytest.raises(CheckpointError, match="marker is missing"):
        load_initial_weights(trainer.model, str(broken))


def test_an_export_made_from_a_relative_run_dir_loads_from_anywhere(trained, tmp_path,
                                                                    monkeypatch):
    """`olavlm export runs/demo-...` wrote the demo tower as `runs/demo-.../models/tiny-clip`,
    relative to the directory export ran in: loading from anywhere else failed. Then as an
    absolute path into the run: deleting the run broke the export."""
    import json
    import shutil

    trainer, tmp = trained
    monkeypatch.chdir(tmp)
    relative = trainer.run_dir.relative_to(tmp)
    hf = export_checkpoint(relative, tmp_path / "hf")
    seed = export_checkpoint(relative, tmp_path / "seed", fmt="seed")
    monkeypatch.chdir(tmp_path)
    # The run's generated tower travels with the export (under its own name, which picks its
    # class): moving the export and removing the run's copy of the tower breaks nothing.
    assert json.loads((hf / "olavlm_config.json").read_text())["vision_tower"] == "tiny-clip"
    assert json.loads((seed / "config.json").read_text())["mm_vision_tower"] == "tiny-clip"
    assert (hf / "tiny-clip" / "config.json").is_file()
    moved = tmp_path / "elsewhere"
    shutil.move(str(tmp_path / "hf"), str(moved / "hf"))
    shutil.move(str(tmp_path / "seed"), str(moved / "seed"))
    run_tower = trainer.run_dir / "models" / "tiny-clip"
    run_tower.rename(run_tower.with_name("gone"))
    try:
        _assert_same(load_exported(moved / "hf"), trainer)
        _assert_same(load_seed_checkpoint(moved / "seed", heads=trainer.model.config.heads),
                     trainer)
    finally:
        run_tower.with_name("gone").rename(run_tower)


def test_cli_refuses_a_non_empty_out_naming_the_flag(trained, tmp_path, capsys):
    from olavlm.cli import main

    trainer, _ = trained
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["export", str(trainer.run_dir), "--out", str(tmp_path / "out")]) == 2
    assert "--overwrite" in capsys.readouterr().err  # not the Python keyword
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_export_never_replaces_the_run_or_a_folder_that_is_not_an_export(trained, tmp_path):
    """--overwrite into the run folder, a folder above it or its checkpoints is refused (it
    deleted the whole run), and it replaces only an earlier export, never another folder."""
    trainer, tmp = trained
    run = trainer.run_dir
    before = sorted(p.name for p in run.iterdir())
    for out in (run, run.parent, run / "checkpoints", trainer.checkpointer.latest(),
                run / "tokenizer", run / "models" / "tiny-llama"):
        with pytest.raises(ValueError, match="would replace the run"):
            export_checkpoint(run, out, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == before
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("keep me")
    base = tmp_path / "base-llm"  # any model folder holds a config.json: not an export
    base.mkdir()
    (base / "config.json").write_text("{}")
    for folder in (data, base):
        with pytest.raises(FileExistsError, match="was not written by an olavlm export"):
            export_checkpoint(run, folder, overwrite=True)
    assert (data / "notes.txt").read_text() == "keep me" and (base / "config.json").is_file()
    inside = export_checkpoint(run, run / "export", fmt="seed")  # inside the run: fine
    assert (inside / "config.json").is_file() and (inside / "olavlm_export.json").is_file()
    export_checkpoint(run, inside, fmt="seed", overwrite=True)  # an earlier export: replaced
    with pytest.raises(NotADirectoryError, match="notes.txt' is a file, not a folder"):
        export_checkpoint(run, data / "notes.txt" / "x")


def test_export_never_replaces_the_folders_the_run_builds_from(tmp_path):
    """--overwrite onto the run's own model.llm (an export used as the base, so it would pass
    the export-folder check) is refused: the run could be neither exported nor resumed."""
    first = _train(tmp_path, "first")
    base = export_checkpoint(first.run_dir, tmp_path / "base")
    llm = base / "llm"
    second = _train(tmp_path, "second", f"model.llm={llm}")
    for out in (llm, base):
        with pytest.raises(ValueError, match=r"would replace model.llm of the run"):
            export_checkpoint(second.run_dir, out, overwrite=True)
    assert (llm / "config.json").is_file()


def _train(tmp_path, name, *overrides, steps=2):
    cfg = resolve_config("demo", None, [
        f"train.output_dir={tmp_path / 'runs'}", f"data.synthetic_dir={tmp_path / 'synth'}",
        "data.synthetic_num=24", f"train.max_steps={steps}", "logging.progress=false",
        "logging.plot=false", f"train.run_name={name}", *overrides])
    trainer = Trainer(cfg)
    trainer.train()
    return trainer


def test_a_failed_tokenizer_save_keeps_the_previous_export(trained, tmp_path, monkeypatch):
    """The tokenizer is written inside the export's atomic write: a full disk while saving it
    leaves the previous export as it was (it was replaced by one without a tokenizer)."""
    from transformers import PreTrainedTokenizerBase

    trainer, _ = trained
    out = export_checkpoint(trainer.run_dir, tmp_path / "hf")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*"))

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full_disk)
    with pytest.raises(OSError, match="No space left"):
        export_checkpoint(trainer.run_dir, out, overwrite=True)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.")]


def test_a_convnext_trained_at_another_size_reloads_at_that_size(tmp_path):
    """data.image_size reaches a ConvNeXt tower at build time only: the exports name it the
    seed's way (`-res<N>`), so both formats reload the tower at the size it trained at (they
    came back at the tower's default, 128 px, with 4x the image tokens)."""
    from olavlm.train.checkpoint import read_model_weights

    cfg = resolve_config("demo", None, [
        f"train.output_dir={tmp_path / 'runs'}", f"data.synthetic_dir={tmp_path / 'synth'}",
        "data.synthetic_num=8", "train.max_steps=1", "logging.progress=false",
        "logging.plot=false", "model.vision_tower=tiny:convnext", "model.vision_kind=convnext",
        "data.image_size=64"])
    trainer = Trainer(cfg)
    trainer.train()
    size = trainer.model.vision_tower.image_size
    assert size == 64
    assert trainer.dataset.image_view.crop == "round"  # open_clip's CenterCrop, as the seed's
    hf = load_exported(export_checkpoint(trainer.run_dir, tmp_path / "hf"))
    seed = load_seed_checkpoint(export_checkpoint(trainer.run_dir, tmp_path / "seed",
                                                  fmt="seed"),
                                heads=trainer.model.config.heads)
    for model in (hf, seed):
        assert model.vision_tower.image_size == size
        assert model.num_image_tokens == trainer.model.num_image_tokens
    weights = read_model_weights(trainer.checkpointer.latest())
    for key, value in hf.state_dict().items():
        torch.testing.assert_close(value, weights[key].to(value.dtype), rtol=0, atol=0,
                                   msg=lambda m, k=key: f"{k}: {m}")


def test_a_tiny_llm_ends_generation_where_its_tokenizer_does(trained):
    """The demo's tiny LLM had the architecture's default bos/eos ids (2, or Phi-3's 32000:
    outside its vocabulary), not its tokenizer's: generate stopped on the wrong token or never.
    Its ids are now the tokenizer's bos and eos plus the chat templates' end-of-turn token."""
    trainer, _ = trained
    tok, llm = trainer.tokenizer, trainer.model.llm
    for source in (llm.config, llm.generation_config):
        assert source.bos_token_id == tok.bos_token_id
        ends = source.eos_token_id
        ends = ends if isinstance(ends, list) else [ends]
        assert tok.eos_token_id in ends
        assert tok.convert_tokens_to_ids("<|eot_id|>") in ends  # the demo's llava_llama_3 turns
        assert all(0 <= i < len(tok) for i in ends)


def test_a_checkpoint_exports_with_the_config_it_was_trained_under(tmp_path):
    """A resumed leg changed model.layer_indices (same head count, so the weights load): each
    checkpoint exports with its own leg's layers, recorded in its marker, not the run's
    latest config.yaml. A checkpoint without the record (older versions) exports with the
    latest config and a warning when the run's config changed between legs."""
    import json
    import shutil

    from olavlm.train.checkpoint import MARKER

    first = _train(tmp_path, "legs", "checkpoint.every_steps=2")
    second = _train(tmp_path, "legs", "checkpoint.every_steps=2",
                    "model.layer_indices=d1-3_s2-4_g1-2", steps=4)
    assert first.run_dir == second.run_dir and (second.run_dir / "config.1.yaml").is_file()
    ckpts = second.checkpointer.checkpoints()
    old, new = (next(c for c in ckpts if c.name == f"step_{n:06d}") for n in (2, 4))
    for ckpt, want in ((old, "d2-4_s1-3_g2-3"), (new, "d1-3_s2-4_g1-2")):
        out = export_checkpoint(ckpt, tmp_path / f"hf-{ckpt.name}")
        assert json.loads((out / "olavlm_config.json").read_text())["layer_indices"] == want
        record = json.loads((out / "olavlm_export.json").read_text())
        assert record["source"] == str(ckpt) and record["data.aspect"] == "square"
    legacy = tmp_path / "legacy"
    shutil.copytree(second.run_dir, legacy)
    marker = legacy / "checkpoints" / old.name / MARKER
    info = json.loads(marker.read_text())
    del info["extra"]["config"]
    marker.write_text(json.dumps(info))
    with pytest.warns(UserWarning, match="predates the config record.*config.1.yaml"):
        out = export_checkpoint(legacy / "checkpoints" / old.name, tmp_path / "hf-legacy")
    assert json.loads((out / "olavlm_config.json").read_text())["layer_indices"] == \
        "d1-3_s2-4_g1-2"  # the latest config.yaml: what the warning is about
    # A leg that changed only the environment (another host, new versions) archives its
    # config too: no model setting changed, no warning.
    shutil.copy(legacy / "config.yaml", legacy / "config.1.yaml")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_checkpoint(legacy / "checkpoints" / old.name, tmp_path / "hf-legacy2")


def test_the_seed_config_records_the_image_view_the_run_trained_with(trained, tmp_path):
    import json

    trainer, _ = trained
    out = export_checkpoint(trainer.run_dir, tmp_path / "seed", fmt="seed")
    assert json.loads((out / "config.json").read_text())["image_aspect_ratio"] == "square"
    from olavlm.train.export import _seed_aspect

    assert _seed_aspect("pad") == "pad"
    with pytest.warns(UserWarning, match="stretch has no counterpart"):
        assert _seed_aspect("stretch") == "stretch"


def test_a_disk_error_is_one_line_and_exit_1(trained, tmp_path, monkeypatch, capsys):
    import argparse

    from olavlm.models import checkpoint_io
    from olavlm.train.export import run_export

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_io, "_write_safetensors", full)
    trainer, _ = trained
    args = argparse.Namespace(source=str(trainer.run_dir), out=str(tmp_path / "s"),
                              format="seed", overwrite=False)
    assert run_export(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("olavlm export: [Errno 28] No space left on device")
    assert "was not changed" in err and not (tmp_path / "s").exists()


def test_a_checkpoint_pruned_while_it_loads_gives_way_to_the_new_latest(tmp_path, monkeypatch):
    """Exporting a run that still trains with a small keep_last: the latest checkpoint may be
    deleted while it is read; a run directory then exports the new latest, and a checkpoint
    named explicitly says it was removed."""
    import shutil

    from olavlm.train import export as export_mod
    from olavlm.train.checkpoint import Checkpointer, CheckpointError

    trainer = _train(tmp_path, "live", "checkpoint.every_steps=1")
    ckpts = trainer.checkpointer.checkpoints()
    assert [c.name for c in ckpts][-2:] == ["step_000001", "step_000002"]
    real_load = Checkpointer.load
    pruned = []

    def load(self, path, state):
        if not pruned:  # the training's keep_last removes it mid-read
            pruned.append(path)
            shutil.rmtree(path)
            raise FileNotFoundError(f"{path}/__0_0.distcp")
        return real_load(self, path, state)

    monkeypatch.setattr(Checkpointer, "load", load)
    out, ckpt = export_mod._export(trainer.run_dir, tmp_path / "hf", "hf", False)
    assert pruned == [ckpts[-1]] and ckpt == ckpts[-2] and (out / "llm").is_dir()
    pruned.clear()
    with pytest.raises(CheckpointError, match="was removed while it was read"):
        export_mod._export(ckpts[-2], tmp_path / "hf2", "hf", False)


def test_leftovers_of_a_killed_export_are_removed_by_the_next(trained, tmp_path):
    """A killed export leaves a hidden temporary (or replaced) folder the size of a model
    beside its target; the next successful export into that name removes those of dead
    processes on this host and of older versions, and keeps a running process's."""
    import os

    from olavlm._fs import host_tag

    trainer, _ = trained
    host = host_tag()
    dead = tmp_path / f".hf.tmp-{host}-999999999-abc12345"  # no such pid
    legacy = tmp_path / ".hf.old-1a2b3c4d"
    running = tmp_path / f".hf.tmp-{host}-{os.getpid()}-xyz12345"
    remote = tmp_path / ".hf.tmp-otherhost-999999999-abc12345"  # cannot be checked from here
    other = tmp_path / ".hf2.tmp-legacy12"  # another export's name: not ours to touch
    backup = tmp_path / ".hf.old-backup"  # a user's folder, not our name shape
    for p in (dead, legacy, running, remote, other, backup):
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"x")
    with pytest.warns(UserWarning, match="leftover of an interrupted export"):
        export_checkpoint(trainer.run_dir, tmp_path / "hf")
    assert not dead.exists() and not legacy.exists()
    assert running.exists() and remote.exists() and other.exists() and backup.exists()


def test_export_from_inside_the_checkpoints_folder(trained, tmp_path, monkeypatch):
    """A relative checkpoint path (`cd run/checkpoints; olavlm export step_N`) finds its run."""
    trainer, _ = trained
    ckpt = trainer.checkpointer.latest()
    monkeypatch.chdir(ckpt.parent)
    out = export_checkpoint(ckpt.name, tmp_path / "rel")
    assert (out / "olavlm_export.json").is_file()


def test_a_run_trained_with_flash_attention_exports_on_the_cpu(trained, tmp_path):
    """A run trained with model.attn_implementation=flash_attention_2 (a GPU run records it)
    exports: the export rebuilds the model on the CPU, where flash-attn cannot load (it
    failed in transformers' loading with flash-attn's import/CUDA error). The export records
    the run's choice; a CPU user loads it with attn_implementation="sdpa"."""
    import json
    import shutil

    from olavlm.train.checkpoint import MARKER

    trainer, _ = trained
    run = tmp_path / "flash-run"
    shutil.copytree(trainer.run_dir, run)
    for marker in (run / "checkpoints").glob(f"step_*/{MARKER}"):
        info = json.loads(marker.read_text())
        info["extra"]["config"]["model"]["attn_implementation"] = "flash_attention_2"
        marker.write_text(json.dumps(info))
    out = export_checkpoint(run, tmp_path / "hf")
    assert json.loads((out / "olavlm_config.json").read_text())["attn_implementation"] == \
        "flash_attention_2"
    model = load_exported(out, tower=trainer.model.vision_tower, attn_implementation="sdpa")
    _assert_same(model, trainer)
