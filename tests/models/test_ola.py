# OlaVLM on tiny real decoders: layout, fused == reference, masks, seed arithmetic, errors.
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from tiny_ola import StandInTower, tiny_batch, tiny_model

from olakernels.testing import assert_close_to_reference
from olavlm.models.config import ModelConfig, parse_layer_indices, parse_loss_weights
from olavlm.models.splice import splice_inputs, splice_reference


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("ola")


@pytest.fixture(scope="module")
def model(tmp):
    return tiny_model(tmp)


# ---- config parsing ----


def test_layer_indices_are_discrete_layers_as_in_the_seed():
    assert parse_layer_indices("d18-20_s10-18_g12-20") == {
        "gen": [12, 20], "depth": [18, 20], "seg": [10, 18]}
    # A task the string does not name gets the seed's fallback: the final normed state (0).
    assert parse_layer_indices("d8", ("gen", "depth")) == {"gen": [0], "depth": [8]}
    assert parse_layer_indices({"seg": [3, 5, 7]}, ("seg",)) == {"seg": [3, 5, 7]}
    for bad in ("x12-20", "d18-20_junk", {"seg": []}, {"shape": [1]}):
        with pytest.raises(ValueError, match="layer_indices"):
            parse_layer_indices(bad, ("seg",))
    # A repeat would build two heads keyed by one layer: one of them would vanish silently.
    for bad in ("s2-2", {"seg": [3, 3]}):
        with pytest.raises(ValueError, match="names a layer twice"):
            parse_layer_indices(bad, ("seg",))
    with pytest.raises(ValueError, match="names task 'depth' twice"):
        parse_layer_indices("d18-20_d5", ("depth",))


def test_loss_weights_need_a_decimal_point_and_default_to_half():
    assert parse_loss_weights("d1.0_s0.25") == {"gen": 0.5, "depth": 1.0, "seg": 0.25}
    with pytest.raises(ValueError, match="loss_weights"):
        parse_loss_weights("q1.0")


# ---- splice ----


@pytest.mark.parametrize("max_length", [None, 30])
def test_vectorized_splice_equals_the_seed_loop(model, max_length):
    ids, mask, labels, images, _, _ = tiny_batch(
        model, batch=5, placeholders=[2, 5, 3, 7, 4], text_only=(3,),
        pad_from=[None, 18, 12, 20, None])
    feats = model.encode_images(images)
    tokens = model.task_tokens.inserted()
    embed = model.parts.embed_tokens
    fast = splice_inputs(ids, mask, labels, feats, tokens, embed, max_length=max_length)
    ref = splice_reference(ids, mask, labels, feats, tokens, embed, max_length=max_length)
    assert fast.inputs_embeds.shape == ref.inputs_embeds.shape
    assert torch.equal(fast.inputs_embeds, ref.inputs_embeds)
    assert torch.equal(fast.attention_mask, ref.attention_mask)
    assert torch.equal(fast.labels, ref.labels)
    assert torch.equal(fast.image_start, ref.image_start)
    assert torch.equal(fast.has_image, ref.has_image)
    grow = feats.shape[1] + tokens.shape[0] - 1  # the placeholder becomes image + task rows
    spliced_len = mask.sum(1) + grow * (torch.arange(5) != 3)
    want = 0 if max_length is None else int((spliced_len - max_length).clamp(min=0).sum())
    assert int(fast.num_truncated) == want
    assert int(ref.num_truncated) == want


def _compact(sp):
    """Each row's real positions, in order: the seed's right-padded layout."""
    return [(sp.inputs_embeds[i][sp.attention_mask[i]], sp.labels[i][sp.attention_mask[i]])
            for i in range(sp.attention_mask.shape[0])]


@pytest.mark.parametrize("static_length", [False, True])
@pytest.mark.parametrize("max_length", [None, 40, 27, 3])
def test_left_padded_rows_are_cut_by_their_real_positions(model, max_length, static_length):
    """max_length bounds each row's real positions (as the seed's loop, which drops padding
    first): a left-padded row keeps as many tokens as the same row unpadded, and gives up
    leading padding rather than real tokens to fit the buffer."""
    ids, mask, labels, images, _, _ = tiny_batch(model, batch=4, placeholders=[2, 2, 5, 3],
                                                 text_only=(3,))
    for row, pad in ((1, 6), (2, 2), (3, 9)):
        ids[row] = torch.roll(ids[row], pad)
        labels[row] = torch.roll(labels[row], pad)
        mask[row, :pad] = False
        ids[row, :pad] = 0
        labels[row, :pad] = -100
    feats = model.encode_images(images)
    tokens = model.task_tokens.inserted()
    embed = model.parts.embed_tokens
    fast = splice_inputs(ids, mask, labels, feats, tokens, embed, max_length=max_length,
                         static_length=static_length)
    ref = splice_reference(ids, mask, labels, feats, tokens, embed, max_length=max_length)
    if max_length is not None:
        assert fast.inputs_embeds.shape[1] <= max_length
    rows = zip(_compact(fast), _compact(ref), strict=True)
    for i, ((e, lab), (e_ref, lab_ref)) in enumerate(rows):
        assert torch.equal(e, e_ref), f"row {i}"
        assert torch.equal(lab, lab_ref), f"row {i}"
    assert int(fast.num_truncated) == int(ref.num_truncated)
    # image_start points at each image's first row; text-only rows get 0, even when shifted.
    assert (fast.image_start[~fast.has_image] == 0).all()
    for i in fast.has_image.nonzero().flatten().tolist():
        if int(fast.image_start[i]) < fast.inputs_embeds.shape[1]:  # (not cut off entirely)
            assert torch.equal(fast.inputs_embeds[i, int(fast.image_start[i])], feats[i, 0])
    # Padding keeps its side: a row's real positions stay one contiguous run.
    for i in range(4):
        where = fast.attention_mask[i].nonzero().flatten()
        assert torch.equal(where, torch.arange(int(where[0]), int(where[0]) + where.numel()))
    model.config.max_length, kept = max_length, model.config.max_length
    try:
        want = int((fast.labels[:, 1:] != -100).sum())
        assert int(model.count_supervised_tokens(ids, mask, labels)) == want
    finally:
        model.config.max_length = kept


def test_token_layout_and_labels(model):
    ids, mask, labels, images, _, _ = tiny_batch(model, batch=2, placeholders=[3, 6],
                                                 pad_from=[None, 20])
    sp = model.splice(ids, mask, labels, images)
    n_img, n_task = model.num_image_tokens, 4 * len(model.tasks)
    assert sp.num_image_tokens == n_img and sp.num_task_tokens == n_task
    for i, p in enumerate([3, 6]):
        real = int(mask[i].sum())
        assert int(sp.image_start[i]) == p
        assert int(sp.attention_mask[i].sum()) == real - 1 + n_img + n_task
        block = sp.labels[i, p: p + n_img + n_task]
        assert (block == -100).all()
        # The text after the placeholder keeps its labels, shifted by the inserted block.
        assert torch.equal(sp.labels[i, p + n_img + n_task: real - 1 + n_img + n_task],
                           labels[i, p + 1: real])
        # The task tokens sit right after the image, in aux_mode order.
        inserted = model.task_tokens.inserted()
        assert torch.equal(sp.inputs_embeds[i, p + n_img: p + n_img + n_task], inserted)
    # depth/seg insert means of equal groups of their query parameter (SPEC 1.5).
    depth = model.task_tokens.parameter_for("depth")
    off = model.task_tokens.offset("depth")
    assert torch.allclose(inserted[off: off + 4], depth.view(4, 4, -1).mean(1))


def test_left_padding_stays_left(model):
    ids, mask, _, images, _, _ = tiny_batch(model, batch=2, placeholders=[6, 3])
    mask[0, :3] = False  # left padding of 3
    ids[0, :3] = 0
    sp = model.splice(ids, mask, None, images)
    assert not sp.attention_mask[0, :3].any() and sp.attention_mask[0, 3:].all()
    assert sp.attention_mask[1].all()
    assert sp.right_padded is False
    assert model._decoder_mask(sp) is not None  # left padding needs the decoder's mask


def test_right_padding_runs_the_decoder_without_a_mask(tmp, model):
    ids, mask, labels, images, _, _ = tiny_batch(model, batch=3, pad_from=[None, 15, 10])
    sp = model.splice(ids, mask, labels, images)
    assert sp.right_padded is True and not sp.attention_mask.all()
    assert model._decoder_mask(sp) is None  # plain causal: flash attention, grouped K/V
    assert model.splice(ids, mask, labels, images, static_length=True).right_padded is None
    ids[1, 3] = 0
    mask[1, 3] = False  # a hole
    assert model.splice(ids, mask, labels, images).right_padded is False
    compat = tiny_model(tmp, seed_compat=True, num_sys_tokens=2)
    spliced = compat.splice(*tiny_batch(compat, batch=2, pad_from=[None, 9])[:4])
    assert compat._decoder_mask(spliced) is not None  # the seed's heads read padding states


def test_static_length_pads_without_changing_content(model):
    ids, mask, labels, images, _, _ = tiny_batch(model, batch=3, pad_from=[None, 15, 10])
    a = model.splice(ids, mask, labels, images)
    b = model.splice(ids, mask, labels, images, static_length=True)
    n = a.inputs_embeds.shape[1]
    assert b.inputs_embeds.shape[1] >= n
    assert torch.equal(b.inputs_embeds[:, :n], a.inputs_embeds)
    assert not b.attention_mask[:, n:].any()


@pytest.mark.parametrize("max_length", [None, 30, 12])
def test_count_supervised_tokens_equals_what_the_loss_scores(model, max_length):
    ids, mask, labels, images, _, _ = tiny_batch(
        model, batch=5, placeholders=[2, 5, 3, 7, 0], text_only=(3,),
        pad_from=[None, 18, 12, 20, None])
    g = torch.Generator().manual_seed(1)
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.6, ids.clamp(min=1), -100)
    labels[~mask] = -100
    labels[:, 0] = 7  # scored by nothing: position 0 has no predecessor
    labels[ids == -200] = 3  # the placeholder's own label never reaches the sequence
    mask[1, :2] = False  # left padding on one sample
    model.config.max_length, kept = max_length, model.config.max_length
    try:
        sp = model.splice(ids, mask, labels, images)
        want = int((sp.labels[:, 1:] != -100).sum())
        assert int(model.count_supervised_tokens(ids, mask, labels)) == want
        text = ids.masked_fill(ids == -200, 5)  # a text-only batch: nothing inserted
        sp = model.splice(text, mask, labels, None)
        want = int((sp.labels[:, 1:] != -100).sum())
        assert int(model.count_supervised_tokens(text, mask, labels)) == want
    finally:
        model.config.max_length = kept


def test_ntp_tokens_make_accumulated_micro_batches_equal_one_batch(model):
    """Micro-batches with different label counts: dividing each one's sum by the step's count
    / 2 and accumulating loss / 2 gives the whole batch's mean-over-tokens gradient."""
    ids, mask, labels, images, image_mask, _ = tiny_batch(
        model, batch=4, pad_from=[None, 9, None, 14])
    labels[0, 8:] = -100  # the micro-batches' label counts differ a lot
    whole = (ids, mask, labels, images, image_mask)
    halves = [tuple(t[i: i + 2] for t in whole) for i in (0, 2)]

    def grads_of(steps):
        model.zero_grad(set_to_none=True)
        losses = []
        for batch, ntp_tokens, scale in steps:
            micro = 1 if ntp_tokens is None else len(steps)
            out = model(*batch, ntp_tokens=ntp_tokens, ntp_micro_batches=micro)
            (out.loss * scale).backward()
            losses.append(out.loss.detach() * scale)
        return sum(losses), {n: p.grad.clone() for n, p in model.named_parameters()
                             if p.grad is not None}

    loss_ref, ref = grads_of([(whole, None, 1.0)])
    total = sum(model.count_supervised_tokens(*b[:3]) for b in halves)
    loss_acc, acc = grads_of([(b, total, 0.5) for b in halves])
    _, mean_of_means = grads_of([(b, None, 0.5) for b in halves])
    torch.testing.assert_close(loss_acc, loss_ref)
    assert ref.keys() == acc.keys() and ref
    for name in ref:
        torch.testing.assert_close(acc[name], ref[name], msg=name)
    with pytest.raises(ValueError, match="integer count"):  # FSDP2 would cast it to bf16
        model(*halves[0], ntp_tokens=total.float(), ntp_micro_batches=2)
    # The old way (a mean of the micro-batches' means) weighs tokens unequally: not equal.
    w = "llm.lm_head.weight"
    assert not torch.allclose(mean_of_means[w], ref[w], rtol=1e-3, atol=1e-6)
    model.zero_grad(set_to_none=True)


def test_ntp_rows_bound_the_fused_head_and_a_wrong_one_is_nan(model, monkeypatch):
    """The trainer passes each micro-batch's host-side count as ntp_rows: the fused LM head
    (Triton) sizes its buffers by it with the same loss and gradients; a count below what the
    loss scores is a NaN loss, never a partial one."""
    from olakernels.linear_cross_entropy import api

    monkeypatch.setattr(api, "ROW_QUANTUM", 8)  # so that the bound is below the positions
    ids, mask, labels, images, image_mask, _ = tiny_batch(model, batch=3, pad_from=[None, 9, 14])
    batch = (ids, mask, labels, images, image_mask)
    count = int(model.count_supervised_tokens(ids, mask, labels))
    assert 8 < count < ids.numel() // 2
    model.set_impl("triton")
    try:
        free = _run_with(model, batch)
        bound = _run_with(model, batch, ntp_rows=count)
        torch.testing.assert_close(bound[0], free[0])
        for name in free[1]:
            torch.testing.assert_close(bound[1][name], free[1][name], msg=name)
        assert torch.isnan(_run_with(model, batch, ntp_rows=count - 1)[0])
    finally:
        model.set_impl("torch")
        model.zero_grad(set_to_none=True)


def _run_with(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(*batch, **kwargs)
    out.loss.backward()
    return out.components["ntp"], {n: p.grad.clone() for n, p in model.named_parameters()
                                   if p.grad is not None}


# ---- fused path == reference path ----


def _run(model, batch, impl):
    model.set_impl(impl)
    model.zero_grad(set_to_none=True)
    out = model(*batch)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    model.set_impl("torch")
    return out, grads


@pytest.mark.parametrize("kind", ["llama", "phi3", "qwen2"])
def test_fused_equals_reference_fp32(tmp, kind):
    model = tiny_model(tmp, kind=kind)
    model.llm.requires_grad_(False)  # pre-training: the LLM is frozen
    batch = tiny_batch(model, batch=4, placeholders=[2, 4, 3, 5], text_only=(2,),
                       pad_from=[None, 19, None, 16])
    fast, g_fast = _run(model, batch, "torch")
    ref, g_ref = _run(model, batch, "reference")
    assert set(fast.components) == set(ref.components)
    assert len(fast.components) == 1 + 3 + 2 * 6  # ntp, 3 task totals, 6 heads x 2 terms
    for name, value in ref.components.items():
        torch.testing.assert_close(fast.components[name], value, rtol=2e-5, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(fast.loss, ref.loss, rtol=2e-5, atol=1e-6)
    assert set(g_fast) == set(g_ref)
    trained = {n.split(".")[0] for n in g_fast}
    assert trained == {"mm_projector", "task_tokens", "image_gen_heads", "image_depth_heads",
                       "image_seg_heads", "gen_logit_scale", "depth_logit_scale",
                       "seg_logit_scale"}
    for name, grad in g_ref.items():
        torch.testing.assert_close(g_fast[name], grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"grad {n}: {m}")


def test_predictions_of_text_only_rows_equal_the_reference(tmp):
    # A text-only row's gen queries can sit on padding positions, whose states depend on the
    # padding mask: returned predictions keep it, so every row equals the seed's path.
    model = tiny_model(tmp)  # own model: HF's output_hidden_states leaves hooks on blocks
    ids, mask, _, images, _, _ = tiny_batch(model, batch=3, text_only=(1,),
                                            pad_from=[None, 6, None])
    got = {}
    for impl in ("torch", "reference"):
        model.set_impl(impl)
        got[impl] = model.visual_interpretations(ids, mask, images)
    for task, layers in got["reference"].items():
        for k, ref in layers.items():
            torch.testing.assert_close(got["torch"][task][k], ref, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, t=task, k=k: f"{t} L{k}: {m}")


def test_fused_equals_reference_with_left_padding(tmp):
    model = tiny_model(tmp)
    model.llm.requires_grad_(False)
    batch = list(tiny_batch(model, batch=3, placeholders=[2, 4, 3]))
    ids, mask, labels = batch[0], batch[1], batch[2]
    for row, pad in ((1, 3), (2, 5)):  # shift rows right: left padding
        ids[row] = torch.roll(ids[row], pad)
        labels[row] = torch.roll(labels[row], pad)
        mask[row, :pad] = False
        ids[row, :pad] = 0
        labels[row, :pad] = -100
    fast, g_fast = _run(model, batch, "torch")
    ref, g_ref = _run(model, batch, "reference")
    torch.testing.assert_close(fast.loss, ref.loss, rtol=2e-5, atol=1e-6)
    for name, grad in g_ref.items():
        torch.testing.assert_close(g_fast[name], grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"grad {n}: {m}")


def test_fused_matches_float64_oracle_in_bf16(tmp):
    """bf16 model: loss within k x eager-bf16 error of the float64 oracle."""
    model = tiny_model(tmp)
    batch = tiny_batch(model, batch=3, pad_from=[None, 18, None])
    ref = model.double().set_impl("reference")(*[
        t.double() if torch.is_tensor(t) and t.is_floating_point() else t for t in batch[:5]],
        {k: v.double() for k, v in batch[5].items()})
    model.to(torch.bfloat16)
    bf16 = [t.bfloat16() if torch.is_tensor(t) and t.is_floating_point() else t
            for t in batch[:5]]
    targets = {k: v.bfloat16() for k, v in batch[5].items()}
    eager = model.set_impl("reference")(*bf16, targets)
    fast = model.set_impl("torch")(*bf16, targets)
    fast.loss.backward()
    assert torch.isfinite(fast.loss)
    assert model.mm_projector[0].weight.grad is not None
    assert_close_to_reference(fast.loss, ref.loss, eager.loss, name="bf16 loss", k=3.0,
                              dtype=torch.bfloat16)


def test_text_only_samples_do_not_count_in_embedding_losses(model):
    ids, mask, labels, images, image_mask, targets = tiny_batch(
        model, batch=4, text_only=(1, 3), pad_from=[None, 12, None, 10])
    out = model(ids, mask, labels, images, image_mask, targets)
    changed = {k: v.clone() for k, v in targets.items()}
    for v in changed.values():
        v[1] = 100.0  # a text-only sample's (meaningless) target
        v[3] = -7.0
    again = model(ids, mask, labels, images, image_mask, changed)
    for name in out.components:
        if name != "ntp":
            torch.testing.assert_close(again.components[name], out.components[name])
    # An all-text batch: no image features, embedding losses 0, next-token loss still trains.
    ids_t = ids.masked_fill(ids == -200, 5)
    out_t = model(ids_t, mask, labels, None, torch.zeros(4, dtype=torch.long), targets)
    assert all(float(v) == 0.0 for k, v in out_t.components.items() if k != "ntp")
    assert float(out_t.components["ntp"]) > 0


def test_target_mask_overrides_image_mask(model):
    batch = list(tiny_batch(model, batch=3))
    out = model(*batch, target_mask=torch.tensor([1, 0, 1]))
    batch[4] = torch.tensor([1, 0, 1])
    same = model(*batch)
    torch.testing.assert_close(out.loss, same.loss)


# ---- seed compatibility: SPEC 10's arithmetic written out independently ----


def test_seed_compat_refuses_an_image_off_the_fixed_offset(tmp):
    """SPEC 1.3: the seed's heads slice at num_sys_tokens; a sample whose image sits elsewhere
    must be an error, not heads fed the wrong positions. Text-only rows have no offset."""
    model = tiny_model(tmp, seed_compat=True, num_sys_tokens=3)
    ids, mask, labels, images, image_mask, targets = tiny_batch(
        model, batch=3, placeholders=[3, 7, 3], text_only=(2,))
    with pytest.raises(ValueError, match=r"num_sys_tokens=3 .*image position, got 7"):
        model(ids, mask, labels, images, image_mask, targets)
    ids, mask, labels, images, image_mask, targets = tiny_batch(
        model, batch=3, placeholders=[3, 3, 3], text_only=(2,))
    model(ids, mask, labels, images, image_mask, targets)  # text-only row 2: fine
    model.generate(ids, mask, images, max_new_tokens=1)  # no heads: no offset to check


def test_seed_compat_equals_the_seed_arithmetic(tmp):
    num_sys = 3
    model = tiny_model(tmp, seed_compat=True, num_sys_tokens=num_sys)
    ids, mask, labels, images, image_mask, targets = tiny_batch(
        model, batch=3, placeholders=[num_sys] * 3, pad_from=[None, 20, 17])
    out = model(ids, mask, labels, images, image_mask, targets)

    # The seed: output_hidden_states, fixed offsets, padding attended, seed loss arithmetic.
    sp = model.splice(ids, mask, labels, images)
    hs = model.parts.decoder(inputs_embeds=sp.inputs_embeds,
                             attention_mask=sp.attention_mask.long(),
                             output_hidden_states=True).hidden_states
    n_img = model.num_image_tokens
    p = num_sys + n_img
    end = p + 4 * len(model.tasks)
    m = image_mask.float()
    for task in model.tasks:
        idx = model.tasks.index(task)
        ts, te = p + 4 * idx, p + 4 * idx + 4
        total = 0.0
        for j, k in enumerate(model.layers[task]):
            h = hs[k]
            x = torch.cat([h[:, :p], h[:, ts:te], h[:, end:]], 1)
            q = h[:, p: p + 4] if task == "gen" else \
                model.task_tokens.parameter_for(task)[None].repeat(3, 1, 1)
            y = model.heads(task)[j](x, q)
            t = targets[task]
            if task == "seg":  # the seed permutes the prediction to (B, C, h, w)
                y = y.permute(0, 2, 1).reshape(t.shape)
            sl1 = (F.smooth_l1_loss(y.float(), t.float(), reduction="none")
                   * m.view(-1, *[1] * (t.dim() - 1))).mean()
            logits = F.normalize(y.flatten(1), dim=-1) @ F.normalize(t.flatten(1), dim=-1).T
            scale = model.logit_scale(task).exp().clamp(max=100)
            ce = F.cross_entropy(logits * scale, torch.arange(3), reduction="none")
            con = 0.3 * ce.mean() * m.mean()
            torch.testing.assert_close(out.components[f"{task}/L{k}/smooth_l1"], sl1.detach(),
                                       rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out.components[f"{task}/L{k}/contrastive"],
                                       con.detach(), rtol=1e-5, atol=1e-6)
            total = total + sl1 + con
        torch.testing.assert_close(out.components[task], 0.5 * total.detach(), rtol=1e-5,
                                   atol=1e-6)
    logits = model.parts.lm_head(hs[-1]).float()
    ntp = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                          sp.labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.components["ntp"], ntp.detach(), rtol=1e-5, atol=1e-6)


# ---- inference ----


def test_generate_refuses_bad_placeholders_before_any_device_work(model, monkeypatch):
    """On a GPU the splice's placeholder checks are device asserts (no sync in training), which
    would leave a chat session's CUDA context unusable: generation reads them back to the host
    (``host_checks``). Simulated here by treating the CPU tensors as a device's: the training
    forward then goes to torch._assert_async, generation still raises a ValueError."""
    from olakernels import _checks

    monkeypatch.setattr(_checks, "_check_on_host", lambda t: _checks._HOST_CHECKS.get())
    ids, mask, _, images, _, _ = tiny_batch(model, batch=2, placeholders=[4, 4])
    two = ids.clone()
    two[1, 6] = -200
    with pytest.raises(RuntimeError, match="at most one image placeholder") as raised:
        model(two, mask, images=images)
    assert not isinstance(raised.value, ValueError)  # the device path: an assert
    with pytest.raises(ValueError, match="at most one image placeholder.*got 2"):
        model.generate(two, mask, images, max_new_tokens=1)
    with pytest.raises(ValueError, match="no images were given"):
        model.generate(ids, mask, None, max_new_tokens=1)
    with pytest.raises(ValueError, match="at most one image placeholder"):
        model.visual_interpretations(two, mask, images)


def test_generate_and_visual_interpretations(model):
    ids, mask, _, images, _, _ = tiny_batch(model, batch=2, placeholders=[4, 4])
    new = model.generate(ids, mask, images, max_new_tokens=3, do_sample=False)
    assert new.shape[0] == 2 and 1 <= new.shape[1] <= 3
    assert new.dtype == torch.long and (new >= 0).all()
    preds = model.visual_interpretations(ids, mask, images)
    assert set(preds) == set(model.tasks)
    assert preds["depth"][2].shape == (2, 16, 16)
    assert preds["seg"][1].shape == (2, 16, 12)
    assert preds["gen"][3].shape == (2, 1, 16)


def test_generate_pads_with_the_first_eos_of_a_list(model):
    """Llama-3 style configs: no pad id, a list of end ids. Generation pads finished rows with
    the first one (as HF does), instead of handing the list on as a pad id."""
    configs = [model.llm.config, model.llm.generation_config]
    kept = [(c.pad_token_id, c.eos_token_id) for c in configs]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 90, (2, 12), generator=g)
    ids[0, 2] = -200
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :3] = False
    size = model.vision_tower.image_size
    images = torch.randn(2, 3, size, size, generator=g)
    try:
        for c in configs:
            c.pad_token_id, c.eos_token_id = None, [2, 7]
        assert model._default_pad_id() == 2
        kw = dict(max_new_tokens=4, do_sample=False)
        assert torch.equal(model.generate(ids, mask, images, **kw),
                           model.generate(ids, mask, images, pad_token_id=2, **kw))
        model.llm.generation_config.pad_token_id = 0  # 0 is an id, not "unset"
        assert model._default_pad_id() == 0
    finally:
        for c, (pad, eos) in zip(configs, kept, strict=True):
            c.pad_token_id, c.eos_token_id = pad, eos


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_generate_mixed_text_and_image_prompts_equals_one_at_a_time(model, padding):
    """A text-only prompt batched with an image prompt generates what it generates alone:
    the splice grows only the image row, so the text row must be re-aligned to the right."""
    g = torch.Generator().manual_seed(1)
    text = torch.randint(1, 90, (1, 10), generator=g)
    with_image = torch.randint(1, 90, (1, 12 if padding != "none" else 10), generator=g)
    with_image[0, 2] = -200
    size = model.vision_tower.image_size
    images = torch.randn(2, 3, size, size, generator=g)
    ids = torch.zeros(2, with_image.shape[1], dtype=torch.long)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    lo = ids.shape[1] - 10 if padding == "left" else 0
    ids[0, lo: lo + 10], mask[0, lo: lo + 10] = text[0], True
    ids[1], mask[1] = with_image[0], True
    kw = dict(max_new_tokens=5, do_sample=False)
    batched = model.generate(ids, mask, images, **kw)
    alone_text = model.generate(text, torch.ones_like(text, dtype=torch.bool), None, **kw)
    alone_image = model.generate(with_image, torch.ones_like(with_image, dtype=torch.bool),
                                 images[1:], **kw)
    assert batched[0].tolist() == alone_text[0].tolist()
    assert batched[1].tolist() == alone_image[0].tolist()


def test_layer_taps_keep_nothing_outside_a_forward(model):
    """The hooks stay installed (a stable hook set for per-block compile) but store only while
    the model's forward asks, and only the layers it asks for."""
    hooked = [i + 1 for i, layer in enumerate(model.parts.layers) if layer._forward_hooks]
    assert hooked == sorted({k for ls in model.layers.values() for k in ls} - {4, 0})
    batch = tiny_batch(model, batch=2)
    model(*batch)
    before = [dict(layer._forward_hooks) for layer in model.parts.layers]
    model(*batch)  # no hook added or removed by a forward
    assert [dict(layer._forward_hooks) for layer in model.parts.layers] == before
    assert model._taps.states == {} and not model._taps.wanted  # no activations kept
    model.llm(input_ids=batch[0].clamp(min=0))  # a plain LLM call: nothing captured
    assert not model._taps.wanted


# ---- errors ----


def test_bad_configs_fail_clearly(tmp):
    with pytest.raises(ValueError, match="unknown task 'shape'"):
        ModelConfig(aux_mode="gen-shape")
    with pytest.raises(ValueError, match=r"layers \[9\] are outside the LLM's 4 blocks"):
        tiny_model(tmp, tower=StandInTower(), layer_indices="d2-9_s1-3_g2-3")
    with pytest.raises(ValueError, match="multiple of num_task_tokens"):
        tiny_model(tmp, tower=StandInTower(), num_task_tokens=5)
    with pytest.raises(ValueError, match="num_sys_tokens"):
        ModelConfig(seed_compat=True)
    with pytest.raises(ValueError, match="num_task_tokens must be >= 1"):
        ModelConfig(num_task_tokens=0)
    assert ModelConfig(aux_mode="", num_task_tokens=0).tasks == ()  # no heads: nothing to read
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="max_length must be an integer >= 1"):
            ModelConfig(max_length=bad)
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        tiny_model(tmp, tower=StandInTower(), llm=str(tmp / "nope"))
    # A head whose output cannot be its target's layout is refused when configured (it failed
    # at the first step with targets, after the LLM forward).
    from olavlm.models.config import HeadConfig, default_heads

    for task, head, shown in (
            ("depth", HeadConfig(576, 768, (576, 1024)), r"\(576, 768\)"),
            ("seg", HeadConfig(575, 1536, (1536, 24, 24)), r"\(575, 1536\)"),
            ("gen", HeadConfig(1, 1024, (8, 1024)), r"\(1, 1024\)")):
        with pytest.raises(ValueError, match=rf"heads\['{task}'\] predicts {shown} per sample, "
                                             rf"which target_shape .* cannot be compared with"):
            ModelConfig(heads=dict(default_heads(), **{task: head}))
    with pytest.raises(ValueError, match="attn_implementation must be one of .*sdpa.*"
                                         "flash_attention_2.*got 'flash'"):
        ModelConfig(attn_implementation="flash")


def test_bad_batches_fail_clearly(model):
    ids, mask, labels, images, image_mask, targets = tiny_batch(model, batch=2)
    with pytest.raises(ValueError, match=r"targets: missing \['seg'\]"):
        model(ids, mask, labels, images, image_mask, {k: targets[k] for k in ("gen", "depth")})
    bad = dict(targets, depth=targets["depth"][:, :5])
    with pytest.raises(ValueError, match=r"targets\['depth'\] must have shape"):
        model(ids, mask, labels, images, image_mask, bad)
    two = ids.clone()
    two[0, 10] = -200
    with pytest.raises(ValueError, match="at most one image placeholder"):
        model(two, mask, labels, images, image_mask, targets)
    with pytest.raises(ValueError, match="no images were given"):
        model(ids, mask, labels, None, image_mask, targets)
    kept = model.config.max_length
    try:
        model.config.max_length = 0  # set after construction: the splice checks it too
        with pytest.raises(ValueError, match="max_length must be None or an integer >= 1"):
            model(ids, mask, labels, images, image_mask, targets)
    finally:
        model.config.max_length = kept


# ---- GPU: the fused path with compiled Triton kernels against the float64 oracle ----


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_fused_matches_float64_oracle(tmp, dtype):
    import copy

    model = tiny_model(tmp, impl="auto").cuda()
    model.llm.requires_grad_(False)
    batch = tiny_batch(model, batch=4, placeholders=[2, 4, 3, 5], text_only=(2,),
                       pad_from=[None, 19, None, 16])

    def on(dt):
        return [t.cuda().to(dt) if torch.is_tensor(t) and t.is_floating_point() else
                t.cuda() if torch.is_tensor(t) else {k: v.cuda().to(dt) for k, v in t.items()}
                for t in batch]

    oracle, g_oracle = _run(copy.deepcopy(model).double(), on(torch.float64), "reference")
    model.to(dtype)
    eager, g_eager = _run(model, on(dtype), "reference")
    fast, g_fast = _run(model, on(dtype), "auto")
    for name, value in oracle.components.items():
        assert_close_to_reference(fast.components[name], value, eager.components[name],
                                  name=name, k=3.0, dtype=dtype)
    for name, grad in g_oracle.items():
        assert_close_to_reference(g_fast[name], grad, g_eager[name], name=f"grad {name}",
                                  k=3.0, reduction_size=64)


def test_bf16_llm_with_fp32_trainable_parts(tmp):
    """Pre-training's layout: the frozen LLM stored in bf16, what the optimizer updates in fp32."""
    model = tiny_model(tmp, dtype="bfloat16", trainable_dtype="float32")
    assert next(model.llm.parameters()).dtype == torch.bfloat16
    for module in (model.mm_projector, model.task_tokens, model.heads("depth")):
        assert all(p.dtype == torch.float32 for p in module.parameters())
    model.llm.requires_grad_(False)
    batch = tiny_batch(model, batch=3, pad_from=[None, 18, None])
    out = model(*batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    # (the depth head's linear_2/3 feed no loss, as in the seed: no gradient)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert "mm_projector.0.weight" in grads and "task_tokens.special_seg_tokens" in grads
    assert all(g.dtype == torch.float32 for g in grads.values())
    with pytest.raises(ValueError, match="trainable_dtype must be"):
        ModelConfig(trainable_dtype="fp8")


def test_lean_decoder_modules_follow_the_impl(tmp):
    from olavlm.models.fused_rope import FusedRopeAttention
    from olavlm.models.lean_mlp import LeanSwiGLUMLP
    from olavlm.models.lean_norm import LeanRMSNorm

    model = tiny_model(tmp)
    lean = [m for m in model.llm.modules() if isinstance(m, (LeanRMSNorm, LeanSwiGLUMLP))]
    norms = [m for m in lean if isinstance(m, LeanRMSNorm)]
    attns = [m for m in model.llm.modules() if isinstance(m, FusedRopeAttention)]
    assert len(norms) == 2 * model.parts.num_layers + 1 and all(m.lean for m in lean)
    assert len(attns) == model.parts.num_layers and all(m.fused_rope for m in attns)
    model.set_impl("reference")  # the seed's math and memory
    assert not any(m.lean for m in lean) and not any(m.fused_rope for m in attns)
    model.set_impl("torch")
    assert all(m.lean for m in lean) and all(m.fused_rope for m in attns)
    assert {m.rope_impl for m in attns} == {"torch"}  # the model's impl reaches RoPE
    model.set_impl("triton")
    assert {m.rope_impl for m in attns} == {"triton"}
    plain = tiny_model(tmp, lean_norm=False, lean_mlp=False, fused_rope=False)
    assert not any(isinstance(m, (LeanRMSNorm, LeanSwiGLUMLP, FusedRopeAttention))
                   for m in plain.llm.modules())


def test_generate_refuses_prompts_it_would_cut_or_could_not_embed(model):
    """A spliced prompt longer than max_length was cut at its end (the question) and answered
    anyway; ids out of the vocabulary gave a bare IndexError (a device assert on a GPU); images
    for the image rows only named an internal tensor. Each is a ValueError naming the input."""
    ids, mask, _, images, _, _ = tiny_batch(model, batch=2, placeholders=[4, 4])
    lengths = model.splice(ids, mask, None, images).attention_mask.sum(1)
    full = lengths.max().item()
    over = (lengths - (full - 1)).clamp(min=0).sum().item()
    kept = model.config.max_length
    try:
        model.config.max_length = full - 1
        with pytest.raises(ValueError, match=rf"longer than the model's max_length .* by {over} "):
            model.generate(ids, mask, images, max_new_tokens=1)
        model.config.max_length = full  # exactly fits: generates
        assert model.generate(ids, mask, images, max_new_tokens=1).shape[0] == 2
    finally:
        model.config.max_length = kept
    vocab = model.parts.embed_tokens.num_embeddings
    for bad in (vocab, -1, -100):
        wrong = ids.clone()
        wrong[0, 1] = bad
        with pytest.raises(ValueError, match=rf"token ids at real positions must be in \[0, "
                                             rf"{vocab}\).*{bad}"):
            model.generate(wrong, mask, images, max_new_tokens=1)
    padded = ids.clone()
    padded[~mask] = -100  # padding may hold anything
    assert model.generate(padded, mask, images, max_new_tokens=1).shape[0] == 2
    with pytest.raises(ValueError, match=r"images: one per row of input_ids \(2 rows"):
        model.generate(ids, mask, images[:1], max_new_tokens=1)
    # A prompt without its batch dimension is named as such (not as too few images); an
    # empty prompt and a row with no real position are refused (not an IndexError, not a
    # generation from nothing).
    with pytest.raises(ValueError, match=r"input_ids must be a \(B, T\) integer tensor, got "
                                         r"shape \(\d+,\)"):
        model.generate(ids[0], None, images[:1], max_new_tokens=1)
    with pytest.raises(ValueError, match=r"input_ids must hold at least one position per row, "
                                         r"got shape \(2, 0\)"):
        model.generate(ids[:, :0], None, None, max_new_tokens=1)
    empty = mask.clone()
    empty[1] = False
    with pytest.raises(ValueError, match=r"attention_mask: every prompt needs a real \(True\) "
                                         r"position; a row with none, got 1"):
        model.generate(ids, empty, images, max_new_tokens=1)


def test_waiting_targets_are_read_after_the_llm_forward(model):
    """Targets still computed on the teachers' side stream (``PendingTargets.lazy()``): the
    model checks their shapes at once but waits for them only after the decoder ran, so the
    teachers overlap the vision tower and the LLM; the loss equals the one of plain targets."""
    from olavlm.teachers.online import PendingTargets, TeacherTargets

    ids, mask, labels, images, image_mask, targets = tiny_batch(model, batch=2)
    events = []

    class RecordedPending(PendingTargets):
        def wait(self):
            events.append("wait")
            return super().wait()

    hook = model.parts.layers[-1].register_forward_hook(lambda *_: events.append("last layer"))
    try:
        lazy = RecordedPending(TeacherTargets(targets, image_mask), None).lazy()
        assert "seg" in lazy and sorted(lazy) == sorted(targets) and events == []
        got = model(ids, mask, labels, images, image_mask, lazy)
    finally:
        hook.remove()
    assert events[0] == "last layer" and "wait" in events, events
    want = model(ids, mask, labels, images, image_mask, targets)
    assert torch.equal(got.loss, want.loss)
    bad = RecordedPending(TeacherTargets(dict(targets, depth=targets["depth"][:, :5]),
                                         image_mask), None).lazy()
    events.clear()
    with pytest.raises(ValueError, match=r"targets\['depth'\] must have shape"):
        model(ids, mask, labels, images, image_mask, bad)
    assert events == []  # refused on the shapes alone, before waiting


def test_forward_batch_equals_the_explicit_call(model):
    # forward_batch on a loader Batch (target_mask with a masked sample) is the model call on
    # its tensors; moving them (non-blocking) changes nothing.
    from olavlm.data.loader import Batch

    ids, mask, labels, images, image_mask, targets = tiny_batch(model, batch=3, text_only=(1,))
    target_mask = torch.tensor([1, 0, 0])
    batch = Batch(input_ids=ids, labels=labels, attention_mask=mask, images=images,
                  image_mask=image_mask, raw_images=None, teacher_views={},
                  sample_ids=["a", "b", "c"], indices=[0, 1, 2], targets=targets,
                  target_mask=target_mask)
    got = model.forward_batch(batch)
    want = model(ids, mask, labels, images, image_mask, targets, target_mask)
    assert got.components.keys() == want.components.keys()
    for name, value in want.components.items():
        torch.testing.assert_close(got.components[name], value, rtol=0, atol=0, msg=name)
    without = model.forward_batch(dataclasses.replace(batch, targets={}, target_mask=None))
    assert set(without.components) == {"ntp"}
