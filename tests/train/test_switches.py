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


def test_liger_keeps_mlps_its_swiglu_cannot_compute(model):
    """LigerSwiGLUMLP has no biases and only SiLU: an MLP with a biased projection
    (mlp_bias=True) or a GELU one keeps its own module instead of failing (a load_state_dict
    key error, liger's activation error) or dropping the bias."""
    pytest.importorskip("liger_kernel")

    class FakeCuda:
        type = "cuda"

    biased = copy.deepcopy(model)
    gate = biased.parts.layers[0].mlp.gate_proj
    gate.bias = torch.nn.Parameter(torch.ones(gate.out_features))
    assert apply_liger(biased, FakeCuda()) == 4 * 3 + 1 - 1
    assert biased.llm.get_decoder().layers[0].mlp.gate_proj.bias is gate.bias
    gelu = copy.deepcopy(model)
    gelu.parts.layers[0].mlp.config.hidden_act = "gelu_pytorch_tanh"  # (shared by the blocks)
    assert apply_liger(gelu, FakeCuda()) == 4 * 2 + 1  # the norms alone


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


# ---- switches against the switch off: losses, gradients, combinations, errors, resume ----------


def _seeded_model(tmp, dtype=torch.float32, frozen=False, **overrides):
    torch.manual_seed(1)  # (the stand-in tower draws from the global RNG)
    m = tiny_model(tmp, tower=StandInTower(), impl="torch", **overrides).to(dtype)
    m.llm.requires_grad_(not frozen)  # frozen: pre-training, no decoder parameter needs one
    return m


def _accumulated(model, batches):
    """One optimizer step's gradients over micro-batches (grad_accum = len(batches)), keyed
    without the wrappers' prefixes."""
    model.zero_grad(set_to_none=True)
    losses = []
    for batch in batches:
        out = model(*batch)
        (out.loss / len(batches)).backward()
        losses.append(out.loss.detach())
    return losses, {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
                    for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable_llm", "frozen_llm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_checkpointing_is_bit_identical_over_an_accumulated_step(tmp_path, dtype, frozen):
    """Full and selective checkpointing, 2 micro-batches: the same losses and gradients bit for
    bit (the heads read the tapped blocks' states: their gradients check the taps)."""
    base = _seeded_model(tmp_path, dtype, frozen)
    batches = [tiny_batch(base, batch=3, pad_from=[None, 18, None], seed=s, dtype=dtype)
               for s in (0, 1)]
    losses, grads = _accumulated(base, batches)
    assert any(n.startswith("llm.") for n in grads) != frozen
    for mode in ("full", "selective"):
        wrapped = copy.deepcopy(base)
        apply_activation_checkpointing(wrapped, mode)
        losses_ac, grads_ac = _accumulated(wrapped, batches)
        assert all(torch.equal(a, b) for a, b in zip(losses_ac, losses, strict=True)), mode
        assert set(grads_ac) == set(grads), mode
        for name, g in grads.items():
            assert torch.equal(grads_ac[name], g), (mode, name)


def test_checkpointing_replays_the_forwards_dropout(tmp_path):
    """A decoder trained with attention dropout: the recompute must draw the forward's masks,
    or the gradients are not those of the loss (they were off by up to 80%)."""
    base = _seeded_model(tmp_path)
    for m in base.llm.modules():
        if hasattr(m, "attention_dropout"):  # (HF attention applies it functionally)
            m.attention_dropout = 0.3
    base.train()
    batches = [tiny_batch(base, batch=3, pad_from=[None, 18, None])]
    torch.manual_seed(5)
    losses, grads = _accumulated(base, batches)
    wrapped = copy.deepcopy(base)
    apply_activation_checkpointing(wrapped, "full")
    torch.manual_seed(5)
    losses_ac, grads_ac = _accumulated(wrapped, batches)
    assert torch.equal(losses_ac[0], losses[0])
    for name, g in grads.items():
        assert torch.equal(grads_ac[name], g), name


@pytest.mark.slow
@pytest.mark.parametrize("mode,dtype,frozen", [("selective", torch.bfloat16, False),
                                               ("full", torch.float32, True)],
                         ids=["selective_bf16", "full_fp32_frozen"])
def test_compile_with_checkpointing_compiles_every_block(tmp_path, mode, dtype, frozen):
    """Per-block compile over checkpointed blocks (lean_mlp, lean_norm and fused_rope on, the
    defaults): the layer taps' hooks stored from inside the checkpoint, a side effect that
    made torch.compile give up on every checkpointed block (a graph break, eager blocks, a log
    saying "compiled_blocks"). Numbers: as eager's, within eager's own error (bf16, against
    the float64 model) or fp32 rounding."""
    from torch._dynamo.utils import counters

    from olakernels.testing import assert_close_to_reference

    base = _seeded_model(tmp_path, dtype, frozen)
    batches = [tiny_batch(base, batch=3, pad_from=[None, 18, None], seed=s, dtype=dtype)
               for s in (0, 1)]
    losses, grads = _accumulated(base, batches)
    compiled = copy.deepcopy(base)
    apply_activation_checkpointing(compiled, mode)
    apply_compile(compiled)
    torch._dynamo.reset()
    counters.clear()
    losses_c, grads_c = _accumulated(compiled, batches)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1
    assert set(grads_c) == set(grads)
    if dtype == torch.float32:
        for a, b in zip(losses_c, losses, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for name, g in grads.items():
            torch.testing.assert_close(grads_c[name], g, rtol=1e-4, atol=1e-6, msg=name)
        return
    oracle = copy.deepcopy(base).double()
    as64 = [tuple({k: v.double() for k, v in t.items()} if isinstance(t, dict) else
                  t.double() if t.is_floating_point() else t for t in batch)
            for batch in batches]
    losses64, grads64 = _accumulated(oracle, as64)
    for i, (got, eager) in enumerate(zip(losses_c, losses, strict=True)):
        assert_close_to_reference(got, losses64[i], eager, name=f"loss {i}")
    for name, g in grads64.items():
        assert_close_to_reference(grads_c[name], g, grads[name], name=name)


def test_float8_refuses_rocm_gpus_before_mi300(monkeypatch, model):
    """ROCm's float8 matmuls need MI300/MI350 (gfx94x/gfx95x); an MI250X (gfx90a, which ROCm
    reports as capability 9.0) failed only inside the first step."""
    pytest.importorskip("torchao")
    from types import SimpleNamespace

    arch = {"name": "gfx90a:sramecc+:xnack-"}
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(gcnArchName=arch["name"]))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "AMD Instinct MI250X")
    with pytest.raises(ValueError, match=r"parallel.float8=rowwise needs .*MI250X \(gfx90a\)"):
        apply_float8(copy.deepcopy(model), "rowwise", torch.device("cuda", 0))
    arch["name"] = "gfx942:sramecc+:xnack-"  # MI300X
    assert apply_float8(copy.deepcopy(model), "rowwise", torch.device("cuda", 0)) == 4 * 7


def _train_cfg(tmp_path, *overrides):
    from olavlm.config import resolve_config

    base = [f"train.output_dir={tmp_path / 'runs'}", f"data.synthetic_dir={tmp_path / 'synth'}",
            "data.synthetic_num=16", "data.batch_size=4", "logging.progress=false",
            "logging.plot=false", "train.run_name=r"]
    return resolve_config("demo", None, base + list(overrides))


@pytest.mark.parametrize("switch,match", [
    ("parallel.liger=true", "parallel.liger=true needs a CUDA GPU"),
    ("parallel.sdpa_backend=efficient", "parallel.sdpa_backend=efficient needs a CUDA GPU"),
    ("parallel.sdpa_backend=cudnn", "parallel.sdpa_backend=cudnn needs a CUDA GPU"),
    ("optim.fused=on", "optim.fused=on needs a CUDA device"),
    ("optim.fused=apex", "optim.fused=apex needs a CUDA device"),
    ("model.attn_implementation=flash_attention_2",
     "model.attn_implementation=flash_attention_2 needs a CUDA GPU"),
])
def test_switches_this_device_cannot_run_fail_before_any_work(tmp_path, switch, match):
    """Refused with the key before the dataset, model or teachers are built (the SDPA backends
    failed inside the first step with PyTorch's 'No viable backend', liger after the model,
    data and teachers were built), and no run folder is left."""
    from olavlm.train.trainer import Trainer

    with pytest.raises(ValueError, match=match):
        Trainer(_train_cfg(tmp_path, "train.device=cpu", switch))
    assert not (tmp_path / "synth").exists()
    assert not (tmp_path / "runs" / "r").exists()


def test_flash_attention_needs_the_package_and_half_precision(tmp_path, monkeypatch):
    # On a CUDA device (faked: only the checks run): flash-attn missing, then installed but
    # asked to compute in fp32, each refused naming the key; bf16 compute passes.
    from olavlm.train import parallel

    cuda = torch.device("cuda")
    cfg = _train_cfg(tmp_path, "model.attn_implementation=flash_attention_2")
    monkeypatch.setattr(parallel, "_installed", lambda module: module != "flash_attn")
    with pytest.raises(ValueError, match=r"flash_attention_2 needs the flash-attn package "
                                         r"\(pip install flash-attn --no-build-isolation\)"):
        parallel.check_switches(cfg, cuda)
    monkeypatch.setattr(parallel, "_installed", lambda module: True)
    cfg.model.dtype, cfg.parallel.mixed_precision = "float32", "fp32"
    with pytest.raises(ValueError, match="computes in fp16/bf16 only"):
        parallel.check_switches(cfg, cuda)
    cfg.parallel.mixed_precision = "bf16"  # FSDP2 computes in bf16 over fp32 weights
    parallel.check_switches(cfg, cuda)
    cfg.model.dtype, cfg.parallel.mixed_precision = "bfloat16", "fp32"
    parallel.check_switches(cfg, cuda)


@pytest.mark.parametrize("switches,world", [
    (("parallel.fsdp=on",), 1), (("parallel.fsdp=auto",), 2)])
def test_flash_attention_refuses_a_half_precision_llm_that_fsdp2_computes_in_fp32(
        tmp_path, monkeypatch, switches, world):
    # A bf16-stored LLM under FSDP2 with parallel.mixed_precision=fp32 computes in fp32 (the
    # policy's param_dtype casts the gathered weights up), which flash-attn cannot take: it
    # failed inside the first step, after the model, data and teachers were built.
    from olavlm.train import parallel

    monkeypatch.setattr(parallel, "_installed", lambda module: True)
    cfg = _train_cfg(tmp_path, "model.attn_implementation=flash_attention_2",
                     "model.dtype=bfloat16", "parallel.mixed_precision=fp32", *switches)
    with pytest.raises(ValueError, match=r"computes in fp16/bf16 only.*FSDP2"):
        parallel.check_switches(cfg, torch.device("cuda"), world)
    cfg.parallel.mixed_precision = "bf16"
    parallel.check_switches(cfg, torch.device("cuda"), world)


def test_an_sdpa_kernel_that_cannot_run_names_the_key(model):
    batch = tiny_batch(model, batch=2)
    with pytest.raises(RuntimeError, match="parallel.sdpa_backend=efficient: this SDPA kernel"):
        with torch.no_grad(), sdpa_context("efficient"):
            model(*batch)


def test_tf32_is_reported_with_the_other_switches(model):
    from olavlm.config import ParallelConfig
    from olavlm.train.parallel import DistInfo, apply_parallelism

    class FakeCuda:
        type = "cuda"

    done = apply_parallelism(copy.deepcopy(model), ParallelConfig(tf32=True),
                             DistInfo(device=FakeCuda()))
    assert "tf32" in done
    assert "tf32" not in apply_parallelism(copy.deepcopy(model), ParallelConfig(tf32=True),
                                           DistInfo())


@pytest.mark.slow
def test_a_compiled_checkpointed_run_resumes_and_exports_without_wrapper_prefixes(tmp_path):
    """A checkpoint of a run with compile and selective checkpointing on: its keys are the
    plain model's (no '_orig_mod.' / '_checkpoint_wrapped_module.'); a run with both off
    resumes from it and trains on; the export holds plain keys."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint import FileSystemReader

    from olavlm.train.export import export_checkpoint
    from olavlm.train.metrics import read_metrics
    from olavlm.train.trainer import Trainer

    common = ("train.stage=full", "optim.grad_accum=2", "checkpoint.every_steps=1")
    first = Trainer(_train_cfg(tmp_path, *common, "train.max_steps=1", "parallel.compile=true",
                               "parallel.activation_checkpointing=selective"))
    assert first.parallel_done["compiled_blocks"] == 4
    first.train()
    ckpt = first.checkpointer.latest()
    keys = list(FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)
    wrapped = [k for k in keys if "_orig_mod" in k or "_checkpoint_wrapped" in k]
    assert not wrapped, wrapped[:5]
    model_keys = {k.removeprefix("model.") for k in keys if k.startswith("model.")}
    resumed = Trainer(_train_cfg(tmp_path, *common, "train.max_steps=2"))
    assert resumed.step == 1 and "compiled_blocks" not in resumed.parallel_done
    assert model_keys == set(resumed.model.state_dict())
    resumed.train()
    rows = {r["step"]: r for r in read_metrics(resumed.run_dir)}
    assert set(rows) == {1, 2} and torch.isfinite(torch.tensor(rows[2]["loss"]))
    out = export_checkpoint(ckpt, tmp_path / "export")
    for f in Path(out).rglob("*.safetensors"):
        bad = [k for k in load_file(str(f)) if "_orig_mod" in k or "_checkpoint_wrapped" in k]
        assert not bad, (f, bad[:5])


def test_the_models_own_switches_are_reported(tmp_path, model):
    """How many modules run lean_mlp / lean_norm / fused_rope, and the attention: a decoder
    whose code the swaps do not recognise keeps its own modules, which the log now shows."""
    from olavlm.config import ParallelConfig
    from olavlm.train.parallel import DistInfo, apply_parallelism

    done = apply_parallelism(copy.deepcopy(model), ParallelConfig(), DistInfo())
    assert done == {"lean_mlp_modules": 4, "lean_norm_modules": 9, "fused_rope_modules": 4,
                    "attention": "sdpa", "checkpointed_blocks": 0}  # 2 norms a block + final
    off = _seeded_model(tmp_path, lean_mlp=False, fused_rope=False, attn_implementation="eager")
    assert apply_parallelism(off, ParallelConfig(), DistInfo()) == {
        "lean_norm_modules": 9, "attention": "eager", "checkpointed_blocks": 0}
    reference = copy.deepcopy(model).set_impl("reference")  # (the seed's eager modules)
    assert apply_parallelism(reference, ParallelConfig(), DistInfo())["lean_mlp_modules"] == 0
