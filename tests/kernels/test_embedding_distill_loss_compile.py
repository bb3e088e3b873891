# torch.library registration (opcheck) and torch.compile(fullgraph=True) of embedding_distill_loss.
import pytest
import torch

from olakernels import embedding_distill_loss
from olakernels.embedding_loss.impl import triton as triton_impl  # registers the custom ops
from olakernels.testing import make_embedding_pair, make_sample_mask


def _fwd_args(device, with_dot, gathered, seed_mode=False):
    pred, target = make_embedding_pair((3, 40), device=device)
    others = target.repeat(2, 1) if gathered else None
    mask = make_sample_mask(3, "mixed", device=device)
    gmask = torch.cat([mask, mask]) if gathered else mask
    scale = torch.tensor(2.0, device=device, requires_grad=True) if with_dot else None
    return (pred, target, others, mask, gmask, scale, 1.0, 0.3, 100.0, 3 if gathered else 0,
            2 if gathered else 1, seed_mode)


@pytest.mark.parametrize("with_dot", [True, False])
@pytest.mark.parametrize("gathered", [False, True])
def test_opcheck_fwd(with_dot, gathered, device):
    torch.library.opcheck(triton_impl.embedding_distill_loss_fwd, _fwd_args(device, with_dot,
                                                                            gathered))


def test_opcheck_fwd_seed_mode(device):
    torch.library.opcheck(triton_impl.embedding_distill_loss_fwd,
                          _fwd_args(device, True, False, seed_mode=True))


@pytest.mark.parametrize("with_dot", [True, False])
@pytest.mark.parametrize("given", ["loss", "all", "parts"])
def test_opcheck_bwd(with_dot, given, device):
    args = _fwd_args(device, with_dot, False)
    with torch.no_grad():
        *_losses, out, coef_sl1, coef_p, coef_c = triton_impl.embedding_distill_loss_fwd(*args)
    grads = [torch.randn((), device=device) for _ in range(3)]
    if given == "loss":
        grads[1] = grads[2] = None
    elif given == "parts":
        grads[0] = None
    torch.library.opcheck(
        triton_impl.embedding_distill_loss_bwd,
        (args[0].detach(), args[1], None, coef_sl1, coef_p, coef_c, out, *grads, 1.0, with_dot),
    )


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_compile_fullgraph_matches_eager(impl, device):
    pred, target = make_embedding_pair((4, 6, 10), dtype=torch.bfloat16, device=device)
    mask = make_sample_mask(4, "mixed", device=device)

    def loss_fn(pred, target, mask, scale):
        return embedding_distill_loss(pred, target, mask, scale, impl=impl)

    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True)):
        p = pred.detach().clone().requires_grad_(True)
        s = torch.tensor(2.0, device=device, requires_grad=True)
        out = fn(p, target, mask, s)
        out.loss.backward()
        results.append(([v.detach() for v in out], p.grad, s.grad))
    (eager, g_eager, s_eager), (comp, g_comp, s_comp) = results
    for a, b in zip(eager, comp, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_eager, g_comp)
    torch.testing.assert_close(s_eager, s_comp, rtol=1e-5, atol=1e-7)


def test_compiled_input_checks_still_fail(device):
    """Under torch.compile the input checks were skipped: a label >= V gave its row's
    logsumexp as the loss, a mask value of 3 a loss. They are traced as asynchronous asserts
    (a device-side assert on GPUs; a RuntimeError naming the input here)."""
    from olakernels import linear_cross_entropy

    torch.manual_seed(0)
    h, w = torch.randn(8, 16, device=device), torch.randn(37, 16, device=device)
    y = torch.randint(0, 37, (8,), device=device)
    lce = torch.compile(lambda h, w, y: linear_cross_entropy(h, w, y, impl="triton"),
                        fullgraph=True)
    torch.testing.assert_close(lce(h, w, y), linear_cross_entropy(h, w, y, impl="triton"))
    y[3] = 1000
    with pytest.raises(RuntimeError, match=r"labels must be in \[0, 37\)"):
        lce(h, w, y)
    pred, target = torch.randn(4, 8, device=device), torch.randn(4, 8, device=device)
    edl = torch.compile(lambda p, t, m: embedding_distill_loss(p, t, m, 2.0, impl="triton").loss,
                        fullgraph=True)
    with pytest.raises(RuntimeError, match="mask"):
        edl(pred, target, torch.tensor([1.0, 3.0, 0.0, 1.0], device=device))
