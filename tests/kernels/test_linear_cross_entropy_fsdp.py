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

    def __init__(self, impl: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(H, H)
        self.head = LinearCrossEntropy(H, V, bias=False, shift_labels=True, impl=impl)

    def forward(self, x, labels):
        # Calling the head module (not its weight) lets FSDP2 unshard the weight first.
        return self.head(self.proj(x), labels)


def _batch(rank: int):
    hidden, _, labels, _ = make_lm_head_inputs((2, 9), H, V, ignored=0.3, seed=10 + rank)
    return hidden, labels


def _worker(rank, init_file, out_dir, impl):
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        model = TinyLM(impl)
        fully_shard(model.head)
        fully_shard(model)
        x, y = _batch(rank)
        loss = model(x, y)
        loss.backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        torch.save({"loss": loss.detach(), "grads": grads}, os.path.join(out_dir, f"{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)


@pytest.mark.distributed
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_fsdp2_sharded_head_matches_unsharded(impl):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp, impl), nprocs=WORLD, join=True)
        results = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(WORLD)]
    # Unsharded: each rank's loss on its batch; FSDP2 averages the gradients over ranks.
    model = TinyLM("reference")
    losses = []
    for rank in range(WORLD):
        losses.append(model(*_batch(rank)))
    (sum(losses) / WORLD).backward()
    for rank in range(WORLD):
        torch.testing.assert_close(results[rank]["loss"], losses[rank].detach(), rtol=1e-5,
                                   atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(results[0]["grads"][name], p.grad, rtol=1e-4, atol=1e-6,
                                   msg=name)
