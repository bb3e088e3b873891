# The performance switches change how the model computes, not what (CPU checks).
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from tiny_ola import StandInTower, tiny_batch, tiny_model  # noqa: E402

from olavlm.train.parallel import (  # noqa: E402
    apply_activation_checkpointing,
    apply_compile,
    apply_float8,
    apply_liger,
    sdpa_context,
)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    m = tiny_model(tmp_path_factory.mktemp("switches"), tower=StandInTower())
    m.llm.requires_grad_(False)  # pre-training
    return m


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(*batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                               if p.grad is not None}


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_gives_identical_results(model, mode):
    batch = tiny_batch(model, batch=3, pad_from=[None, 18, None])
    loss, grads = _loss_and_grads(model, batch)
    wrapped = copy.deepcopy(model)
    count = apply_activation_checkpointing(wrapped, mode)
    assert count == (4 if mode == "full" else 2)
    loss_ac, grads_ac = _loss_and_grads(wrapped, batch)
    assert torch.equal(loss_ac, loss)
    assert set(grads_ac) == set(grads)  # trainable in PT: projector, heads, tokens, scales
    for name, g in grads.items():
        assert torch.equal(grads_ac[name], g), name
    with pytest.raises(ValueError, match="activation_checkpointing must be"):
        apply_activation_checkpointing(copy.deepcopy(model), "some")


def test_float8_converts_the_decoder_linears_and_trains(model):
    pytest.importorskip("torchao")
    batch = tiny_batch(model, batch=3)
    loss, _ = _loss_and_grads(model, batch)
    f8 = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="numerics only"):
        count = apply_float8(f8, "tensorwise", torch.device("cpu"))
    assert count == 4 * 7  # q, k, v, o, gate, up, down in each of the 4 blocks
    loss8, grads8 = _loss_and_grads(f8, batch)
    assert torch.isfinite(loss8) and all(torch.isfinite(g).all() for g in grads8.values())
    # e4m3 keeps ~2 significant digits: the loss moves, but stays close.
    assert abs(float(loss8) - float(loss)) < 0.05 * float(loss)


def test_liger_needs_a_gpu(model):
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        apply_liger(copy.deepcopy(model), torch.device("cpu"))


def test_liger_swaps_norms_and_mlps_as_modules_with_their_weights(model):
    """liger's kernels do not run in the interpreter; the swap itself is checked here (a
    stand-in CUDA device passes the device check), the numerics by its own test suite."""
    pytest.importorskip("liger_kernel")

    class FakeCuda:
        type = "cuda"

    swapped = copy.deepcopy(model)
    assert apply_liger(swapped, FakeCuda()) == 4 * 3 + 1  # 2 norms + MLP per block, final norm
    for old, new in zip(model.parts.layers, swapped.llm.get_decoder().layers, strict=True):
        assert type(new.mlp).__name__ == "LigerSwiGLUMLP"
        assert type(new.input_layernorm).__name__ == "LigerRMSNorm"
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(getattr(new.mlp, name).weight, getattr(old.mlp, name).weight)
        assert torch.equal(new.post_attention_layernorm.weight,
                           old.post_attention_layernorm.weight)
    # The LLM's own forward is untouched: only submodules were replaced.
    assert type(swapped.llm).forward is type(model.llm).forward


def test_sdpa_backend_choice(model):
    batch = tiny_batch(model, batch=2)
    with torch.no_grad():
        ref = model(*batch).loss
        with sdpa_context("math"):
            math_loss = model(*batch).loss
    torch.testing.assert_close(math_loss, ref)
    with pytest.raises(ValueError, match="sdpa_backend must be"):
        with sdpa_context("fastest"):
            pass


@pytest.mark.slow
def test_per_block_compile_matches_eager(model):
    batch = tiny_batch(model, batch=2)
    loss, grads = _loss_and_grads(model, batch)
    compiled = copy.deepcopy(model)
    apply_compile(compiled)
    loss_c, grads_c = _loss_and_grads(compiled, batch)
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_single_process_group_ignores_a_stray_master_addr():
    """SLURM shells export MASTER_ADDR/MASTER_PORT: a process not started by torchrun (no
    RANK) must still get its private 1-rank group, not an env:// rendezvous that fails."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(MASTER_ADDR="10.255.255.1", MASTER_PORT="1")
    code = ("import torch.distributed as dist\n"
            "from olavlm.train.parallel import init_distributed\n"
            "init_distributed('cpu', 'gloo', single_group=True)\n"
            "print('world', dist.get_world_size())\n"
            "dist.destroy_process_group()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "world 1" in proc.stdout
