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
    with pytest.raises(FileExistsError, match="is not an export folder"):
        export_checkpoint(run, data, overwrite=True)
    assert (data / "notes.txt").read_text() == "keep me"
    inside = export_checkpoint(run, run / "export", fmt="seed")  # inside the run: fine
    assert (inside / "config.json").is_file()
    export_checkpoint(run, inside, fmt="seed", overwrite=True)  # an earlier export: replaced


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
