# Tests of embedding_distill_loss: triton and torch paths against the float64 seed reference.
import math
import re

import pytest
import torch

from olakernels import EmbeddingDistillLoss, embedding_distill_loss
from olakernels.testing import assert_close_to_reference, make_embedding_pair, make_sample_mask

# Realistic shapes, scaled down so the Triton interpreter stays fast. Each keeps its task's
# layout: gen is one embedding per sample, depth is tokens x channels, seg is channels x grid.
SHAPES = {
    "gen": (6, 1, 256),  # real: (B, 1, 1024)
    "depth": (4, 24, 64),  # real: (B, 576, 1024)
    "seg": (4, 48, 6, 6),  # real: (B, 1536, 24, 24)
    "ragged": (7, 13, 31),  # prime sizes: partial tiles everywhere
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FAST_IMPLS = ["triton", "torch"]


def _run(impl, pred, target, mask, logit_scale, **kw):
    """Forward + backward of one impl on fresh leaves; returns outputs and gradients."""
    pred = pred.detach().clone().requires_grad_(True)
    scale = None
    if logit_scale is not None:
        scale = logit_scale.detach().clone().requires_grad_(True)
    out = embedding_distill_loss(pred, target, mask, scale, impl=impl, **kw)
    out.loss.backward()
    return out, pred.grad, None if scale is None else scale.grad


def _check_against_oracle(impl, pred, target, mask, logit_scale, **kw):
    """Compare ``impl`` with the fp64 reference, budget k x the same-dtype eager error."""
    out, g_pred, g_scale = _run(impl, pred, target, mask, logit_scale, **kw)
    ls64 = None if logit_scale is None else logit_scale.double()
    ref, r_pred, r_scale = _run("reference", pred.double(), target.double(), mask, ls64, **kw)
    eager, e_pred, e_scale = _run("reference", pred, target, mask, logit_scale, **kw)
    numel = pred[0].numel()
    for name in ("loss", "smooth_l1", "contrastive"):
        assert_close_to_reference(
            getattr(out, name), getattr(ref, name), getattr(eager, name),
            name=f"{impl}.{name}", dtype=torch.float32, reduction_size=numel,
        )
    assert g_pred.dtype == pred.dtype
    assert_close_to_reference(g_pred, r_pred, e_pred, name=f"{impl}.grad_pred", k=3.0)
    if logit_scale is not None:
        assert_close_to_reference(
            g_scale, r_scale, e_scale, name=f"{impl}.grad_logit_scale", k=3.0,
            dtype=torch.float32, reduction_size=numel,
        )
    return out, g_pred, g_scale


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_reference(impl, dtype, shape, device):
    pred, target = make_embedding_pair(shape, dtype=dtype, device=device, seed=len(shape))
    mask = make_sample_mask(shape[0], "mixed", device=device)
    _check_against_oracle(impl, pred, target, mask, torch.tensor(2.0, device=device))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ["depth", "ragged"])
@pytest.mark.parametrize("defer", [True, False])
def test_deferred_row_sums_match_reference(defer, shape, dtype, device, monkeypatch):
    """The forward's row sums kept as (rows, BLOCK_D) tiles and reduced once after the loop
    (DEFER_ROW_SUMS, the default) and reduced every tile (False): the same results within the
    budget."""
    from olakernels.embedding_loss.impl import triton as emb_triton

    monkeypatch.setattr(emb_triton, "DEFER_ROW_SUMS", defer)
    launched = []
    kernel = emb_triton._embedding_distill_loss_fwd_kernel
    monkeypatch.setattr(emb_triton, "_embedding_distill_loss_fwd_kernel", type(
        "Spy", (), {"__getitem__": lambda self, grid: (
            lambda *a, **kw: launched.append(kw["DEFER_SUMS"]) or kernel[grid](*a, **kw))})())
    pred, target = make_embedding_pair(SHAPES[shape], dtype=dtype, device=device, seed=5)
    mask = make_sample_mask(pred.shape[0], "mixed", device=device)
    _check_against_oracle("triton", pred, target, mask, torch.tensor(2.0, device=device))
    assert launched == [defer]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(5, 11, 100), SHAPES["ragged"]], ids=["uneven", "ragged"])
@pytest.mark.parametrize("interleave", [True, False])
def test_column_split_layouts_match_reference(interleave, shape, dtype, device, monkeypatch):
    """The forward's programs take interleaved column blocks (INTERLEAVE_CHUNKS, the default)
    or one contiguous chunk each (False): the same results within the budget. D = 1,100 under
    the interpreter's 8 programs of 64 columns: two programs read 3 blocks (one partial), the
    others 2; the ragged D = 403 gives one block each and a partial last one."""
    from olakernels.embedding_loss.impl import triton as emb_triton

    monkeypatch.setattr(emb_triton, "INTERLEAVE_CHUNKS", interleave)
    launched = []
    kernel = emb_triton._embedding_distill_loss_fwd_kernel
    monkeypatch.setattr(emb_triton, "_embedding_distill_loss_fwd_kernel", type(
        "Spy", (), {"__getitem__": lambda self, grid: (
            lambda *a, **kw: launched.append((grid[0], kw["INTERLEAVE"])) or kernel[grid](
                *a, **kw))})())
    pred, target = make_embedding_pair(shape, dtype=dtype, device=device, seed=7)
    mask = make_sample_mask(pred.shape[0], "mixed", device=device)
    _check_against_oracle("triton", pred, target, mask, torch.tensor(2.0, device=device))
    if device == "cpu":  # (num_sms() is 2 under the interpreter: 8 programs, or one per block)
        assert launched == [(min(8, -(-pred[0].numel() // 64)), interleave)]


@pytest.mark.parametrize("rounds", ["one", "two", "pipelined"])
def test_rows_kernel_reads_every_chunk_partial(rounds, device, monkeypatch):
    """The rows kernel sums C chunk partials per sample in one wide round, two, or (many
    candidates) small blocks pipelined three deep (rows_kernel_tiles): every partial once.
    C = 256 chunks here (CHUNKS_PER_SM raised), 12 candidates (BLOCK_GC 16)."""
    from olakernels.embedding_loss.impl import triton as emb_triton

    monkeypatch.setattr(emb_triton, "CHUNKS_PER_SM", 128 if device == "cpu" else 2)
    tile = {"one": 16384, "two": 128 * 16, "pipelined": 16 * 16}[rounds]
    monkeypatch.setattr(emb_triton, "ROWS_TILE_ELEMENTS", tile)
    if device == "cpu":  # (num_sms() is 2 under the interpreter: 256 chunks)
        block_c, _, stages = emb_triton.rows_kernel_tiles(256, 16)
        assert (block_c, stages) == {"one": (256, 1), "two": (128, 1), "pipelined": (64, 3)}[
            rounds]
    pred, target = make_embedding_pair((12, 16384), device=device, seed=11)
    mask = make_sample_mask(12, "mixed", device=device)
    _check_against_oracle("triton", pred, target, mask, torch.tensor(2.0, device=device))


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("mask_mode", ["per_sample", "seed"])
@pytest.mark.parametrize("kind", ["ones", "mixed", "zeros"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mask_kinds(impl, mask_mode, kind, dtype, device):
    pred, target = make_embedding_pair(SHAPES["depth"], dtype=dtype, device=device, seed=3)
    mask = make_sample_mask(pred.shape[0], kind, device=device, seed=1)
    out, g_pred, _ = _check_against_oracle(
        impl, pred, target, mask, torch.tensor(2.0, device=device), mask_mode=mask_mode
    )
    if kind == "zeros":
        assert out.loss.item() == 0.0 and torch.count_nonzero(g_pred) == 0


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("mask_mode", ["per_sample", "seed"])
def test_bool_and_integer_masks_equal_the_float_mask(impl, mask_mode, device):
    """The model passes a bool mask (no per-call 0/1 check): every path must read it as the
    float one, candidates and rows alike."""
    pred, target = make_embedding_pair(SHAPES["gen"], dtype=torch.float32, device=device, seed=5)
    mask = make_sample_mask(pred.shape[0], "mixed", device=device, seed=2)
    results = []
    for m in (mask, mask.bool(), mask.long()):
        p = pred.detach().clone().requires_grad_(True)
        scale = torch.tensor(2.0, device=device, requires_grad=True)
        out = embedding_distill_loss(p, target, m, scale, mask_mode=mask_mode, impl=impl)
        out.loss.backward()
        results.append((out.loss.detach(), p.grad, scale.grad))
    for got in results[1:]:
        for a, b in zip(got, results[0], strict=True):
            assert torch.equal(a, b)


def test_modes_agree_on_all_image_batches(device):
    # SPEC 12: with every sample an image (pre-training) the two mask modes are the same loss.
    pred, target = make_embedding_pair(SHAPES["seg"], device=device, seed=5)
    mask = make_sample_mask(pred.shape[0], "ones", device=device)
    a = embedding_distill_loss(pred, target, mask, 2.0, impl="triton", mask_mode="per_sample")
    b = embedding_distill_loss(pred, target, mask, 2.0, impl="triton", mask_mode="seed")
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=0)


@pytest.mark.parametrize("impl", ["triton", "torch", "reference"])
@pytest.mark.parametrize("mask_mode", ["per_sample", "seed"])
def test_all_masked_gives_zero_not_nan(impl, mask_mode, device):
    pred, target = make_embedding_pair(SHAPES["gen"], device=device, seed=7)
    scale = torch.tensor(2.0, device=device, requires_grad=True)
    mask = torch.zeros(pred.shape[0], device=device)
    out = embedding_distill_loss(pred, target, mask, scale, impl=impl, mask_mode=mask_mode)
    out.loss.backward()
    assert [v.item() for v in out] == [0.0, 0.0, 0.0]
    assert torch.count_nonzero(pred.grad) == 0 and scale.grad.item() == 0.0


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_clamp_active_zero_scale_grad(impl, device):
    # Noisy predictions: at scale 100 the contrastive loss stays well above fp64 resolution.
    pred, target = make_embedding_pair(SHAPES["ragged"], device=device, seed=11, noise=8.0)
    mask = make_sample_mask(pred.shape[0], "mixed", device=device)
    scale = torch.tensor(math.log(100.0) + 0.5, device=device)  # exp(.) > max_logit_scale
    _, _, g_scale = _check_against_oracle(impl, pred, target, mask, scale)
    assert g_scale.item() == 0.0
    _, _, g_scale = _check_against_oracle(impl, pred, target, mask, scale, max_logit_scale=1e4)
    assert g_scale.item() != 0.0


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 2.0])
def test_smooth_l1_only_and_beta(impl, beta, device):
    pred, target = make_embedding_pair(SHAPES["depth"], dtype=torch.bfloat16, device=device)
    mask = make_sample_mask(pred.shape[0], "mixed", device=device)
    out, _, _ = _check_against_oracle(impl, pred, target, mask, None, beta=beta)
    assert out.contrastive.item() == 0.0


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("target_dtype", [torch.float32, torch.float16], ids=str)
def test_pred_and_target_dtypes_differ(impl, target_dtype, device):
    pred, target = make_embedding_pair(SHAPES["seg"], dtype=torch.bfloat16, device=device)
    mask = make_sample_mask(pred.shape[0], "mixed", device=device)
    scale = torch.tensor(2.0, device=device)
    _check_against_oracle(impl, pred, target.to(target_dtype), mask, scale)


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("mask_mode", ["per_sample", "seed"])
def test_many_samples_span_several_tiles(impl, mask_mode, device):
    # 67 samples: more than one 64-row tile of pred and of the candidate targets.
    pred, target = make_embedding_pair((67, 3, 17), device=device, seed=13)
    mask = make_sample_mask(67, "mixed", device=device, seed=2)
    _check_against_oracle(impl, pred, target, mask, torch.tensor(1.0, device=device),
                          mask_mode=mask_mode)


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_non_contiguous_input(impl, device):
    # The seg head returns permute(0, 2, 1).reshape(B, 1536, 24, 24)-style views.
    pred, target = make_embedding_pair((3, 36, 40), device=device, seed=17)
    pred_t = pred.detach().transpose(1, 2)
    assert not pred_t.is_contiguous()
    mask = make_sample_mask(3, "ones", device=device)
    scale = torch.tensor(2.0, device=device)
    _check_against_oracle(impl, pred_t, target.transpose(1, 2), mask, scale)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN inputs
@pytest.mark.parametrize("impl", ["triton", "torch", "reference"])
@pytest.mark.parametrize("where", ["valid_pred", "masked_target"])
def test_nan_propagates(impl, where, device):
    pred, target = make_embedding_pair(SHAPES["gen"], device=device, seed=19)
    mask = make_sample_mask(pred.shape[0], "mixed", device=device)
    pred, target = pred.detach().clone(), target.clone()
    if where == "valid_pred":
        pred[0, 0, 5] = float("nan")
    else:
        target[-1, 0, 3] = float("nan")  # the mixed mask zeroes the last sample
    out = embedding_distill_loss(pred, target, mask, 2.0, impl=impl)
    assert math.isnan(out.loss.item())


def test_triton_is_deterministic(device):
    pred, target = make_embedding_pair(SHAPES["seg"], dtype=torch.bfloat16, device=device)
    mask = make_sample_mask(pred.shape[0], "mixed", device=device)
    runs = [_run("triton", pred, target, mask, torch.tensor(2.0, device=device)) for _ in range(2)]
    assert torch.equal(runs[0][0].loss, runs[1][0].loss)
    assert torch.equal(runs[0][1], runs[1][1])


def test_triton_and_torch_agree(device):
    pred, target = make_embedding_pair(SHAPES["ragged"], device=device, seed=23)
    mask = make_sample_mask(pred.shape[0], "mixed", device=device)
    a = _run("triton", pred, target, mask, torch.tensor(2.0, device=device))
    b = _run("torch", pred, target, mask, torch.tensor(2.0, device=device))
    for x, y in zip(list(a[0]) + [a[1], a[2]], list(b[0]) + [b[1], b[2]], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_auto_picks_torch_on_cpu():
    pred, target = make_embedding_pair((2, 8))
    auto = embedding_distill_loss(pred, target, None, 2.0, impl="auto")
    torch_ = embedding_distill_loss(pred, target, None, 2.0, impl="torch")
    assert torch.equal(auto.loss, torch_.loss)


def test_module_owns_logit_scale(device):
    loss_fn = EmbeddingDistillLoss(impl="triton")
    assert list(loss_fn.state_dict()) == ["logit_scale"]
    assert loss_fn.logit_scale.item() == 2.0 and loss_fn.logit_scale.dtype == torch.float32
    pred, target = make_embedding_pair(SHAPES["gen"], device=device)
    mask = make_sample_mask(pred.shape[0], "mixed", device=device)
    out = loss_fn.to(device)(pred, target, mask)
    ref = embedding_distill_loss(pred, target, mask, loss_fn.logit_scale, impl="reference")
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    assert loss_fn.logit_scale.grad is not None
    from olakernels.embedding_loss import gather_targets

    gathered = gather_targets(target.reshape(target.shape[0], -1), mask.float())
    torch.testing.assert_close(loss_fn(pred, target, mask, gathered=gathered).loss, out.loss,
                               rtol=0, atol=0)
    no_con = EmbeddingDistillLoss(use_contrastive=False)
    assert list(no_con.state_dict()) == [] and no_con(pred, target, mask).contrastive.item() == 0


def test_module_logit_scale_is_fsdp2_shardable_and_loads_the_seeds_scalar(tmp_path):
    """A (1,) parameter: FSDP2's fully_shard refuses 0-dim ones (the module could not be
    sharded, though the docs recommend FSDP2); the seed's 0-dim value still loads."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    loss_fn = EmbeddingDistillLoss()
    assert loss_fn.logit_scale.shape == (1,)
    loss_fn.load_state_dict({"logit_scale": torch.tensor(3.5)})  # the seed's layout
    assert loss_fn.logit_scale.tolist() == [3.5]
    dist.init_process_group("gloo", rank=0, world_size=1,
                            init_method=f"file://{tmp_path / 'pg'}")
    try:
        fully_shard(loss_fn)
        pred, target = make_embedding_pair(SHAPES["gen"])
        loss_fn(pred, target).loss.backward()
        assert loss_fn.logit_scale.grad is not None
    finally:
        dist.destroy_process_group()


# ---- bad input: ValueError/TypeError naming the argument, the expected and the received ----

def _bad_cases():
    p, t = torch.randn(4, 6), torch.randn(4, 6)
    yield "shape", dict(pred=p, target=torch.randn(4, 7)), "target must have pred's shape"
    yield "batch", dict(pred=p, target=torch.randn(5, 6)), "target must have the batch size"
    yield "mask_len", dict(pred=p, target=t, mask=torch.ones(3)), "mask must have shape (B,)"
    yield "mask_val", dict(pred=p, target=t, mask=torch.tensor([0, 1, 2, 1.0])), "0/1 values"
    yield "int_pred", dict(pred=p.long(), target=t), "pred must be a floating tensor"
    yield "int_target", dict(pred=p, target=t.int()), "target must be a floating tensor"
    yield "empty", dict(pred=p[:0], target=t[:0]), "empty batch"
    yield "one_dim", dict(pred=p[0], target=t[0]), "at least 2 dims"
    yield "mask_mode", dict(pred=p, target=t, mask_mode="mean"), "mask_mode must be one of"
    yield "impl", dict(pred=p, target=t, impl="cuda"), "impl must be one of"
    yield "scale", dict(pred=p, target=t, logit_scale=torch.ones(2)), "logit_scale must be"
    yield "beta", dict(pred=p, target=t, beta=-1.0), "beta must be >= 0"
    yield "beta_none", dict(pred=p, target=t, beta=None), "beta must be a number, got NoneType"
    yield "weight_nan", dict(pred=p, target=t, contrastive_weight=float("nan")), \
        "contrastive_weight must be >= 0, got nan"
    yield "max_scale", dict(pred=p, target=t, max_logit_scale=0), "max_logit_scale must be > 0"
    yield "scale_bool", dict(pred=p, target=t, logit_scale=True), "logit_scale must be a Tensor"
    yield "target_grad", dict(pred=p, target=torch.randn(4, 6, requires_grad=True)), "require grad"


@pytest.mark.parametrize("case", list(_bad_cases()), ids=lambda c: c[0])
def test_bad_input_errors(case):
    _, kwargs, message = case
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        embedding_distill_loss(**kwargs)


def test_numpy_scalars_are_numbers():
    """A logit scale or a beta read from a numpy config is a number like a float."""
    import numpy as np

    p, t = torch.randn(4, 6), torch.randn(4, 6)
    want = embedding_distill_loss(p, t, None, 2.0, beta=0.5, impl="reference")
    got = embedding_distill_loss(p, t, None, np.float32(2.0), beta=np.float64(0.5),
                                 impl="reference")
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)


def test_error_message_shows_expected_and_received():
    with pytest.raises(ValueError) as info:
        embedding_distill_loss(torch.randn(4, 6), torch.randn(4, 7))
    assert "(4, 6)" in str(info.value) and "(4, 7)" in str(info.value)


# ---- GPU: the real shapes, compiled kernels (bf16 tl.dot, tf32 backward, autotuned configs) ----

GPU_CASES = {
    "depth_b8_bf16": ((8, 576, 1024), torch.bfloat16),
    "seg_b4_bf16": ((4, 1536, 24, 24), torch.bfloat16),
    "depth_b4_fp16": ((4, 576, 1024), torch.float16),
    "gen_b32_fp32": ((32, 1, 1024), torch.float32),
    "gen_b100_bf16": ((100, 1, 1024), torch.bfloat16),  # several 64-row tiles
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES.values(), ids=GPU_CASES.keys())
def test_gpu_real_shapes(case):
    shape, dtype = case
    pred, target = make_embedding_pair(shape, dtype=dtype, device="cuda", seed=29)
    mask = make_sample_mask(shape[0], "mixed", device="cuda")
    _check_against_oracle("triton", pred, target, mask, torch.tensor(2.0, device="cuda"))


@pytest.mark.parametrize("on_gpu", [False, pytest.param(True, marks=pytest.mark.gpu)],
                         ids=["device", "gpu"])
def test_fp32_pred_with_bf16_targets(on_gpu, device):
    """Pre-training's mix: fp32 heads against bf16 cached targets. The backward's dot must not
    round the fp32 coefficients to tf32 (~5e-4): the eager fp32 path is ~1e-7."""
    dev = "cuda" if on_gpu else device
    shape = (8, 576, 1024) if on_gpu else SHAPES["ragged"]
    pred, target = make_embedding_pair(shape, dtype=torch.float32, device=dev, seed=41)
    target = target.to(torch.bfloat16)
    mask = make_sample_mask(shape[0], "mixed", device=dev)
    _check_against_oracle("triton", pred, target, mask, torch.tensor(2.0, device=dev))


@pytest.mark.gpu
def test_gpu_deterministic_and_auto_is_triton():
    pred, target = make_embedding_pair((8, 1536, 24, 24), dtype=torch.bfloat16, device="cuda")
    mask = make_sample_mask(8, "mixed", device="cuda")
    scale = torch.tensor(2.0, device="cuda")
    a = _run("triton", pred, target, mask, scale)
    b = _run("auto", pred, target, mask, scale)
    assert torch.equal(a[0].loss, b[0].loss) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("used", ["all", "smooth_l1", "contrastive", "parts"])
def test_components_backprop_with_their_own_weights(impl, used, device):
    # Backward through smooth_l1 and contrastive separately (e.g. reweighted by a trainer);
    # the outputs that take no part get no gradient (None in the fused backward).
    weights = {"all": (0.5, 2.0, 3.0), "smooth_l1": (0.0, 2.0, 0.0),
               "contrastive": (0.0, 0.0, 3.0), "parts": (0.0, 2.0, 3.0)}[used]
    pred, target = make_embedding_pair(SHAPES["ragged"], device=device, seed=31)
    mask = make_sample_mask(pred.shape[0], "mixed", device=device)
    grads = {}
    for which in (impl, "reference"):
        p = pred.detach().clone().requires_grad_(True)
        s = torch.tensor(2.0, device=device, requires_grad=True)
        out = embedding_distill_loss(p.double() if which == "reference" else p,
                                     target.double() if which == "reference" else target,
                                     mask, s, impl=which)
        terms = [w * t for w, t in zip(weights, (out.loss, out.smooth_l1, out.contrastive),
                                       strict=True) if w]
        sum(terms).backward()
        grads[which] = (p.grad, s.grad)
    torch.testing.assert_close(grads[impl][0], grads["reference"][0].float(), rtol=1e-4, atol=1e-7)
    if used == "smooth_l1":  # logit_scale takes no part: no gradient, as in eager PyTorch
        assert grads[impl][1] is None and grads["reference"][1] is None
    else:
        torch.testing.assert_close(grads[impl][1], grads["reference"][1].float(), rtol=1e-4,
                                   atol=1e-7)
