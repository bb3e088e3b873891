# The fused losses under CUDA graph capture: forward + backward replayed on new inputs (GPU only).
"""Issue 3: linear_cross_entropy has no host sync (given ``max_valid_tokens``, a fixed bound),
so it can be captured in a CUDA graph; embedding_distill_loss's Triton path (4 launches, no
host sync) likewise. Each test follows PyTorch's recipe (docs: "CUDA Graphs", whole-network
capture): warm up on a side stream (Triton compiles and autotunes there), set the gradients to
None so the captured backward allocates them in the graph's pool, capture forward + backward
on static tensors, then copy new contents into the static inputs, replay, and compare the
static outputs and gradients with an eager call on the same contents.
"""
import pytest
import torch

from olakernels import LinearCrossEntropy, embedding_distill_loss, linear_cross_entropy
from olakernels.testing import make_embedding_pair, make_lm_head_inputs, make_sample_mask

pytestmark = pytest.mark.gpu

N, H, V = 2048, 512, 8192
BOUND = 256  # labelled tokens per batch at most (ignored fractions of 0.88-0.95 below)
IGNORED = (0.9, 0.95, 0.88)  # a different device-side count at each replay


def _capture(step, leaves):
    """Warm ``step`` up on a side stream, then capture it; returns (graph, static outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            for t in leaves:
                t.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    for t in leaves:
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    return graph, outs


def _close(got, want, name):
    if want is None:
        assert got is None, name
        return
    # The same kernels on the same inputs: at most a different reduction order in a vendor
    # GEMM, so the dtype's default tolerance (fp32: 1.3e-6 relative) and far below it.
    torch.testing.assert_close(got, want, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("frozen_weight", [False, True], ids=["trainable", "frozen_head"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_linear_cross_entropy_replays_with_a_fixed_bound(dtype, frozen_weight):
    """bf16 trainable: the vocabulary-slab backward; bf16 frozen: the BLAS schedule (cuBLAS
    GEMMs in the forward); fp32: the Triton kernels. A replay whose labels exceed the bound
    gives a NaN loss and the true count (the device-side check), not a partial loss."""
    hidden, weight, labels, _ = make_lm_head_inputs((N,), H, V, dtype=dtype, device="cuda",
                                                    ignored=IGNORED[0], seed=0)
    static_h = hidden.clone().requires_grad_(True)
    static_w = weight.clone().requires_grad_(not frozen_weight)
    static_y = labels.clone()
    leaves = [static_h, static_w]

    def step():
        out = linear_cross_entropy(static_h, static_w, static_y, max_valid_tokens=BOUND,
                                   return_stats=True)
        out.loss.backward()
        return out.loss.detach(), out.num_valid

    graph, (loss, num_valid) = _capture(step, leaves)
    for seed, ignored in enumerate(IGNORED + (0.5,), start=1):
        h, w, y, _ = make_lm_head_inputs((N,), H, V, dtype=dtype, device="cuda",
                                         ignored=ignored, seed=seed)
        with torch.no_grad():
            static_h.copy_(h)
            static_w.copy_(w)
        static_y.copy_(y)
        graph.replay()
        torch.cuda.synchronize()
        e_h, e_w = h.clone().requires_grad_(True), w.clone().requires_grad_(not frozen_weight)
        want = linear_cross_entropy(e_h, e_w, y, max_valid_tokens=BOUND, return_stats=True)
        count = int((y != -100).sum())
        assert int(num_valid) == int(want.num_valid) == count
        if count > BOUND:  # the last replay: more labels than the bound said
            assert torch.isnan(loss), "a count above the bound must poison the loss"
            continue
        want.loss.backward()
        _close(loss, want.loss.detach(), f"replay {seed}: loss")
        _close(static_h.grad, e_h.grad, f"replay {seed}: grad_hidden")
        _close(static_w.grad, e_w.grad, f"replay {seed}: grad_weight")


def test_linear_cross_entropy_module_replays():
    """The drop-in head under capture: its adaptive schedule (host-side history) is off there
    and the op's default runs; mostly unlabelled batches keep warm-up and capture on the same
    (row-skipping) kernels."""
    torch.manual_seed(0)
    head = LinearCrossEntropy(H, V, bias=False, device="cuda", dtype=torch.bfloat16)
    hidden, _, labels, _ = make_lm_head_inputs((N,), H, V, dtype=torch.bfloat16, device="cuda",
                                               ignored=IGNORED[0], seed=0)
    static_h, static_y = hidden.clone().requires_grad_(True), labels.clone()

    def step():
        loss = head(static_h, static_y)
        loss.backward()
        return loss.detach()

    graph, loss = _capture(step, [static_h, head.weight])
    for seed, ignored in enumerate(IGNORED, start=1):
        h, _, y, _ = make_lm_head_inputs((N,), H, V, dtype=torch.bfloat16, device="cuda",
                                         ignored=ignored, seed=seed)
        with torch.no_grad():
            static_h.copy_(h)
        static_y.copy_(y)
        graph.replay()
        torch.cuda.synchronize()
        e_h = h.clone().requires_grad_(True)
        e_w = head.weight.detach().clone().requires_grad_(True)
        want = linear_cross_entropy(e_h, e_w, y)
        want.backward()
        _close(loss, want.detach(), f"replay {seed}: loss")
        _close(static_h.grad, e_h.grad, f"replay {seed}: grad_hidden")
        _close(head.weight.grad, e_w.grad, f"replay {seed}: grad_weight")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_embedding_distill_loss_replays(dtype):
    """The Triton path (impl="auto" on CUDA): smooth-L1 + InfoNCE with a learnable logit scale
    and a per-sample mask whose contents change between replays."""
    shape = (16, 576, 64)  # (B, tokens, channels), a depth-like target scaled down
    pred, target = make_embedding_pair(shape, dtype=dtype, device="cuda", seed=0,
                                       requires_grad=False)
    static_p = pred.clone().requires_grad_(True)
    static_t, static_m = target.clone(), make_sample_mask(shape[0], "mixed", device="cuda")
    scale = torch.full((1,), 2.0, device="cuda", requires_grad=True)

    def step():
        out = embedding_distill_loss(static_p, static_t, static_m, scale)
        out.loss.backward()
        return tuple(t.detach() for t in out)

    graph, outs = _capture(step, [static_p, scale])
    for seed in (1, 2, 3):
        p, t = make_embedding_pair(shape, dtype=dtype, device="cuda", seed=seed,
                                   requires_grad=False)
        m = make_sample_mask(shape[0], "ones" if seed == 3 else "mixed", device="cuda",
                             seed=seed)
        with torch.no_grad():
            static_p.copy_(p)
        static_t.copy_(t)
        static_m.copy_(m)
        graph.replay()
        torch.cuda.synchronize()
        e_p = p.clone().requires_grad_(True)
        e_scale = torch.full((1,), 2.0, device="cuda", requires_grad=True)
        want = embedding_distill_loss(e_p, t, m, e_scale)
        want.loss.backward()
        for name, got, ref in zip(("loss", "smooth_l1", "contrastive"), outs, want,
                                  strict=True):
            _close(got, ref.detach(), f"replay {seed}: {name}")
        _close(static_p.grad, e_p.grad, f"replay {seed}: grad_pred")
        _close(scale.grad, e_scale.grad, f"replay {seed}: grad_logit_scale")
