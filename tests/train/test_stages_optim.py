# What each stage trains, the optimizer's groups and the schedule's shape.
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from tiny_ola import StandInTower, tiny_model  # noqa: E402

from olavlm.config import OptimConfig  # noqa: E402
from olavlm.train.optim import build_optimizer, build_scheduler, parameter_groups  # noqa: E402
from olavlm.train.stages import apply_stage, trainable_report  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("stages"), tower=StandInTower())


def _trained(model):
    return {name for name, trainable, _ in trainable_report(model) if trainable}


def test_pretraining_trains_projector_heads_tokens_and_scales_only(model):
    apply_stage(model, "pt")
    assert _trained(model) == {"mm_projector", "task_tokens", "image_gen_heads",
                               "image_depth_heads", "image_seg_heads", "gen_logit_scale",
                               "depth_logit_scale", "seg_logit_scale"}
    assert not any(p.requires_grad for p in model.llm.parameters())
    assert not any(p.requires_grad for p in model.vision_tower.parameters())


@pytest.mark.parametrize("stage", ["vpt", "ift"])
def test_instruction_stages_train_llm_and_projector(model, stage):
    apply_stage(model, stage)
    assert _trained(model) == {"llm", "mm_projector"}
    assert not model.task_tokens.special_depth_tokens.requires_grad


def test_unknown_stage(model):
    with pytest.raises(ValueError, match="train.stage must be one of"):
        apply_stage(model, "sft")


def test_groups_lrs_and_no_decay_on_biases_norms_scalars(model):
    apply_stage(model, "pt")
    cfg = OptimConfig(lr=1e-3, projector_lr=2e-3, head_lr=5e-4, weight_decay=0.1)
    groups = parameter_groups(model, cfg)
    by = {(g["role"], g["weight_decay"] > 0): g for g in groups}
    assert by[("projector", True)]["lr"] == 2e-3 and by[("heads", True)]["lr"] == 5e-4
    no_decay = [n for g in groups if g["weight_decay"] == 0 for n in g["names"]]
    decay = [n for g in groups if g["weight_decay"] > 0 for n in g["names"]]
    assert "mm_projector.0.bias" in no_decay and "gen_logit_scale" in no_decay
    assert any("norm" in n for n in no_decay)
    assert "mm_projector.0.weight" in decay
    assert not any(n.endswith(".bias") or "norm" in n for n in decay)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups for p in g["params"]) == n_trainable
    # None means "lr"; 0 is a learning rate of 0 (a frozen group's updates), not "unset".
    zero = {g["role"]: g["lr"] for g in parameter_groups(
        model, OptimConfig(lr=1e-3, projector_lr=0.0, head_lr=0.0))}
    assert zero["projector"] == 0.0 and zero["heads"] == 0.0
    unset = {g["role"]: g["lr"] for g in parameter_groups(model, OptimConfig(lr=1e-3))}
    assert unset["projector"] == 1e-3 and unset["heads"] == 1e-3


def test_cosine_schedule_with_warmup():
    p = torch.nn.Parameter(torch.zeros(2))
    cfg = OptimConfig(lr=1.0, warmup_ratio=0.1)
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = build_scheduler(opt, cfg, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    # HF's get_cosine_schedule_with_warmup, as the seed (SPEC 5.1): step / warm-up steps
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(0.1) and lrs[9] == pytest.approx(0.9)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lrs[-1] < 0.01 and all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


@pytest.mark.parametrize(("total", "ratio"), [(2180, 0.03), (100, 0.1), (7, 0.34), (5, 0.0)])
def test_the_schedule_is_hf_cosine_with_warmup(total, ratio):
    """The seed trains with HF's get_cosine_schedule_with_warmup (SPEC 5.1): every step's lr
    equals it (warm-up steps = ceil(ratio x total); the first one at lr 0)."""
    from transformers import get_cosine_schedule_with_warmup

    ours_opt, hf_opt = (torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
                        for _ in range(2))
    ours = build_scheduler(ours_opt, OptimConfig(lr=1.0, warmup_ratio=ratio), total)
    hf = get_cosine_schedule_with_warmup(hf_opt, math.ceil(ratio * total), total)
    for _ in range(total):
        assert ours.get_last_lr() == pytest.approx(hf.get_last_lr(), abs=1e-12)
        ours_opt.step(), hf_opt.step(), ours.step(), hf.step()


def test_fused_on_needs_cuda(model):
    apply_stage(model, "pt")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        build_optimizer(model, OptimConfig(fused="on"), torch.device("cpu"))
    opt = build_optimizer(model, OptimConfig(), torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)


def test_pad_token_added_and_embeddings_grown_like_the_seed(tmp_path):
    from transformers import AutoTokenizer

    from olavlm.data.synthetic import write_synthetic_dataset
    from olavlm.models.llm import load_llm
    from olavlm.models.tiny_llm import build_tiny_llm
    from olavlm.train.build import ensure_pad_token, resize_embeddings_like_seed

    write_synthetic_dataset(tmp_path / "d", 4, size=32)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "d" / "tokenizer"))
    assert not ensure_pad_token(tok)  # it has one
    tok.pad_token = None
    assert ensure_pad_token(tok) and tok.pad_token == "<pad>"
    llm = load_llm(build_tiny_llm("llama", tmp_path / "llm", vocab_size=40, hidden_size=16,
                                  num_layers=1, num_heads=2, num_kv_heads=1))
    before_in = llm.get_input_embeddings().weight.detach().clone()
    before_out = llm.get_output_embeddings().weight.detach().clone()
    assert resize_embeddings_like_seed(llm, 42) == 2
    for now, before in ((llm.get_input_embeddings().weight, before_in),
                        (llm.get_output_embeddings().weight, before_out)):
        assert now.shape[0] == 42 and torch.equal(now[:40], before)
        torch.testing.assert_close(now[40:], before.mean(0, keepdim=True).expand(2, -1))
    assert resize_embeddings_like_seed(llm, 42) == 0


@pytest.mark.parametrize("grad_clip", [0.0, 1e-3])
def test_gradient_clipping_returns_the_norm_and_leaves_gradients_alone_when_off(model,
                                                                                grad_clip):
    # optim.grad_clip=0 (off) measures the norm without a pass that rewrites every gradient
    # (clip_grad_norm_ with an infinite limit multiplied them all by 1); on, they are scaled.
    from types import SimpleNamespace

    from olavlm.train.trainer import Trainer

    torch.manual_seed(0)
    params = [p for p in model.parameters()][:6]
    for p in model.parameters():
        p.grad = None
    for p in params:
        p.grad = torch.randn_like(p)
    before = [(p.grad.clone(), p.grad._version) for p in params]
    fake = SimpleNamespace(model=model, dist=SimpleNamespace(device=torch.device("cpu")),
                           cfg=SimpleNamespace(optim=SimpleNamespace(grad_clip=grad_clip)))
    norm = Trainer._clip(fake)
    want = math.sqrt(sum(float(g.double().pow(2).sum()) for g, _ in before))
    assert math.isclose(float(norm), want, rel_tol=1e-5)
    for p, (g, version) in zip(params, before, strict=True):
        if grad_clip == 0:
            assert p.grad._version == version and torch.equal(p.grad, g)
        else:
            torch.testing.assert_close(p.grad, g * (grad_clip / (want + 1e-6)))
    for p in params:
        p.grad = None
