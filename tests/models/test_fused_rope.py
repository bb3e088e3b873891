# The fused-RoPE attention runs the decoder's own attention code with olakernels' RoPE.
from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

import olavlm.models.fused_rope as fused_rope
from olavlm.models.fused_rope import FusedRopeAttention, make_attention_rope_fused

KINDS = {
    "llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
    "qwen3": tf.Qwen3Config, "phi3": tf.Phi3Config,
}


def _decoder(kind: str, dtype=torch.float32, **extra) -> torch.nn.Module:
    config = KINDS[kind](hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         vocab_size=40, pad_token_id=0, **extra)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(dtype)


@pytest.fixture
def count_calls(monkeypatch):
    calls = []
    real = fused_rope.rotary_embedding

    def counting(*args, **kwargs):
        calls.append(kwargs.get("impl"))
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_rope, "rotary_embedding", counting)
    return calls


def _run(model, x, impl=None):
    for m in model.modules():
        if impl is not None and isinstance(m, FusedRopeAttention):
            m.rope_impl = impl
    xi = x.clone().requires_grad_(True)
    out = model.model(inputs_embeds=xi, use_cache=False).last_hidden_state
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(out.dtype))
    return out, xi.grad


@pytest.mark.parametrize("kind", list(KINDS))
def test_same_outputs_and_gradients_as_the_decoder(kind, count_calls):
    eager = _decoder(kind)
    fused = copy.deepcopy(eager)
    keys = set(fused.state_dict())
    assert make_attention_rope_fused(fused) == 2
    assert make_attention_rope_fused(fused) == 0  # idempotent
    assert set(fused.state_dict()) == keys
    x = torch.randn(2, 11, 64, generator=torch.Generator().manual_seed(1))
    want, want_grad = _run(eager, x)
    assert count_calls == []
    # impl "auto" on the CPU is the same formula: bit-identical to the decoder's own code.
    got, got_grad = _run(fused, x)
    assert count_calls == ["auto", "auto"]  # one fused call per block, none elsewhere
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)
    # The Triton kernel (interpreter): fp32 math, one rounding.
    got, got_grad = _run(fused, x, impl="triton")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-5)


def test_partial_rotary_falls_back_to_the_decoders_function(count_calls):
    eager = _decoder("phi3", partial_rotary_factor=0.5)
    fused = copy.deepcopy(eager)
    make_attention_rope_fused(fused)
    x = torch.randn(2, 7, 64)
    want, want_grad = _run(eager, x)
    got, got_grad = _run(fused, x, impl="triton")
    assert count_calls == []  # cos covers half the head: the original function ran
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)


def test_switch_off_and_generation_run_the_library_code(count_calls):
    model = _decoder("llama")
    make_attention_rope_fused(model)
    ids = torch.randint(1, 40, (2, 5))
    out = model.generate(ids, max_new_tokens=3, do_sample=False)  # KV cache: eager RoPE
    assert count_calls == [] and out.shape == (2, 8)
    for m in model.modules():
        if isinstance(m, FusedRopeAttention):
            m.fused_rope = False
    model(ids)
    assert count_calls == []


def test_activation_checkpointing_recomputes_through_the_fused_rope(count_calls):
    from torch.utils.checkpoint import checkpoint

    model = _decoder("llama")
    make_attention_rope_fused(model)
    for m in model.modules():
        if isinstance(m, FusedRopeAttention):
            m.rope_impl = "triton"
    x = torch.randn(2, 9, 64)
    want, want_grad = _run(model, x)
    layers = model.model.layers
    originals = [layer.forward for layer in layers]
    for layer, forward in zip(layers, originals, strict=True):
        layer.forward = lambda *a, f=forward, **k: checkpoint(f, *a, use_reentrant=False, **k)
    count_calls.clear()
    got, got_grad = _run(model, x)
    assert count_calls == ["triton"] * 4  # 2 blocks, forward and recompute
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)


def test_bf16_triton_close_to_float64():
    from olakernels.testing import assert_close_to_reference

    eager = _decoder("llama")
    ref64, ref_grad = _run(copy.deepcopy(eager).double(),
                           torch.randn(2, 13, 64, generator=torch.Generator().manual_seed(3))
                           .double())
    x = torch.randn(2, 13, 64, generator=torch.Generator().manual_seed(3)).bfloat16()
    eager_bf16 = copy.deepcopy(eager).bfloat16()
    fused = copy.deepcopy(eager_bf16)
    make_attention_rope_fused(fused)
    want, want_grad = _run(eager_bf16, x)
    got, got_grad = _run(fused, x, impl="triton")
    assert_close_to_reference(got, ref64, want, name="decoder out", k=2.0, reduction_size=64)
    assert_close_to_reference(got_grad, ref_grad, want_grad, name="grad inputs", k=2.0,
                              reduction_size=64)


def test_other_rotations_are_left_alone():
    # Cohere rotates interleaved pairs, GPT-J has another signature: not the half rotation.
    cohere = tf.AutoModelForCausalLM.from_config(tf.CohereConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=40))
    gptj = tf.AutoModelForCausalLM.from_config(tf.GPTJConfig(
        n_embd=64, n_layer=1, n_head=4, rotary_dim=8, vocab_size=40, n_positions=32))
    assert make_attention_rope_fused(cohere) == 0 and make_attention_rope_fused(gptj) == 0
    assert make_attention_rope_fused(_decoder("phi3")) == 2  # Phi-3's own (partial) function


def test_tables_of_another_dtype_run_the_decoders_function(count_calls):
    import transformers.models.llama.modeling_llama as modeling

    model = _decoder("llama", torch.bfloat16)
    make_attention_rope_fused(model)
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 3, 16).bfloat16()
    k = torch.randn(1, 2, 3, 16).bfloat16()
    cos, sin = torch.randn(2, 1, 3, 16)  # fp32 tables (autocast): HF promotes to fp32
    rope = attn._forward_fused_rope.__globals__["apply_rotary_pos_emb"]
    got = rope(q, k, cos, sin)
    want = modeling.apply_rotary_pos_emb(q, k, cos, sin)
    assert count_calls == [] and all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_pickle_and_deepcopy_rebuild_the_class(tmp_path):
    model = _decoder("qwen2")
    make_attention_rope_fused(model)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    attn = loaded.model.layers[1].self_attn
    assert isinstance(attn, FusedRopeAttention) and type(attn) is type(
        model.model.layers[1].self_attn)
    x = torch.randn(1, 5, 64)
    assert torch.equal(_run(loaded, x)[0], _run(model, x)[0])
    assert isinstance(copy.deepcopy(model).model.layers[0].self_attn, FusedRopeAttention)


SCALED_ROPE = {  # the rope_scaling of the real decoders (Llama-3.1, Phi-3-mini-128k) and others
    "llama3": ("llama", dict(max_position_embeddings=131072, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})),
    "longrope": ("phi3", dict(max_position_embeddings=64, rope_scaling={
        "rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
        "long_factor": [2.0 + 0.1 * i for i in range(8)], "original_max_position_embeddings": 8})),
    "dynamic": ("llama", dict(max_position_embeddings=8,
                              rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
}


@pytest.mark.parametrize("name", list(SCALED_ROPE))
def test_scaled_rope_and_left_padded_positions_equal_the_decoder(name, count_calls):
    """Scaled tables (longrope's attention factor too) and per-sample positions that do not
    start at 0 (left padding), past the original context (longrope's long factors, dynamic's
    update): the fused model's logits and parameter gradients are the decoder's."""
    kind, extra = SCALED_ROPE[name]
    eager = _decoder(kind, **extra)
    fused = copy.deepcopy(eager)
    make_attention_rope_fused(fused)
    ids = torch.randint(1, 40, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :4] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def run(model, impl=None):
        for m in model.modules():
            if impl is not None and isinstance(m, FusedRopeAttention):
                m.rope_impl = impl
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                       use_cache=False).logits
        logits.pow(2).sum().backward()
        return logits, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    want, want_grads = run(eager)
    for impl in ("auto", "triton"):
        count_calls.clear()
        got, got_grads = run(fused, impl)
        assert count_calls == [impl, impl]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for a, b in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
