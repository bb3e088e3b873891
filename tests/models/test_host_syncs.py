# Where the training step makes the host wait for the GPU: exactly the reads docs/model.md names.
"""A host read stalls the CPU until the GPU has drained its queue; then the GPU idles while the
CPU queues the next kernels, and CUDA graphs refuse the code. The fused step is allowed exactly
two per micro-batch (docs/model.md, "Host reads"): the splice's length (splice.py) and
transformers' causal-mask preparation (masking_utils.py, outside this project); the trainer
adds one per optimizer step (the logged scalars). Checked on the CPU with
``olakernels.testing.track_host_syncs``, on the kernel paths a GPU takes (impl="triton"; the
input checks as device-side asserts, as on a GPU), so that a new ``.item()``, ``nonzero()`` or
boolean-mask index anywhere in the step fails here.
"""
import pytest
import torch
from tiny_ola import tiny_batch, tiny_model

import olakernels._checks as checks
from olakernels import embedding_distill_loss, linear_cross_entropy
from olakernels.testing import make_embedding_pair, make_lm_head_inputs, track_host_syncs

SPLICE = "olavlm/models/splice.py"
HF_MASK = "transformers/masking_utils.py"


@pytest.fixture
def checks_as_on_gpu(monkeypatch):
    """fail_if_any as on an accelerator: a device-side assert instead of a host read."""
    monkeypatch.setattr(checks, "_check_on_host", lambda t: False)


def _where(events) -> list[str]:
    """Each event as 'op @ the deepest project or transformers file on its stack'."""
    out = []
    for why, stack in events:
        frames = [line.strip() for line in stack.splitlines() if line.strip().startswith("File")]
        mine = [f for f in frames if "olavlm/" in f or "olakernels/" in f or "transformers/" in f]
        out.append(f"{why} @ {(mine or frames)[-1]}")
    return out


@pytest.mark.parametrize("static_length", [False, True])
def test_fused_step_reads_the_host_only_where_documented(tmp_path, checks_as_on_gpu,
                                                         static_length):
    model = tiny_model(tmp_path).set_impl("triton")
    ids, mask, labels, images, image_mask, targets = tiny_batch(model)
    with track_host_syncs() as syncs:
        out = model(ids, mask, labels, images, image_mask, targets,
                    static_length=static_length)
        out.loss.backward()
    assert out.loss.isfinite()
    unexpected = syncs.outside(SPLICE, HF_MASK)
    assert not unexpected, "host reads outside the documented ones:\n" + "\n".join(
        _where(unexpected))
    at_splice = [e for e in syncs.events if SPLICE in e[1]]
    at_mask = [e for e in syncs.events if HF_MASK in e[1] and SPLICE not in e[1]]
    assert len(at_splice) == (0 if static_length else 1), _where(at_splice)
    assert len(at_mask) <= 1, _where(at_mask)


@pytest.mark.parametrize("bound", [None, "int", "count"])
def test_lm_head_reads_the_host_only_when_asked(checks_as_on_gpu, bound, device):
    hidden, weight, labels, _ = make_lm_head_inputs((40,), 16, 50, device=device, ignored=0.5)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    given = {None: None, "int": int((labels != -100).sum()), "count": "count"}[bound]
    with track_host_syncs() as syncs:
        linear_cross_entropy(hidden, weight, labels, impl="triton",
                             max_valid_tokens=given).backward()
    # "count" is the documented one host read (the label count, by request)
    assert len(syncs.events) == (1 if bound == "count" else 0), _where(syncs.events)


def test_embedding_loss_reads_nothing(checks_as_on_gpu, device):
    pred, target = make_embedding_pair((6, 4, 8), device=device)
    scale = torch.tensor(2.0, device=device, requires_grad=True)
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0], device=device)
    with track_host_syncs() as syncs:
        loss, _, _ = embedding_distill_loss(pred, target, mask, scale, impl="triton")
        loss.backward()
    assert not syncs.events, _where(syncs.events)
