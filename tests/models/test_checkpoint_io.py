# Checkpoint I/O: a synthesized seed checkpoint (SPEC 11) imports key for key; exports round-trip.
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_ola import IMAGE_SIZE, VOCAB, tiny_batch

from olavlm.models import checkpoint_io
from olavlm.models.checkpoint_io import (
    export_hf,
    export_seed_layout,
    load_exported,
    load_seed_checkpoint,
    read_safetensors_dir,
)
from olavlm.models.tiny_llm import build_tiny_llm
from olavlm.models.vision import build_tiny_vision_tower

H = 32  # LLM width; the tiny CLIP tower's width is 32 too (mm_hidden_size)
NUM_TASK_TOKENS = 4
# The seed's config.json head dicts (SPEC 2.2 keys) at toy sizes; layers are the seed's strings.
SEED_HEADS = {
    "gen": dict(depth=1, dim_head=8, num_heads=4, num_tokens=1, output_dim=16, ff_mult=1,
                img_layer_indices="2-3", img_loss_weight=0.5),
    "depth": dict(depth=1, dim_head=8, num_heads=4, num_tokens=16, output_dim=16, ff_mult=1,
                  depth_layer_indices="2-4", depth_loss_weight=0.25),
    "seg": dict(depth=1, dim_head=8, num_heads=4, num_tokens=16, output_dim=12, ff_mult=2,
                seg_layer_indices="1-3", seg_loss_weight=0.5),
}


def _resampler_shapes(dim: int, out: int, depth: int, dim_head: int, heads: int, mult: int):
    """SPEC 2.1 / 11: the seed's TaskTokenResampler keys and shapes (written out independently of
    olakernels.perceiver)."""
    inner = dim_head * heads
    shapes = {"proj_in.weight": (dim, H), "proj_in.bias": (dim,), "proj_out.weight": (out, dim),
              "proj_out.bias": (out,), "norm_out.weight": (out,), "norm_out.bias": (out,)}
    for j in range(depth):
        a, f = f"layers.{j}.0.", f"layers.{j}.1."
        shapes.update({
            a + "norm1.weight": (dim,), a + "norm1.bias": (dim,), a + "norm2.weight": (dim,),
            a + "norm2.bias": (dim,), a + "to_q.weight": (inner, dim),
            a + "to_kv.weight": (2 * inner, dim), a + "to_out.weight": (dim, inner),
            f + "0.weight": (dim,), f + "0.bias": (dim,), f + "1.weight": (dim * mult, dim),
            f + "3.weight": (dim, dim * mult)})
    return shapes


def seed_tensors(llm_dir: Path, tower_dir: Path, *, seed: int = 1) -> dict[str, torch.Tensor]:
    """Every key a seed OLA-VLM checkpoint holds (SPEC 11), with random values."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    state = dict(load_file(str(llm_dir / "model.safetensors")))  # model.*, lm_head.weight
    for key, value in load_file(str(tower_dir / "model.safetensors")).items():
        if key.startswith("vision_model."):  # the seed wraps CLIPVisionModel (transformers 4)
            state[f"model.vision_tower.vision_tower.{key}"] = value
    state.update({"model.mm_projector.0.weight": rand(H, H), "model.mm_projector.0.bias": rand(H),
                  "model.mm_projector.2.weight": rand(H, H), "model.mm_projector.2.bias": rand(H),
                  "model.special_gen_tokens": rand(NUM_TASK_TOKENS, H),
                  "model.special_depth_tokens": rand(16, H),
                  "model.special_seg_tokens": rand(16, H)})
    for task, cfg in SEED_HEADS.items():
        prefix = checkpoint_io.SEED_TASK_PREFIX[task]
        dim = H if task == "depth" else cfg["output_dim"]
        shapes = _resampler_shapes(dim, cfg["output_dim"], cfg["depth"], cfg["dim_head"],
                                   cfg["num_heads"], cfg["ff_mult"])
        for i in range(len(cfg[f"{prefix}_layer_indices"].split("-"))):
            for name, shape in shapes.items():
                state[f"image_{task}_heads.{i}.projector.{name}"] = rand(*shape)
            if task == "depth":
                out = cfg["output_dim"]
                for m in (1, 2, 3):
                    for j in (0, 2):
                        state[f"image_depth_heads.{i}.linear_{m}.{j}.weight"] = rand(out, out)
                        state[f"image_depth_heads.{i}.linear_{m}.{j}.bias"] = rand(out)
        state[f"{task}_logit_scale"] = torch.tensor(2.0) + rand(())
    state["da_v2_head.scratch.output_conv1.weight"] = rand(4, 4, 3, 3)  # visualisation only
    return state


def seed_config(llm_dir: Path, tower_dir: Path) -> dict:
    config = json.loads((llm_dir / "config.json").read_text())
    config.update(model_type="ola_llama", architectures=["OlaLlavaLlamaForCausalLM"],
                  aux_mode="gen-depth-seg", num_task_tokens=NUM_TASK_TOKENS,
                  contrastive_loss_weight=0.3, mm_hidden_size=H, mm_vision_tower=str(tower_dir),
                  mm_vision_select_layer=-2, mm_projector_type="mlp2x_gelu",
                  image_aspect_ratio="pad", tokenizer_model_max_length=4096, use_mm_proj=True,
                  mm_use_im_start_end=False, tokenizer_padding_side="right",
                  **{f"image_{t}": dict(c) for t, c in SEED_HEADS.items()})
    return config


def write_seed(folder: Path, state: dict, config: dict, *, shards: int = 2) -> Path:
    """The seed's files: config.json and safetensors, sharded with an index like the Hub's."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    keys = sorted(state)
    if shards == 1:
        save_file({k: state[k].contiguous() for k in keys}, str(folder / "model.safetensors"))
        return folder
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[s::shards]
        save_file({k: state[k].contiguous() for k in part}, str(folder / name),
                  metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    llm_dir = build_tiny_llm("llama", tmp / "llm", vocab_size=VOCAB, hidden_size=H, num_layers=4)
    tower_dir = build_tiny_vision_tower("clip", tmp, image_size=IMAGE_SIZE, num_layers=4)
    state = seed_tensors(llm_dir, tower_dir)
    config = seed_config(llm_dir, tower_dir)
    return tmp, tower_dir, state, config, write_seed(tmp / "seed", state, config)


@pytest.fixture(scope="module")
def imported(parts):
    return load_seed_checkpoint(parts[4], impl="torch")


def _loss(model, seed: int = 0) -> torch.Tensor:
    ids, mask, labels, images, image_mask, targets = tiny_batch(model, seed=seed)
    with torch.no_grad():
        return model(ids, mask, labels, images, image_mask, targets).loss


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


# ---- import ----


def test_import_maps_every_seed_key_onto_the_model(parts, imported):
    _, _, state, _, _ = parts
    ours = imported.state_dict()
    used = set()
    for key, value in state.items():
        if key.startswith("da_v2_head."):
            continue
        if key.startswith("model.vision_tower.vision_tower.vision_model.encoder.layers.3."):
            continue  # block 4 of 4: select_layer=-2 reads block 3's output, the tower cut it
        new = checkpoint_io.seed_key_to_ola(key).replace(
            "vision_tower.vision_tower.vision_model.", "vision_tower.vision_tower.")
        assert new in ours, key
        if new.endswith("_logit_scale"):  # 0-d in the seed, (1,) here (FSDP2 needs >= 1-d)
            value = value.reshape(1)
        assert torch.equal(ours[new], value), key
        used.add(new)
    assert used == set(ours)  # nothing in the model kept its random init
    assert imported.vision_tower.num_blocks == 3
    assert any(k.startswith("da_v2_head.") for k in imported.ignored_checkpoint_keys)
    assert "model.vision_tower.vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight" in \
        imported.ignored_checkpoint_keys


def test_import_reads_the_seed_config(imported):
    cfg = imported.config
    assert cfg.tasks == ("gen", "depth", "seg") and cfg.num_task_tokens == NUM_TASK_TOKENS
    assert imported.layers == {"gen": [2, 3], "depth": [2, 4], "seg": [1, 3]}
    assert imported.loss_weights == {"gen": 0.5, "depth": 0.25, "seg": 0.5}
    assert cfg.projector == "mlp2x_gelu" and cfg.vision_select_layer == -2
    assert cfg.heads["seg"].target_shape == (12, 4, 4) and cfg.heads["seg"].ff_mult == 2
    assert cfg.heads["depth"].num_mlps == 3 and cfg.heads["gen"].target_shape == (1, 16)
    assert cfg.impl == "torch" and cfg.llm == ""
    # The LLM's config lost every LLaVA / OLA key.
    llm_cfg = imported.llm.config.to_dict()
    assert not [k for k in llm_cfg if k.startswith(("mm_", "image_")) or k == "aux_mode"]
    assert type(imported.llm).__name__ == "LlamaForCausalLM"


def test_imported_model_runs_and_trains(imported):
    ids, mask, labels, images, image_mask, targets = tiny_batch(imported)
    out = imported(ids, mask, labels, images, image_mask, targets)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert imported.image_depth_heads[0].linear_1[0].weight.grad is not None
    imported.zero_grad(set_to_none=True)


def test_import_without_tower_weights_keeps_the_towers_own(parts, tmp_path):
    _, tower_dir, state, config, _ = parts
    no_tower = {k: v for k, v in state.items() if not k.startswith("model.vision_tower.")}
    model = load_seed_checkpoint(write_seed(tmp_path / "s", no_tower, config, shards=1),
                                 impl="torch")
    fresh = load_seed_checkpoint(parts[4], impl="torch")
    for key, value in fresh.vision_tower.state_dict().items():
        assert torch.equal(model.vision_tower.state_dict()[key], value), key


def test_tower_folder_of_another_name_keeps_the_seeds_kind(parts, tmp_path):
    # The seed picks the tower class from mm_vision_tower's name; a local copy may be named
    # anything.
    _, tower_dir, _, _, seed_dir = parts
    shutil.copytree(tower_dir, tmp_path / "encoder")
    model = load_seed_checkpoint(seed_dir, tmp_path / "encoder", impl="torch")
    assert model.config.vision_kind == "clip"
    assert model.config.vision_tower == str(tmp_path / "encoder")


def test_a_convnext_tower_folder_passed_in_keeps_the_recorded_input_size(tmp_path):
    """A ConvNeXt model records its input side as the name's -res<N> suffix; a local folder
    passed instead (vision_tower_path) must not fall back to the folder's open_clip size
    (convnext_xxlarge: 256 px, 64 tokens instead of 768 px, 576)."""
    from tiny_ola import tiny_model

    from olavlm.models.vision import build_vision_tower

    folder = build_tiny_vision_tower("convnext", tmp_path)
    tower = build_vision_tower(str(folder) + "-res256")
    assert build_vision_tower(str(folder)).image_size != 256  # the premise
    model = tiny_model(tmp_path, tower=tower, vision_tower=str(folder) + "-res256",
                       vision_kind="convnext")
    local = tmp_path / "my-encoder"
    shutil.copytree(folder, local)
    seed = load_seed_checkpoint(export_seed_layout(model, tmp_path / "seed"), local,
                                impl="torch")
    hf = load_exported(export_hf(model, tmp_path / "hf"), local)
    for loaded in (seed, hf):
        assert (loaded.vision_tower.image_size, loaded.vision_tower.num_tokens) == \
            (256, tower.num_tokens)
        assert loaded.config.vision_tower == str(local) + "-res256"
    # A size the caller's folder name gives is the caller's.
    other = tmp_path / "encoder-res128"
    shutil.copytree(folder, other)
    assert load_exported(tmp_path / "hf", other).vision_tower.image_size == 128


def test_a_tower_folder_shallower_than_the_checkpoints_is_refused(parts, tmp_path):
    """select_layer counts from the end: a 2-block folder would read another block than the
    checkpoint's 4-block tower, its blocks filed as 'cut' (silently)."""
    _, _, _, _, seed_dir = parts
    shallow = build_tiny_vision_tower("clip", tmp_path / "shallow", image_size=IMAGE_SIZE,
                                      num_layers=2)
    with pytest.raises(ValueError, match="vision tower has 4 blocks, the tower folder .* has 2"):
        load_seed_checkpoint(seed_dir, shallow, impl="torch")


def test_tied_embeddings_import_and_export(parts, tmp_path):
    _, _, state, config, _ = parts
    tied = {k: v for k, v in state.items() if k != "lm_head.weight"}
    folder = write_seed(tmp_path / "s", tied, dict(config, tie_word_embeddings=True), shards=1)
    model = load_seed_checkpoint(folder, impl="torch")
    assert model.llm.lm_head.weight is model.llm.model.embed_tokens.weight
    out = export_seed_layout(model, tmp_path / "out")
    assert "lm_head.weight" not in read_safetensors_dir(out)
    _assert_same_state(load_seed_checkpoint(out, impl="torch"), model)


def test_bf16_checkpoint_imports_in_bf16_and_round_trips(parts, tmp_path):
    _, _, state, config, _ = parts
    half = {k: v.to(torch.bfloat16) for k, v in state.items()}
    folder = write_seed(tmp_path / "s", half, dict(config, dtype="bfloat16"), shards=1)
    model = load_seed_checkpoint(folder, impl="torch")
    assert model.config.dtype == "bfloat16"
    assert model.image_seg_heads[1].projector.proj_in.weight.dtype == torch.bfloat16
    # The tower too (the seed's runs in the model's dtype; fp32 doubled its memory).
    assert model.vision_tower.dtype == torch.bfloat16
    assert torch.equal(model.task_tokens.special_seg_tokens, half["model.special_seg_tokens"])
    assert torch.isfinite(_loss(model))
    # The tower holds the checkpoint's bf16-rounded copy of the folder's fp32 weights: the
    # export saves it (the default for tower weights from a checkpoint), bit for bit.
    out = export_hf(model, tmp_path / "hf")
    assert (out / "vision_tower.safetensors").is_file()
    _assert_same_state(load_exported(out), model)
    _assert_same_state(load_seed_checkpoint(export_seed_layout(model, tmp_path / "seed"),
                                            impl="torch"), model)


def test_fp32_trainable_parts_over_a_bf16_llm_round_trip(parts, tmp_path):
    """The PT recipes' layout: a bf16 LLM, fp32 projector, task tokens and heads. The seed's
    config.json has one dtype; the import reads the trainable parts' from their tensors, so
    they are not rounded to bf16 on load."""
    _, _, state, config, _ = parts
    mixed = {k: v if k.startswith(("model.mm_projector.", "model.special_", "image_"))
             or "logit_scale" in k else v.to(torch.bfloat16) for k, v in state.items()}
    folder = write_seed(tmp_path / "s", mixed, dict(config, dtype="bfloat16"), shards=1)
    model = load_seed_checkpoint(folder, impl="torch")
    assert model.config.dtype == "bfloat16" and model.config.trainable_dtype == "float32"
    weight = model.mm_projector[0].weight if isinstance(model.mm_projector, torch.nn.Sequential) \
        else next(model.mm_projector.parameters())
    assert weight.dtype == torch.float32
    assert torch.equal(model.task_tokens.special_seg_tokens, state["model.special_seg_tokens"])
    again = load_seed_checkpoint(export_seed_layout(model, tmp_path / "seed"), impl="torch")
    _assert_same_state(again, model)
    assert again.config.trainable_dtype == "float32"


def test_export_hf_records_the_dtypes_the_tensors_have(imported, tmp_path):
    """An LLM cast to bf16 after construction, the trainable parts left in fp32: the export's
    config says so (dtype from the LLM, trainable_dtype from the parts), and the reload does
    not round the fp32 parts to bf16."""
    model = copy.deepcopy(imported)
    model.llm.to(torch.bfloat16)
    assert model.config.dtype == "float32" and model.config.trainable_dtype is None
    out = export_hf(model, tmp_path / "hf")
    written = json.loads((out / "olavlm_config.json").read_text())
    assert (written["dtype"], written["trainable_dtype"]) == ("bfloat16", "float32")
    _assert_same_state(load_exported(out), model)


def test_a_cls_token_tower_is_refused_on_import(parts, tmp_path):
    """mm_vision_select_feature="cls_patch" adds a position after the image: refusing beats
    building a patch-only tower whose offsets differ from the checkpoint's training."""
    config = dict(parts[3], mm_vision_select_feature="cls_patch")
    with pytest.raises(NotImplementedError, match="mm_vision_select_feature='cls_patch'"):
        load_seed_checkpoint(_seed_with(parts, tmp_path / "a", config=config))


def test_seed_config_variants_and_old_buffers_on_import(parts, tmp_path):
    """task_token_format other than the released expand_emb is refused (it would insert
    another number of tokens); buffers older transformers saved (position_ids, inv_freq) are
    ignored as from_pretrained ignores them; a logit scale of the wrong size is named."""
    config = dict(parts[3], task_token_format="emb")
    with pytest.raises(NotImplementedError, match="task_token_format='emb'"):
        load_seed_checkpoint(_seed_with(parts, tmp_path / "a", config=config))
    old = {"model.vision_tower.vision_tower.vision_model.embeddings.position_ids":
           torch.arange(17)[None], "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}
    model = load_seed_checkpoint(_seed_with(parts, tmp_path / "b", add=old), impl="torch")
    assert set(old) <= set(model.ignored_checkpoint_keys)
    with pytest.raises(ValueError, match=r"seg_logit_scale must be a single value \(the seed's "
                                         r"is 0-d\), got shape \(2,\)"):
        load_seed_checkpoint(_seed_with(parts, tmp_path / "c",
                                        add={"seg_logit_scale": torch.ones(2)}))


def test_import_with_seed_compat_takes_the_seeds_offset(parts):
    model = load_seed_checkpoint(parts[4], impl="torch", seed_compat=True)
    assert model.config.num_sys_tokens == 26  # a Llama with a vocabulary under 128000


def test_llm_out_writes_a_plain_hf_checkpoint(parts, tmp_path):
    model = load_seed_checkpoint(parts[4], impl="torch", llm_out=tmp_path / "llm")
    assert model.config.llm == str(tmp_path / "llm")
    written = json.loads((tmp_path / "llm" / "config.json").read_text())
    assert written["model_type"] == "llama" and "image_depth" not in written
    from olavlm.models.llm import load_llm

    llm = load_llm(tmp_path / "llm")
    for key, value in llm.state_dict().items():
        assert torch.equal(model.llm.state_dict()[key], value), key


# ---- exports ----


def test_export_hf_round_trip(imported, parts, tmp_path):
    out = export_hf(imported, tmp_path / "export", include_vision_tower=False)
    assert sorted(p.name for p in out.iterdir()) == ["llm", "olavlm.safetensors",
                                                      "olavlm_config.json", "olavlm_export.json"]
    assert (out / "llm" / "config.json").is_file()
    own = load_file(str(out / "olavlm.safetensors"))
    assert not [k for k in own if k.startswith(("llm.", "vision_tower."))]
    # The seed's tower weights are the tower folder's: building the tower from its path suffices.
    loaded = load_exported(out)
    _assert_same_state(loaded, imported)
    assert not loaded.training and not imported.training  # eval mode, as from_pretrained
    assert loaded.config.heads == imported.config.heads
    assert torch.equal(_loss(loaded), _loss(imported))


def test_a_model_cast_to_bf16_keeps_fp32_rope_and_its_export_is_the_same_model(parts, tmp_path):
    """``model.bfloat16()`` (a user's cast, not a bf16 config) leaves the decoder's RoPE
    frequencies in fp32, as a bf16 ``from_pretrained`` has them and as the exported model's
    loader rebuilds them: the reloaded model gives the same loss bit for bit."""
    model = load_seed_checkpoint(parts[4], impl="torch")
    rotary = model.llm.model.rotary_emb
    fresh = rotary.inv_freq.clone()
    model = model.bfloat16()
    assert model.mm_projector[0].weight.dtype == torch.bfloat16
    assert rotary.inv_freq.dtype == rotary.original_inv_freq.dtype == torch.float32
    assert torch.equal(rotary.inv_freq, fresh)
    assert model.gen_logit_scale.dtype == torch.float32  # (as a bf16 config builds it)
    # a cast after a backward: the kept parameter's gradient comes back to its dtype too
    _loss_with_grad = load_seed_checkpoint(parts[4], impl="torch")
    ids, mask, labels, images, image_mask, targets = tiny_batch(_loss_with_grad, seed=0)
    _loss_with_grad(ids, mask, labels, images, image_mask, targets).loss.backward()
    cast = _loss_with_grad.bfloat16()
    assert cast.gen_logit_scale.grad.dtype == torch.float32
    torch.optim.AdamW(cast.parameters(), lr=1e-3).step()  # (refused mismatched dtypes)
    loaded = load_exported(export_hf(model, tmp_path / "hf"))
    _assert_same_state(loaded, model)
    assert torch.equal(_loss(loaded), _loss(model))
    assert model.float().llm.model.rotary_emb.inv_freq.dtype == torch.float32


def test_export_hf_with_tower_weights(imported, tmp_path):
    out = export_hf(imported, tmp_path / "export", include_vision_tower=True)
    assert (out / "vision_tower.safetensors").is_file()
    _assert_same_state(load_exported(out), imported)


def test_export_hf_keeps_tower_weights_that_came_from_a_checkpoint(parts, tmp_path):
    """A seed checkpoint's tower weights need not be its folder's (a tuned tower, the seed's
    ConvNeXt re-read from the checkpoint): by default the export keeps them, and so does an
    export of that export; a model built from folders alone writes none."""
    _, tower_dir, state, config, _ = parts
    tuned = {k: v * 1.5 if ".encoder.layers.0.mlp.fc1.weight" in k else v
             for k, v in state.items()}
    model = load_seed_checkpoint(write_seed(tmp_path / "seed", tuned, config), impl="torch")
    first = export_hf(model, tmp_path / "first")
    assert (first / "vision_tower.safetensors").is_file()
    again = load_exported(first)
    _assert_same_state(again, model)
    assert torch.equal(_loss(again), _loss(model))
    second = export_hf(again, tmp_path / "second")
    _assert_same_state(load_exported(second), model)
    fresh = load_exported(export_hf(model, tmp_path / "plain", include_vision_tower=False))
    assert not torch.equal(_loss(fresh), _loss(model))  # the premise: the folder's differ
    assert not (export_hf(fresh, tmp_path / "third") / "vision_tower.safetensors").is_file()


def test_reexporting_a_bundled_export_over_itself_keeps_its_tower(imported, parts, tmp_path):
    """load_exported names the bundled tower inside the export; replacing that export must
    bundle it again, not point at the folder it deletes."""
    out = export_hf(imported, tmp_path / "export", bundle_vision_tower=True)
    again = load_exported(out)
    assert Path(again.config.vision_tower).resolve().is_relative_to(out.resolve())
    for writer in (export_hf, export_seed_layout):
        writer(again, out, overwrite=True)
        reread = load_exported(out) if writer is export_hf else \
            load_seed_checkpoint(out, impl="torch")
        assert torch.equal(_loss(reread), _loss(imported))
        again = reread


def test_a_llm_folder_missing_a_weight_is_refused(imported, tmp_path):
    """transformers would start a missing weight from random values (with a log line the
    launcher quiets): load_exported, and any model.llm, refuse it."""
    out = export_hf(imported, tmp_path / "export")
    weights = out / "llm" / "model.safetensors"
    state = load_file(str(weights))
    state.pop("model.layers.1.mlp.down_proj.weight")
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 weights .*model\.layers\.1\.mlp\.down_proj"):
        load_exported(out)


def test_export_seed_layout_round_trip(imported, parts, tmp_path):
    _, _, state, config, _ = parts
    out = export_seed_layout(imported, tmp_path / "seed", max_shard_size=20_000)
    assert (out / "model.safetensors.index.json").is_file()  # sharded
    written = read_safetensors_dir(out)
    # The seed's own keys come back, except the visualisation head and the cut tower block.
    dropped = {k for k in state if k.startswith("da_v2_head.") or ".encoder.layers.3." in k}
    assert set(written) == set(state) - dropped
    for key, value in written.items():
        assert torch.equal(value, state[key]), key
    seed_cfg = json.loads((out / "config.json").read_text())
    for task, head in SEED_HEADS.items():
        assert seed_cfg[f"image_{task}"] == {**head, **(
            {"use_intermediate_depth": True} if task == "depth" else {})}
    assert seed_cfg["model_type"] == "ola_llama"
    assert seed_cfg["task_token_format"] == "expand_emb"  # (SPEC 1.5: the seed's class reads it)
    named = imported.config.vision_tower
    try:  # a tower module passed in, no folder named: the seed's builder could not pick it
        imported.config.vision_tower = ""
        with pytest.raises(ValueError, match=r"needs one \(mm_vision_tower\)"):
            export_seed_layout(imported, tmp_path / "no-tower")
    finally:
        imported.config.vision_tower = named
    assert not (tmp_path / "no-tower").exists()
    assert seed_cfg["mm_vision_tower"] == config["mm_vision_tower"]
    again = load_seed_checkpoint(out, impl="torch")
    _assert_same_state(again, imported)
    assert again.config.to_dict() == imported.config.to_dict()
    assert torch.equal(_loss(again), _loss(imported))


# ---- bad checkpoints ----


def _seed_with(parts, folder: Path, *, drop=(), add=None, config=None) -> Path:
    _, _, state, base_config, _ = parts
    state = {k: v for k, v in state.items() if k not in drop}
    state.update(add or {})
    return write_seed(folder, state, config or base_config, shards=1)


@pytest.mark.parametrize("key", [
    "image_seg_heads.1.projector.proj_in.bias",
    "model.special_depth_tokens",
    "seg_logit_scale",
    "model.norm.weight",
    "model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
])
def test_missing_key_is_named(parts, tmp_path, key):
    with pytest.raises(ValueError, match=f"missing 1 keys: {key}"):
        load_seed_checkpoint(_seed_with(parts, tmp_path / "s", drop=[key]), impl="torch")


@pytest.mark.parametrize("key", ["image_seg_heads.2.projector.proj_in.bias", "model.extra.weight",
                                 "model.mm_projector.4.weight"])
def test_unexpected_key_is_named(parts, tmp_path, key):
    folder = _seed_with(parts, tmp_path / "s", add={key: torch.zeros(3)})
    with pytest.raises(ValueError, match=f"unexpected 1 keys: {key}"):
        load_seed_checkpoint(folder, impl="torch")


@pytest.mark.parametrize("key,shape,expected", [
    ("model.special_depth_tokens", (12, H), (16, H)),
    ("image_gen_heads.0.projector.proj_out.weight", (8, 16), (16, 16)),
    ("model.layers.0.mlp.up_proj.weight", (H, H), (2 * H, H)),
])
def test_wrong_shape_names_key_and_shapes(parts, tmp_path, key, shape, expected):
    folder = _seed_with(parts, tmp_path / "s", add={key: torch.zeros(shape)})
    with pytest.raises(ValueError, match=rf"'{key}' must have shape \({expected[0]}, "
                                         rf"{expected[1]}\).*got \({shape[0]}, {shape[1]}\)"):
        load_seed_checkpoint(folder, impl="torch")


def test_head_config_disagreeing_with_the_weights(parts, tmp_path):
    config = json.loads(json.dumps(parts[3]))
    config["image_seg"]["output_dim"] = 8
    with pytest.raises(ValueError, match="image_seg_heads.0.projector.*must have shape"):
        load_seed_checkpoint(_seed_with(parts, tmp_path / "s", config=config), impl="torch")


def test_missing_paths_and_files(parts, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_seed_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_seed_checkpoint(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(parts[3]))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        load_seed_checkpoint(tmp_path / "empty")
    folder = write_seed(tmp_path / "sharded", parts[2], parts[3], shards=2)
    os.remove(folder / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_seed_checkpoint(folder)
    with pytest.raises(FileNotFoundError, match="absent"):
        load_exported(tmp_path / "absent")


def test_unsupported_seed_configs_say_why(parts, tmp_path):
    config = dict(parts[3], num_task_tokens=0)
    with pytest.raises(NotImplementedError, match="num_task_tokens"):
        load_seed_checkpoint(_seed_with(parts, tmp_path / "a", config=config))
    config = {k: v for k, v in parts[3].items() if k != "image_seg"}
    with pytest.raises(NotImplementedError, match="image_seg"):
        load_seed_checkpoint(_seed_with(parts, tmp_path / "b", config=config))


def test_tasks_outside_aux_mode_are_dropped_with_a_warning(parts):
    with pytest.warns(UserWarning, match="outside aux_mode 'depth'"):
        model = load_seed_checkpoint(parts[4], impl="torch", aux_mode="depth")
    assert model.tasks == ("depth",)
    assert "model.special_gen_tokens" in model.ignored_checkpoint_keys


# ---- safe writes ----


def test_writes_refuse_a_non_empty_directory(imported, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    for export in (export_hf, export_seed_layout):
        with pytest.raises(FileExistsError, match="overwrite=True"):
            export(imported, out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    with pytest.raises(FileExistsError, match="not written by an olavlm export"):  # overwrite
        export_hf(imported, out, overwrite=True)                       # replaces exports only
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    export_seed_layout(imported, tmp_path / "seed")
    export_hf(imported, tmp_path / "seed", overwrite=True)  # an earlier export: replaced
    seed = tmp_path / "seed"
    assert not (seed / "config.json").exists() and (seed / "olavlm_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "seed"]  # no temporary left


def test_a_crash_leaves_no_checkpoint(imported, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        export_hf(imported, tmp_path / "out")
    with pytest.raises(OSError, match="disk full"):
        export_seed_layout(imported, tmp_path / "seed")
    assert list(tmp_path.iterdir()) == []


def test_bad_saved_configs_and_bundles_are_named(imported, tmp_path):
    """A damaged olavlm_config.json names the file and the head field; a bool is no layer; a
    bundle of a tower the config does not name says so (it was a FileExistsError)."""
    out = export_hf(imported, tmp_path / "hf", include_vision_tower=False)
    path = out / "olavlm_config.json"
    good = json.loads(path.read_text())
    for change, match in (
            (lambda c: c["heads"]["gen"].pop("target_shape"),
             r"olavlm_config\.json'.*heads\['gen'\]: missing fields \['target_shape'\]"),
            (lambda c: c["heads"]["gen"].update(num_head=2),
             r"heads\['gen'\]: unknown fields \['num_head'\]"),
            (lambda c: c.update(layer_indices={"gen": [True], "depth": [1], "seg": [1]}),
             r"layer_indices\['gen'\] must be .* got \[True\]")):
        bad = json.loads(json.dumps(good))
        change(bad)
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            load_exported(out)
    model = copy.deepcopy(imported)
    model.config.vision_tower = ""
    for writer in (export_hf, export_seed_layout):
        with pytest.raises(ValueError, match="bundle_vision_tower: the model's config names no "):
            writer(model, tmp_path / writer.__name__, bundle_vision_tower=True)
        assert not (tmp_path / writer.__name__).exists()
