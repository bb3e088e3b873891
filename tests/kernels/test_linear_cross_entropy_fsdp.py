# linear_cross_entropy inside an FSDP2-sharded LM head (2 processes, gloo on CPU).
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from olakernels import LinearCrossEntropy
from olakernels.testing import make_lm_head_inputs

WORLD = 2
H, V = 16, 60


class TinyLM(nn.Module):
    """A projection and the LM head: the head's weight is a sharded FSDP2 parameter."""

    def __init__(self, impl: str, bound=None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(H, H)
        self.head = LinearCrossEntropy(H, V, bias=False, shift_labels=True, impl=impl,
                                       max_valid_tokens=bound)

    def forward(self, x, labels):
        # Calling the head module (not its weight) lets FSDP2 unshard the weight first.
        return self.head(self.proj(x), labels)


def _batch(rank: int, impl: str = "triton"):
    hidden, _, labels, _ = make_lm_head_inputs((2, 9), H, V, ignored=0.3, seed=10 + rank)
    return (hidden.bfloat16() if impl == "blas" else hidden), labels


def _model(impl: str) -> TinyLM:
    """"blas": the Triton impl in bf16 with the head counting its labels (a bound, ~70%
    labelled), so the trainable head takes the BLAS schedule (gradients in the forward)."""
    if impl == "blas":
        return TinyLM("triton", bound="count").bfloat16()
    return TinyLM(impl)


def _worker(rank, init_file, out_dir, impl):
    from torch.distributed.fsdp import fully_shard

    from olakernels.linear_cross_entropy.impl import blas_fused_grad

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        blas_runs = []
        real = blas_fused_grad.lce_forward_with_grads_blas
        blas_fused_grad.lce_forward_with_grads_blas = \
            lambda *a: blas_runs.append(1) or real(*a)
        model = _model(impl)
        fully_shard(model.head)
        fully_shard(model)
        x, y = _batch(rank, impl)
        loss = model(x, y)
        loss.backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        torch.save({"loss": loss.detach(), "grads": grads, "blas": len(blas_runs)},
                   os.path.join(out_dir, f"{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)


@pytest.mark.distributed
@pytest.mark.parametrize("impl", ["triton", "torch", "blas"])
def test_fsdp2_sharded_head_matches_unsharded(impl):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp, impl), nprocs=WORLD, join=True)
        results = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(WORLD)]
    assert [r["blas"] for r in results] == ([1, 1] if impl == "blas" else [0, 0])
    # Unsharded: each rank's loss on its batch; FSDP2 averages the gradients over ranks. The
    # bf16 case against the same path unsharded (its gradients reduce in bf16 under FSDP2).
    model = _model(impl) if impl == "blas" else TinyLM("reference")
    losses = []
    for rank in range(WORLD):
        losses.append(model(*_batch(rank, impl)))
    (sum(losses) / WORLD).backward()
    bf16 = impl == "blas"
    loss_tol = dict(rtol=2e-3, atol=1e-4) if bf16 else dict(rtol=1e-5, atol=1e-6)
    grad_tol = dict(rtol=2e-2, atol=1e-3) if bf16 else dict(rtol=1e-4, atol=1e-6)
    for rank in range(WORLD):
        torch.testing.assert_close(results[rank]["loss"], losses[rank].detach(), **loss_tol)
    for name, p in model.named_parameters():
        torch.testing.assert_close(results[0]["grads"][name], p.grad, **grad_tol, msg=name)
