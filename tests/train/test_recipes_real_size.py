# The real-size recipes (Llama-3-8B / Phi-3-mini x CLIP ViT-L/336 / ConvNeXt-XXL x PT, VPT, IFT)
# built on the meta device from the published config.json values: shapes, parameter counts,
# stage splits and optimizer groups against numbers computed here from SPEC 1, 2.2 and 5.1.
# Nothing is allocated (meta tensors) and nothing is downloaded.
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from olavlm.config import resolve_config
from olavlm.recipes import get_recipe
from olavlm.recipes.llava import LLMS, STAGES, VISION_TOWERS
from olavlm.run_record import save_resolved_config
from olavlm.train import build as B
from olavlm.train.optim import parameter_groups
from olavlm.train.stages import apply_stage, trainable_report

# The released models' config.json values (meta-llama/Meta-Llama-3-8B-Instruct,
# microsoft/Phi-3-mini-4k-instruct).
LLM_CONFIGS = {
    "llama3_8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "intermediate_size": 14336, "vocab_size": 128256, "rope_theta": 500000.0,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "bos_token_id": 128000, "eos_token_id": 128009, "tie_word_embeddings": False,
        "attention_bias": False},
    "phi3_mini": {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 3072,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "intermediate_size": 8192, "vocab_size": 32064, "rope_theta": 10000.0,
        "max_position_embeddings": 4096, "original_max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 32000,
        "pad_token_id": 32000, "sliding_window": 2047, "tie_word_embeddings": False},
}
# Tokenizer length and pad id: Llama-3 has no pad token, so the seed adds "<pad>" (128257,
# SPEC 1.3); Phi-3's tokenizer has one (<|endoftext|>, 32000).
TOKENIZERS = {"llama3_8b": (128257, 128256), "phi3_mini": (32064, 32000)}
HIDDEN = {"llama3_8b": 4096, "phi3_mini": 3072}
MM_HIDDEN = {"clip": 1024, "convnext": 3072}  # SPEC 1.1


class _Tokenizer:
    def __init__(self, llm: str) -> None:
        self.length, self.pad_token_id = TOKENIZERS[llm]

    def __len__(self) -> int:
        return self.length


def _meta_tower(path, *, kind=None, select_layer=-2, dtype=None, device=None, image_size=None,
                **_):
    """The real towers' architectures on the meta device (no weights): CLIP ViT-L/14-336 from
    its published config, ConvNeXt-XXL as timm's convnext_xxlarge (open_clip's trunk)."""
    import transformers

    from olavlm.models import vision as V

    if (kind or V.tower_kind(path)) == "clip":
        config = transformers.CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
            num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
        with torch.device("meta"):
            model = transformers.CLIPVisionModel(config)
        return V.ClipVisionTower(model, name=str(path), select_layer=select_layer, dtype=dtype,
                                 device="meta")
    import timm

    with torch.device("meta"):
        trunk = timm.create_model("convnext_xxlarge", pretrained=False, num_classes=0)
    return V.ConvNextVisionTower(trunk, image_size=image_size or 256, name=str(path),
                                 select_layer=select_layer, dtype=dtype, device="meta")


def _local_copies(tmp_path: Path, cfg) -> None:
    """Stand-in local folders for the recipe's placeholders: the LLM's config.json only."""
    llm = next(name for name, (path, _) in LLMS.items() if path == cfg.model.llm)
    folder = tmp_path / Path(cfg.model.llm).name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLM_CONFIGS[llm]))
    tower = tmp_path / Path(cfg.model.vision_tower).name
    tower.mkdir()
    cfg.model.llm, cfg.model.vision_tower = str(folder), str(tower)


def _build(tmp_path, monkeypatch, name):
    import olavlm.models.vision as V

    monkeypatch.setattr(V, "build_vision_tower", _meta_tower)
    cfg = get_recipe(name)
    llm = name.split("_clip_")[0].split("_convnext_")[0]
    _local_copies(tmp_path, cfg)
    model = B.build_model(cfg, _Tokenizer(llm), tmp_path, is_main=True, barrier=lambda: None,
                          meta=True)
    assert all(p.is_meta for p in model.parameters())  # nothing was allocated
    return cfg, model


# -- independent parameter counts (SPEC 1.2, 1.5, 2.1, 2.2; the published LLM configs) ------
def _llm_params(llm: str, vocab: int) -> int:
    c = LLM_CONFIGS[llm]
    h, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    attention = 2 * h * h + 2 * h * kv  # q, o; k, v
    block = attention + 3 * h * inter + 2 * h  # SwiGLU, two RMSNorms
    return 2 * vocab * h + layers * block + h  # embeddings, LM head (untied), final norm


def _clip_tower_params() -> int:
    d, blocks = 1024, 23  # select_layer -2: blocks 1..23 of 24 are kept (SPEC 9 item 13)
    embeddings = 3 * 14 * 14 * d + d + (24 * 24 + 1) * d  # patch conv, CLS, positions
    block = 4 * (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 4 * d
    return embeddings + 2 * d + blocks * block + 2 * d  # pre- and post-layernorm


def _resampler_params(dim: int, embedding_dim: int, output_dim: int) -> int:
    inner = 32 * 4  # dim_head x heads
    attention = 4 * dim + dim * inner + dim * 2 * inner + inner * dim
    feed_forward = 2 * dim + 2 * dim * dim  # ff_mult 1
    return (embedding_dim * dim + dim) + attention + feed_forward + \
        (dim * output_dim + output_dim) + 2 * output_dim


def _head_params(task: str, h: int) -> int:
    if task == "gen":
        return _resampler_params(1024, h, 1024)
    if task == "seg":
        return _resampler_params(1536, h, 1536)
    return _resampler_params(h, h, 1024) + 3 * 2 * (1024 * 1024 + 1024)  # + linear_{1,2,3}


REAL = [f"{llm}_{vision}_{stage}" for llm in LLMS for vision in VISION_TOWERS
        for stage in STAGES]


@pytest.mark.parametrize("name", REAL)
def test_real_recipe_builds_the_spec_model(tmp_path, monkeypatch, name):
    cfg, model = _build(tmp_path, monkeypatch, name)
    llm, vision = name.split("_")[0] + "_" + name.split("_")[1], name.split("_")[2]
    stage = name.rsplit("_", 1)[1]
    h, vocab = HIDDEN[llm], TOKENIZERS[llm][0]
    # LLM: the published architecture, the seed's pad row added to Llama-3 (SPEC 1.3).
    assert model.hidden_size == h and model.parts.num_layers == 32
    assert model.llm.get_input_embeddings().num_embeddings == vocab
    assert sum(p.numel() for p in model.llm.parameters()) == _llm_params(llm, vocab)
    assert {"llama3_8b": 8_030_269_440, "phi3_mini": 3_821_079_552}[llm] == \
        _llm_params(llm, vocab)  # (8.03 B with the pad row; 3.82 B)
    # Tower: 576 tokens of 1024 (CLIP at 336) or 3072 (ConvNeXt-XXL at 768) features.
    tower = model.vision_tower
    assert (tower.num_tokens, tower.hidden_size) == (576, MM_HIDDEN[vision])
    assert tower.image_size == {"clip": 336, "convnext": 768}[vision]
    if vision == "clip":
        assert sum(p.numel() for p in tower.parameters()) == _clip_tower_params()
    # Projector mlp2x_gelu: Linear(mm_hidden, H) -> GELU -> Linear(H, H), biases (SPEC 1.2).
    assert [tuple(p.shape) for p in model.mm_projector.parameters()] == \
        [(h, MM_HIDDEN[vision]), (h,), (h, h), (h,)]
    # Task tokens: depth/seg (576, H), gen (8, H); 8 inserted per task after 576 image tokens.
    assert model.tasks == ("gen", "depth", "seg")
    shapes = {t: tuple(model.task_tokens.parameter_for(t).shape) for t in model.tasks}
    assert shapes == {"gen": (8, h), "depth": (576, h), "seg": (576, h)}
    assert model.num_inserted_tokens == 576 + 3 * 8
    assert tuple(model.task_tokens.inserted().shape) == (24, h)
    # Heads: one per tapped layer, d18-20_s10-18_g12-20 (SPEC 1.6: two layers, not ranges).
    assert model.layers == {"gen": [12, 20], "depth": [18, 20], "seg": [10, 18]}
    want = {"gen": (1024, 1, 1024, (1, 1024)), "depth": (h, 576, 1024, (576, 1024)),
            "seg": (1536, 576, 1536, (1536, 24, 24))}  # dim, queries, output, target (2.2, 3)
    for task in model.tasks:
        heads = model.heads(task)
        assert len(heads) == 2
        for head in heads:
            r = head.projector
            assert (r.dim, r.num_queries, r.output_dim, tuple(cfg.model.heads[task].target_shape)) \
                == want[task], task
            assert tuple(r.proj_in.weight.shape) == (want[task][0], h)
            assert head.num_mlps == (3 if task == "depth" else 0)
            assert sum(p.numel() for p in head.parameters()) == _head_params(task, h), task
    # SPEC 2.2's rounded counts (Llama-3): depth 63.0 M, seg 14.2 M, gen 7.9 M, tokens 4.75 M,
    # ~170 M of heads for two layers per task (Phi-3: ~118 M).
    if llm == "llama3_8b":
        assert [round(_head_params(t, h) / 1e6, 1) for t in ("depth", "seg", "gen")] == \
            [63.0, 14.2, 7.9]
        assert round(sum(shapes[t][0] for t in shapes) * h / 1e6, 2) == 4.75
    heads_total = 2 * sum(_head_params(t, h) for t in ("gen", "depth", "seg"))
    assert round(heads_total / 1e6) == {"llama3_8b": 170, "phi3_mini": 118}[llm]
    # Stage split (SPEC 5.1): PT the projector, 6 heads, 3 token params, 3 logit scales;
    # VPT/IFT the LLM and the projector. The tower is always frozen.
    apply_stage(model, cfg.train.stage)
    rows = {name: (trained, frozen) for name, trained, frozen in trainable_report(model)}
    projector = sum(p.numel() for p in model.mm_projector.parameters())
    tokens = (2 * 576 + 8) * h
    assert rows["vision_tower"][0] == 0 and rows["mm_projector"] == (projector, 0)
    if stage == "pt":
        assert rows["llm"] == (0, _llm_params(llm, vocab))
        assert rows["task_tokens"] == (tokens, 0)
        for task in model.tasks:
            assert rows[f"image_{task}_heads"] == (2 * _head_params(task, h), 0)
            assert rows[f"{task}_logit_scale"] == (1, 0)
        trained = projector + tokens + heads_total + 3
    else:
        assert rows["llm"] == (_llm_params(llm, vocab), 0)
        assert rows["task_tokens"] == (0, tokens)
        assert all(rows[f"image_{t}_heads"][0] == 0 and rows[f"{t}_logit_scale"] == (0, 1)
                   for t in model.tasks)
        trained = projector + _llm_params(llm, vocab)
    assert sum(r[0] for r in rows.values()) == trained
    # Dtypes: PT stores the frozen LLM in bf16 and trains fp32 parts; VPT/IFT train fp32.
    assert next(model.llm.parameters()).dtype == (torch.bfloat16 if stage == "pt"
                                                   else torch.float32)
    assert model.task_tokens.special_depth_tokens.dtype == torch.float32
    assert next(model.mm_projector.parameters()).dtype == torch.float32
    # Optimizer groups: every trainable parameter once, at the stage's lr (1e-3 PT, 2e-5
    # otherwise; no projector/head lr of their own), no weight decay anywhere (SPEC 5.1).
    groups = parameter_groups(model, cfg.optim)
    lr = 1e-3 if stage == "pt" else 2e-5
    assert {g["role"] for g in groups} == ({"projector", "heads"} if stage == "pt"
                                           else {"projector", "llm"})
    assert all(g["lr"] == lr and g["weight_decay"] == 0.0 for g in groups)
    assert sum(p.numel() for g in groups for p in g["params"]) == trained
    names = [n for g in groups for n in g["names"]]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("name", REAL)
def test_real_recipe_round_trips_through_its_saved_config(tmp_path, name):
    cfg = resolve_config(name, None, [])
    path, _ = save_resolved_config(cfg, tmp_path)
    assert resolve_config(None, path, []) == cfg
    assert resolve_config(name, path, []) == cfg


def test_a_missing_llm_names_the_key_and_where_to_get_the_weights(tmp_path):
    # The first path a real recipe reads is model.llm's tokenizer: the message must name
    # model.llm (data.tokenizer only defaults to it) and how to get the weights.
    for name, repo in (("pt", "meta-llama/Meta-Llama-3-8B-Instruct"),
                       ("phi3_mini_clip_pt", "microsoft/Phi-3-mini-4k-instruct")):
        cfg = get_recipe(name)
        cfg.model.llm = str(tmp_path / Path(cfg.model.llm).name)
        with pytest.raises(FileNotFoundError) as info:
            B.build_tokenizer(cfg, None)
        message = str(info.value)
        assert "model.llm" in message and cfg.model.llm in message
        assert f"hf download {repo} --local-dir DIR" in message and "model.llm=DIR" in message
        with pytest.raises(FileNotFoundError, match=f"model.llm: .*hf download {repo}"):
            B._materialize(cfg.model.llm, "llm", tmp_path, None)


@pytest.mark.parametrize("vision", ["clip", "convnext"])
def test_a_missing_tower_names_the_key_and_where_to_get_the_weights(tmp_path, vision):
    repo = {"clip": "openai/clip-vit-large-patch14-336",
            "convnext": "laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup"}[vision]
    spec = str(tmp_path / Path(VISION_TOWERS[vision][0]).name)
    with pytest.raises(FileNotFoundError, match=f"model.vision_tower: .*hf download {repo} "):
        B._materialize(spec, "vision_tower", tmp_path, None)


def test_the_convnext_recipes_seed_style_res768_name_finds_the_hub_folder(tmp_path):
    # The hub repository has no "-res768"; the seed (and the recipes) append it to say the
    # input side, and the tower loader strips it to find the folder: so must the path check.
    placeholder = Path(get_recipe("llama3_8b_convnext_pt").model.vision_tower).name
    assert placeholder.endswith("-res768")
    (tmp_path / placeholder.removesuffix("-res768")).mkdir()
    spec = str(tmp_path / placeholder)
    assert B._materialize(spec, "vision_tower", tmp_path, None) == spec  # suffix kept: the size
