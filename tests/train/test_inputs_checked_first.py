# A missing input the run reads late (teacher weights, the target cache, image folder...) is
# refused before the tokenizer and the LLM load (minutes for an 8B model, on every rank).
from __future__ import annotations

import pytest

from olavlm.config import resolve_config
from olavlm.teachers.base import TeacherWeightsNotFound
from olavlm.train import build as B
from olavlm.train.trainer import Trainer


def _cfg(tmp_path, *overrides):
    base = [f"train.output_dir={tmp_path / 'runs'}", f"data.synthetic_dir={tmp_path / 'synth'}",
            "data.synthetic_num=16", "data.batch_size=4", "logging.progress=false",
            "logging.plot=false", "train.run_name=r"]
    return resolve_config("demo", None, base + list(overrides))


@pytest.fixture
def nothing_loads(monkeypatch):
    def loaded(*_args, **_kwargs):
        raise AssertionError("the tokenizer or the model loaded before the inputs were checked")

    monkeypatch.setattr(B, "build_tokenizer", loaded)
    monkeypatch.setattr(B, "build_model", loaded)


@pytest.mark.parametrize("overrides,error,match", [
    (["teachers.names=depth,seg,gen", "teachers.weights.seg={missing}"],
     TeacherWeightsNotFound, r"depth teacher weights not found: 'depth-anything/"),
    (["teachers.names=depth", "teachers.weights.depth={missing}"],
     TeacherWeightsNotFound, r"depth teacher weights not found: '.*nope' is not at that path.*"
                             r"teachers.weights.depth=DIR"),
    (["teachers.mode=cache", "teachers.cache_dir={missing}"],
     FileNotFoundError, r"teachers.cache_dir: '.*nope' does not exist: not a finished target "
                        r"cache"),
    (["teachers.mode=cache", "teachers.cache_dir={empty}"],
     FileNotFoundError, r"teachers.cache_dir: '.*empty' holds no index.json"),
    (["checkpoint.init_from={missing}"],
     FileNotFoundError, r"checkpoint.init_from: '.*nope' is not a directory"),
    (["data.path={missing}.jsonl"], FileNotFoundError, r"data.path: '.*nope.jsonl' does not exist"),
])
def test_a_missing_input_is_refused_before_anything_loads(tmp_path, nothing_loads, overrides,
                                                          error, match):
    (tmp_path / "empty").mkdir()
    filled = [o.format(missing=tmp_path / "nope", empty=tmp_path / "empty") for o in overrides]
    with pytest.raises(error, match=match):
        Trainer(_cfg(tmp_path, *filled))
    assert not (tmp_path / "runs" / "r").exists()  # the failed start left no run folder


def test_a_missing_image_folder_is_refused_before_anything_loads(tmp_path, nothing_loads):
    data = tmp_path / "train.jsonl"
    data.write_text('{"id": "a", "image": "a.png", "conversations": []}\n')
    with pytest.raises(FileNotFoundError, match=r"data.image_folder: '.*imgs' is not a directory"):
        Trainer(_cfg(tmp_path, f"data.path={data}", f"data.image_folder={tmp_path / 'imgs'}",
                     f"data.tokenizer={tmp_path}"))


def test_stages_without_embedding_losses_do_not_need_teacher_weights(tmp_path, monkeypatch):
    """vpt/ift read no targets: a teacher path left in the config is not checked."""
    checked = []
    monkeypatch.setattr(B, "build_tokenizer", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("past the checks")))
    import olavlm.teachers.registry as registry

    monkeypatch.setattr(registry, "find_teacher_weights", lambda *a: checked.append(a))
    with pytest.raises(RuntimeError, match="past the checks"):
        Trainer(_cfg(tmp_path, "train.stage=ift", "teachers.names=depth",
                     f"teachers.weights.depth={tmp_path / 'nope'}"))
    assert checked == []
