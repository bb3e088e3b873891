# 2-process gloo runs of embedding_distill_loss against one process on the concatenated batch.
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from olakernels import embedding_distill_loss
from olakernels.testing import assert_close_to_reference, make_embedding_pair, make_sample_mask

WORLD = 2
IMPLS = ["triton", "torch", "reference"]
# name -> (per-rank batch sizes, mask kind, mask_mode)
CASES = {
    "equal_mixed": ((3, 3), "mixed", "per_sample"),
    "unequal_mixed": ((2, 5), "mixed", "per_sample"),
    "equal_seed": ((3, 3), "ones", "seed"),
}
SHAPE = (4, 5, 7)  # per-sample shape, ragged


def _global_inputs(case):
    sizes, kind, _ = CASES[case]
    total = sum(sizes)
    pred, target = make_embedding_pair((total,) + SHAPE[1:], seed=total, requires_grad=False)
    mask = make_sample_mask(total, kind, seed=1)
    # Put a masked sample on rank 0 too, so masks differ inside both ranks.
    if kind == "mixed":
        mask[1] = 0.0
    return pred, target, mask


def _run(impl, pred, target, mask, mask_mode, group=None):
    pred = pred.clone().requires_grad_(True)
    scale = torch.tensor(2.0, requires_grad=True)
    out = embedding_distill_loss(pred, target, mask, scale, impl=impl, mask_mode=mask_mode,
                                 process_group=group)
    out.loss.backward()
    return {"loss": out.loss.detach(), "smooth_l1": out.smooth_l1.detach(),
            "contrastive": out.contrastive.detach(), "grad_pred": pred.grad,
            "grad_scale": scale.grad}


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        for case, (sizes, _, mask_mode) in CASES.items():
            pred, target, mask = _global_inputs(case)
            lo = sum(sizes[:rank])
            rows = slice(lo, lo + sizes[rank])
            for impl in IMPLS:
                res = _run(impl, pred[rows], target[rows], mask[rows], mask_mode, dist.group.WORLD)
                torch.save(res, os.path.join(out_dir, f"{case}_{impl}_{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # spawned gloo workers sometimes abort in interpreter teardown


@pytest.fixture(scope="module")
def rank_results():
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(init_file, tmp), nprocs=WORLD, join=True)
        yield {
            (case, impl, r): torch.load(os.path.join(tmp, f"{case}_{impl}_{r}.pt"))
            for case in CASES for impl in IMPLS for r in range(WORLD)
        }


@pytest.mark.distributed
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_match_one_process(rank_results, case, impl):
    """Mean over ranks of the loss == one process on the concatenated batch; gradients follow.

    Each rank's loss is world/N_global times its samples' terms (api docstring), so the rank
    mean of losses and of logit_scale gradients equals the single-process value, and each
    rank's grad_pred is world x the matching rows of the single-process gradient (data
    parallel training divides by world when it averages). This holds with unequal batches and
    masks, which also checks the labels (offset by the sizes of earlier ranks).
    """
    sizes, _, mask_mode = CASES[case]
    pred, target, mask = _global_inputs(case)
    single = _run(impl, pred, target, mask, mask_mode)
    ranks = [rank_results[(case, impl, r)] for r in range(WORLD)]
    for key in ("loss", "smooth_l1", "contrastive", "grad_scale"):
        mean = sum(r[key] for r in ranks) / WORLD
        torch.testing.assert_close(mean, single[key], rtol=2e-6, atol=1e-7, msg=key)
    grads = torch.cat([r["grad_pred"] for r in ranks]) / WORLD
    torch.testing.assert_close(grads, single["grad_pred"], rtol=2e-6, atol=1e-8)


@pytest.mark.distributed
def test_unequal_batches_weighting_per_rank(rank_results):
    """Rank r returns world/N_global * (its smooth-L1 sums): here N_global is 5 of 7 samples."""
    pred, target, mask = _global_inputs("unequal_mixed")
    sizes = CASES["unequal_mixed"][0]
    per_elem = pred[0].numel()
    sl1 = torch.nn.functional.smooth_l1_loss(pred, target, reduction="none").flatten(1).sum(1)
    n_valid = mask.sum()
    for r in range(WORLD):
        rows = slice(sum(sizes[:r]), sum(sizes[: r + 1]))
        expected = WORLD * (sl1[rows] * mask[rows]).sum() / (n_valid * per_elem)
        got = rank_results[("unequal_mixed", "triton", r)]["smooth_l1"]
        torch.testing.assert_close(got, expected, rtol=2e-6, atol=1e-8)


def _rank_reference_fp64(case: str, rank: int) -> dict:
    """Rank ``rank``'s loss terms and gradients in float64, written from the api docstring's
    weighting alone: per_sample mode, world / N_global times the sums of the rank's valid
    samples' terms (contrastive candidates: every rank's valid targets); seed mode, the seed's
    means over the rank's own samples (candidates: every rank's targets)."""
    sizes, _, mask_mode = CASES[case]
    pred, target, mask = (t.double() for t in _global_inputs(case))
    pred.requires_grad_(True)
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    lo = sum(sizes[:rank])
    rows = torch.arange(lo, lo + sizes[rank])
    per_elem = pred[0].numel()
    sl1 = torch.nn.functional.smooth_l1_loss(pred, target, reduction="none").flatten(1).sum(1)
    p = torch.nn.functional.normalize(pred.flatten(1), dim=-1)
    t = torch.nn.functional.normalize(target.flatten(1), dim=-1)
    logits = p[rows] @ t.T * scale.exp()  # (exp(2) is below max_logit_scale)
    m = mask[rows]
    if mask_mode == "per_sample":
        n_global = mask.sum()
        smooth_l1 = WORLD * (sl1[rows] * m).sum() / (n_global * per_elem)
        logits = logits.masked_fill(mask[None, :] == 0, float("-inf"))
        valid = m > 0
        ce = torch.nn.functional.cross_entropy(logits[valid], rows[valid], reduction="sum")
        contrastive = 0.3 * WORLD * ce / n_global
    else:
        smooth_l1 = (sl1[rows] * m).sum() / (len(rows) * per_elem)
        contrastive = 0.3 * torch.nn.functional.cross_entropy(logits, rows) * m.mean()
    loss = smooth_l1 + contrastive
    loss.backward()
    return {"loss": loss.detach(), "smooth_l1": smooth_l1.detach(),
            "contrastive": contrastive.detach(), "grad_pred": pred.grad[rows],
            "grad_scale": scale.grad}


@pytest.mark.distributed
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_each_rank_matches_its_float64_terms(rank_results, case, impl):
    """Per rank (not only their mean): the contrastive term, the loss, grad_pred and the
    logit-scale gradient against the float64 per-rank values of the documented weighting,
    with unequal batches and masks (a rank-dependent error that cancels in the mean, e.g.
    labels offset the wrong way or N_local in place of N_global, shows here)."""
    per_elem = _global_inputs(case)[0][0].numel()
    # The fast impls: within 3x the seed's fp32 error. The seed's own fp32 math (no eager twin
    # to compare with) within a floor: its logsumexp - label logit loses the small InfoNCE
    # loss of a confident predictor to cancellation (AGENTS.md), ~1e-5 relative here.
    floor = 4.0 if impl != "reference" else 256.0
    for r in range(WORLD):
        got, want = rank_results[(case, impl, r)], _rank_reference_fp64(case, r)
        eager = rank_results[(case, "reference", r)] if impl != "reference" else None
        for key in ("loss", "smooth_l1", "contrastive", "grad_pred", "grad_scale"):
            assert_close_to_reference(
                got[key], want[key], None if eager is None else eager[key], k=3.0,
                floor_ulps=floor, name=f"{case}.{impl}.rank{r}.{key}",
                reduction_size=per_elem)
