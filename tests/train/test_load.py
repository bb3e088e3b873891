# parallel.load=rank0: a rank that built the model on the meta device ends with rank 0's weights.
from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from olavlm.config import ParallelConfig, resolve_config
from olavlm.train import build as B
from olavlm.train import load as L
from olavlm.train.parallel import free_port

HIDDEN, FFN = 48, 96  # widths no tensor of the tiny CLIP tower (32 / 64) or of a shard has


def _tied_llm(folder, vocab: int) -> str:
    """A tiny bf16 Llama with tied input/output embeddings and fewer rows than the tokenizer
    (build_model grows them, as for Llama-3's added pad token)."""
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=FFN,
                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=512, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        tf.LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


def _setup(tmp):
    """(overrides, synthetic data root): the PT recipe's dtypes (bf16 frozen LLM, fp32
    trainable parts) on the demo's tiny parts, activation checkpointing on."""
    synth = tmp / "synthetic"
    base = [f"data.synthetic_dir={synth}", "data.synthetic_num=16", f"train.output_dir={tmp}",
            "train.stage=pt", "train.device=cpu", "parallel.activation_checkpointing=full"]
    cfg = resolve_config("demo", None, base)
    root = B.synthetic_dataset_dir(cfg, is_main=True, barrier=lambda: None)
    vocab = len(B.build_tokenizer(cfg, root))
    llm = _tied_llm(tmp / "tied-llm", vocab - 2)
    return base + [f"model.llm={llm}", "model.dtype=bfloat16", "model.trainable_dtype=float32"], \
        root


class _Shapes(TorchDispatchMode):
    """The shapes of every tensor that got storage (shards: their local shape)."""

    def __init__(self):
        super().__init__()
        self.seen: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                t = getattr(t, "_local_tensor", t)
                if not t.is_meta:
                    self.seen.add(tuple(t.shape))
        return out


def _worker(rank, world, port, overrides, root, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    from olavlm.train.parallel import apply_parallelism, init_distributed
    from olavlm.train.stages import apply_stage

    cfg = resolve_config("demo", None, overrides)
    d = init_distributed("cpu", "gloo")
    torch.manual_seed(0)
    tokenizer = B.build_tokenizer(cfg, root)
    mode = L.load_mode(cfg.parallel, world)
    shapes = _Shapes()
    with shapes:  # everything before the weights are sent
        model = B.build_model(cfg, tokenizer, out_dir, is_main=d.is_main, barrier=dist.barrier,
                              meta=mode == "rank0" and not d.is_main)
        built_on_meta = [p.is_meta for p in model.llm.parameters()]
        apply_stage(model, "pt")
        loading = L.prepare(model, mode, d)
        before = {k: v.clone() for k, v in model.state_dict().items()} if d.is_main else {}
        rng = torch.get_rng_state()
        apply_parallelism(model, cfg.parallel, d)
    L.finish(model, loading, d.device)

    def clean(name):
        return name.replace("_checkpoint_wrapped_module.", "")

    params = {clean(n): (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
              for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 60, (2, 20), generator=g)
    ids[:, 2] = -200
    size = model.vision_tower.image_size
    images = torch.randn(2, 3, size, size, generator=g)
    model.eval()
    with torch.no_grad():
        out = model(ids, torch.ones_like(ids, dtype=torch.bool), ids.clone(), images,
                    torch.ones(2, dtype=torch.long), return_predictions=True)
    llm = model.llm
    torch.save({
        "mode": mode, "built_on_meta": built_on_meta, "llm_bytes": loading.llm_bytes,
        "seen": shapes.seen, "before": before, "rng": rng, "params": params,
        "flags": {clean(n): (str(p.dtype), p.requires_grad, tuple(p.shape))
                  for n, p in model.named_parameters()},
        "buffers": {clean(n): b.clone() for n, b in model.named_buffers()},
        "tied": llm.get_output_embeddings().weight is llm.get_input_embeddings().weight,
        "taps": bool(model._taps.handles), "loss": out.loss,
        "predictions": out.predictions, "embed_shape": tuple(before.get(
            "llm.model.embed_tokens.weight", torch.empty(0)).shape),
    }, out_dir / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)



@pytest.mark.distributed
def test_meta_rank_ends_with_rank0_parameters_and_buffers(tmp_path):
    overrides, root = _setup(tmp_path)
    mp.spawn(_worker, args=(2, free_port(), overrides, root, tmp_path), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["mode"] == r1["mode"] == "rank0"
    # Rank 1 never held the LLM: built on meta, and no tensor of the full embedding or MLP
    # shape got storage before sharding (rank 0, which loads for real, shows the check sees).
    assert all(r1["built_on_meta"]) and r1["llm_bytes"] == 0
    assert not any(r0["built_on_meta"]) and r0["llm_bytes"] > 0
    full = {r0["embed_shape"], (FFN, HIDDEN), (HIDDEN, FFN)}
    assert full <= r0["seen"]
    assert not full & r1["seen"]
    torch.testing.assert_close(r1["rng"], r0["rng"], rtol=0, atol=0)
    # Parameters (values, dtypes, requires_grad, shapes) and every buffer equal rank 0's, and
    # rank 0's are what it built.
    assert r1["flags"] == r0["flags"]
    assert set(r1["params"]) == set(r0["params"])
    for name, value in r0["params"].items():
        assert torch.equal(r1["params"][name], value), name
        assert torch.equal(r0["before"][name], value), name
    assert set(r1["buffers"]) == set(r0["buffers"])
    assert "llm.model.rotary_emb.inv_freq" in r0["buffers"]
    for name, value in r0["buffers"].items():
        assert r1["buffers"][name].dtype == value.dtype and torch.equal(r1["buffers"][name],
                                                                        value), name
    flags = r0["flags"]
    assert flags["llm.model.layers.0.mlp.down_proj.weight"][:2] == ("torch.bfloat16", False)
    assert flags["mm_projector.0.weight"][:2] == ("torch.float32", True)
    assert flags["gen_logit_scale"] == ("torch.float32", True, (1,))
    assert r0["embed_shape"][0] == len(r0["before"]["llm.model.embed_tokens.weight"])
    assert r0["tied"] and r1["tied"] and r0["taps"] and r1["taps"]
    # The same forward (RoPE's non-persistent inv_freq included) and the heads' predictions.
    assert torch.equal(r1["loss"], r0["loss"])
    assert {t: set(p) for t, p in r1["predictions"].items()} == \
        {t: set(p) for t, p in r0["predictions"].items()} and set(r0["predictions"]) == \
        {"gen", "depth", "seg"}
    for task, layers in r0["predictions"].items():
        for k, pred in layers.items():
            assert torch.equal(r1["predictions"][task][k], pred), (task, k)


@pytest.mark.parametrize("llm", ["tied", "tiny:phi3", "tiny:qwen2"])
def test_meta_build_has_the_structure_of_the_real_one(tmp_path, llm):
    overrides, root = _setup(tmp_path)
    cfg = resolve_config("demo", None, overrides + ([] if llm == "tied" else [f"model.llm={llm}"]))
    tokenizer = B.build_tokenizer(cfg, root)
    built = [B.build_model(cfg, tokenizer, tmp_path, is_main=True, barrier=lambda: None,
                           meta=meta) for meta in (False, True)]
    real, meta = built
    assert L.structure(meta) == L.structure(real)
    assert all(p.is_meta for p in meta.llm.parameters())
    assert not any(p.is_meta for p in meta.vision_tower.parameters())
    assert meta.llm.get_input_embeddings().num_embeddings == len(tokenizer)
    for k in meta._taps.layers:  # the layer taps are on the meta model's own blocks
        assert meta.parts.layers[k - 1]._ola_taps is meta._taps
    assert meta.llm.training is real.llm.training is False  # as from_pretrained leaves it
    # A difference is reported by name.
    rows = L.structure(real)
    changed = [r if r[1] != "gen_logit_scale" else (*r[:3], "torch.bfloat16", *r[4:])
               for r in rows]
    message = L._difference(rows, changed)
    assert "gen_logit_scale" in message and "torch.float32" in message
    assert L._difference(rows, rows) is None


def test_load_mode():
    assert L.load_mode(ParallelConfig(), 1) == "every_rank"  # one process: unchanged
    assert L.load_mode(ParallelConfig(), 2) == "rank0"
    assert L.load_mode(ParallelConfig(load="every_rank"), 2) == "every_rank"
    assert L.load_mode(ParallelConfig(fsdp="off"), 1) == "every_rank"  # nothing sharded
    # No FSDP and no DDP over two processes: two unsynchronized copies, refused.
    with pytest.raises(ValueError, match="parallel.fsdp=off with 2 processes would train 2 "
                                         "unsynchronized copies"):
        L.load_mode(ParallelConfig(fsdp="off"), 2)
    with pytest.raises(ValueError, match="parallel.load must be rank0 or every_rank"):
        L.load_mode(ParallelConfig(load="rank_0"), 2)
