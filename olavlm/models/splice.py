# Splicing image features and task tokens into the token embeddings (SPEC 1.4, 9 item 12).
"""Build the LLM's input sequence without a per-sample Python loop.

For each sample with an image placeholder (IMAGE_TOKEN_INDEX) at position p, the sequence
becomes ``ids[:p] + image features (NI) + task tokens (NT) + ids[p + 1:]``; samples without a
placeholder are left as they are. One embedding lookup covers the text, then a single scatter
writes text, image and task rows into a preallocated ``(B, L, H)`` buffer. Labels are
IGNORE_INDEX on image and task positions; positions that received no token (padding) have
attention_mask False and IGNORE_INDEX labels. Padding may be on either side: right padding
stays right padding (training), left padding stays left padding (batched generation).

``splice_reference`` is the seed's per-sample loop (split at the placeholder, concatenate, pad
right): the independent oracle the tests compare against, and ``impl="reference"``'s path.

Head inputs (SPEC 1.6) need no copy: the resamplers have no positional embedding, so the seed's
``cat(h[:, :P], h[:, task_start:task_end], h[:, end:])`` is the same as attending over the whole
``h`` with a key mask that drops the other tasks' tokens (SPEC 9 item 9); ``head_key_mask``
builds it, per sample from the real image offsets (or from the seed's fixed offset).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from olakernels._checks import fail_if_any

__all__ = ["SplicedInputs", "align_right", "count_supervised_tokens", "head_key_mask",
           "splice_inputs", "splice_reference", "task_token_positions"]


@dataclass
class SplicedInputs:
    """The LLM's inputs after splicing, and where things landed.

    inputs_embeds (B, L, H); attention_mask (B, L) bool; labels (B, L) int64 or None;
    image_start (B,) int64: the first image position (0 for samples without an image);
    has_image (B,) bool; num_image_tokens, num_task_tokens: NI and NT (all tasks);
    num_truncated: () int64 device tensor, real positions dropped by max_length.
    right_padded: every row's real positions are a prefix (padding only on the right): True or
        False when the splice read it (with the length, in the same host read), None when it
        did not look (static_length, the reference splice). Causal attention without a padding
        mask is then exact for every real position (no real token sees a later position).
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    image_start: torch.Tensor
    has_image: torch.Tensor
    num_image_tokens: int
    num_task_tokens: int
    num_truncated: torch.Tensor
    right_padded: bool | None = None

    @property
    def task_block_start(self) -> torch.Tensor:
        return self.image_start + self.num_image_tokens


def check_ids_shape(input_ids) -> None:
    """input_ids is a (B, T) integer tensor with T >= 1 (checked before anything reads it)."""
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or \
            input_ids.dtype not in (torch.int64, torch.int32):
        got = (f"shape {tuple(input_ids.shape)} dtype {input_ids.dtype}"
               if torch.is_tensor(input_ids) else type(input_ids).__name__)
        raise ValueError(f"input_ids must be a (B, T) integer tensor, got {got}")
    if input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must hold at least one position per row, got shape "
                         f"{tuple(input_ids.shape)}")


def _check_ids(input_ids, attention_mask, labels, image_features, image_token_index,
               vocab_size: int | None = None) -> None:
    check_ids_shape(input_ids)
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"labels must have input_ids' shape {tuple(input_ids.shape)}, got "
                         f"{tuple(labels.shape)}")
    if image_features is not None and (image_features.dim() != 3
                                       or image_features.shape[0] != input_ids.shape[0]):
        raise ValueError(f"image_features must be (B={input_ids.shape[0]}, NI, H), got "
                         f"{tuple(image_features.shape)}")
    if vocab_size is not None:  # (an embedding lookup out of range: IndexError, or on a GPU a
        # device assert that ends the session, naming neither the id nor where it is)
        real = input_ids == input_ids if attention_mask is None else attention_mask.bool()
        outside = (input_ids < 0) | (input_ids >= vocab_size)
        bad = real & (input_ids != image_token_index) & outside
        fail_if_any(bad, input_ids, f"input_ids: token ids at real positions must be in [0, "
                    f"{vocab_size}) (the embedding's rows) or {image_token_index} (the image "
                    "placeholder); an id")
    count = (input_ids == image_token_index).sum(1)
    fail_if_any(count > 1, count, "input_ids: at most one image placeholder per sample is "
                "supported (multi-image samples are not); a sample's number of placeholders")
    if image_features is None:
        fail_if_any(count > 0, count, "input_ids hold an image placeholder but no images were "
                    "given (pass images=...); a sample's number of placeholders")


def _check_max_length(max_length) -> None:
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                   or max_length < 1):
        raise ValueError(f"max_length must be None or an integer >= 1, got {max_length!r}")


@dataclass
class _Layout:
    """Where each raw position and the image block land in the spliced buffer.

    text_slot (B, T): the buffer position of each raw position (meaningful where ``text_kept``);
    block_start (B,): the buffer position of the image block's first row; block_kept (B,): how
    many of its rows survive ``max_length``; end (B,): one past each row's last kept slot."""

    first: torch.Tensor
    has_image: torch.Tensor
    text: torch.Tensor
    text_slot: torch.Tensor
    text_kept: torch.Tensor
    block_start: torch.Tensor
    block_kept: torch.Tensor
    end: torch.Tensor


def _layout(real: torch.Tensor, is_img: torch.Tensor, num_inserted: int,
            max_length: int | None) -> _Layout:
    """The splice's positions, shared by ``splice_inputs`` and ``count_supervised_tokens``.

    ``max_length`` bounds each row's *real* positions, as the seed's loop does (it cuts a row
    after dropping its padding): a token is kept when fewer than max_length real positions
    precede it. Padding keeps its side, but a left-padded row that would overflow the buffer
    gives up just enough of its leading padding to fit (padding inside a row, which batches do
    not have, is never given up: what overflows then is cut from the right)."""
    _check_max_length(max_length)
    b, t = real.shape
    dev = real.device
    has_image = is_img.any(1)
    first = torch.where(has_image, is_img.int().argmax(1), t)
    inserted = num_inserted * has_image.long()
    pos = torch.arange(t, device=dev)[None, :]
    new_pos = pos + torch.where(pos > first[:, None], inserted[:, None] - 1, 0)
    text = real & ~is_img
    block_start = torch.where(has_image, first, 0)
    if max_length is None:
        block_kept = inserted
        text_kept = text
        end = torch.maximum(torch.where(text, new_pos + 1, 0).amax(1) if t else
                            torch.zeros(b, dtype=torch.long, device=dev),
                            torch.where(has_image, first + inserted, 0))
        return _Layout(first, has_image, text, new_pos, text_kept, block_start, block_kept, end)
    pad = (~real).long()
    pads_before = pad.cumsum(1) - pad  # padding positions before each raw position
    text_kept = text & (new_pos - pads_before < max_length)
    block_rank = block_start - pads_before.gather(1, block_start.clamp(max=max(t - 1, 0))[:, None]
                                                  )[:, 0] if t else block_start
    block_kept = (max_length - block_rank).clamp(min=0).minimum(inserted)
    end = torch.maximum(torch.where(text_kept, new_pos + 1, 0).amax(1) if t else
                        torch.zeros(b, dtype=torch.long, device=dev),
                        torch.where(block_kept > 0, block_start + block_kept, 0))
    lead = torch.where(real.any(1), real.int().argmax(1), 0) if t else end * 0
    shift = (end - max_length).clamp(min=0).minimum(lead)
    text_slot = new_pos - shift[:, None]
    text_kept &= text_slot < max_length
    block_start = torch.where(has_image, block_start - shift, 0)  # (text-only rows: 0)
    block_kept = block_kept.minimum((max_length - block_start).clamp(min=0))
    end = (end - shift).clamp(max=max_length)
    return _Layout(first, has_image, text, text_slot, text_kept, block_start, block_kept, end)


def splice_inputs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    image_features: torch.Tensor | None,
    task_tokens: torch.Tensor,
    embed_tokens: nn.Embedding,
    *,
    image_token_index: int = -200,
    ignore_index: int = -100,
    max_length: int | None = None,
    static_length: bool = False,
) -> SplicedInputs:
    """Vectorized splice (module doc). ``static_length=True`` sizes the buffer from the shapes
    alone (T - 1 + NI + NT when images are given) instead of reading the longest spliced
    sample's length back to the host: no synchronization, at the cost of extra padding."""
    _check_ids(input_ids, attention_mask, labels, image_features, image_token_index,
               getattr(embed_tokens, "num_embeddings", None))
    b, t = input_ids.shape
    dev = input_ids.device
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None \
        else attention_mask.bool()
    is_img = (input_ids == image_token_index) & real
    n_img = 0 if image_features is None else image_features.shape[1]
    n_task = task_tokens.shape[0] if n_img else 0  # text-only batches insert nothing
    lay = _layout(real, is_img, n_img + n_task, max_length)
    has_image, text = lay.has_image, lay.text
    right_padded = None
    if static_length:
        length = t - 1 + n_img + n_task if n_img else t
    elif b:  # one host read: the longest spliced sample, and whether padding is right only
        # Real input positions a prefix of each row => the spliced rows' too (the image block
        # replaces the placeholder in place; truncation cuts from the right).
        gap = (~real[:, :-1] & real[:, 1:]).any()
        length, gap = torch.stack([lay.end.max(), gap.long()]).tolist()
        right_padded = not gap
    else:
        length = 0
    length = max(1, length)
    if max_length is not None:
        length = min(length, max_length)

    dummy = length  # an extra slot that absorbs everything not written, dropped at the end
    ids = input_ids.masked_fill(~text, 0).long()
    token_embeds = embed_tokens(ids)
    hidden = token_embeds.shape[-1]
    idx_parts = [torch.where(lay.text_kept & (lay.text_slot < length), lay.text_slot, dummy)]
    src_parts = [token_embeds]
    start = lay.block_start
    if n_img:
        if image_features.shape[-1] != hidden:
            raise ValueError(f"image_features must have the LLM's hidden size {hidden}, got "
                             f"{image_features.shape[-1]} (check the projector)")
        j = torch.arange(n_img + n_task, device=dev)[None, :]
        block = start[:, None] + j
        idx_parts.append(torch.where((j < lay.block_kept[:, None]) & (block < length), block,
                                     dummy))
        src_parts.append(image_features.to(token_embeds.dtype))
        if n_task:
            src_parts.append(task_tokens.to(token_embeds.dtype)[None].expand(b, -1, -1))
    idx = torch.cat(idx_parts, 1)
    src = torch.cat(src_parts, 1) if len(src_parts) > 1 else src_parts[0]
    buf = src.new_zeros(b, length + 1, hidden)
    embeds = buf.scatter(1, idx[..., None].expand(-1, -1, hidden), src)[:, :length]
    written = torch.zeros(b, length + 1, dtype=torch.bool, device=dev)
    written = written.scatter(1, idx, torch.ones_like(idx, dtype=torch.bool))[:, :length]
    new_labels = None
    if labels is not None:
        new_labels = torch.full((b, length + 1), ignore_index, dtype=torch.long, device=dev)
        new_labels = new_labels.scatter(1, idx_parts[0], labels.long())[:, :length]
    kept = (idx < length).sum()
    total = text.sum() + (has_image.long() * (n_img + n_task)).sum()
    return SplicedInputs(embeds, written, new_labels, start, has_image, n_img, n_task,
                         total - kept, right_padded)


def align_right(inputs_embeds: torch.Tensor, attention_mask: torch.Tensor):
    """Shift each row so that its last real position is the buffer's last (left padding).

    Generation continues every row from the buffer's last position, so each row's prompt must
    end there. Splicing grows only the rows with an image, which leaves a text-only row of a
    mixed batch with padding on its right even when the raw ids were left-padded; right-padded
    ids have the same problem. Rows' real tokens are contiguous after splicing, so a per-row
    shift (one gather) fixes both. Returns (inputs_embeds, attention_mask)."""
    b, length = attention_mask.shape
    pos = torch.arange(length, device=attention_mask.device)
    last = torch.where(attention_mask, pos[None, :], -1).amax(1)
    shift = length - 1 - last  # a row with no real token gets `length`: all padding
    src = pos[None, :] - shift[:, None]
    inside = src >= 0
    src = src.clamp(min=0)
    mask = attention_mask.gather(1, src) & inside
    embeds = inputs_embeds.gather(1, src[..., None].expand(-1, -1, inputs_embeds.shape[-1]))
    return embeds * mask[..., None].to(embeds.dtype), mask


def count_supervised_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    num_inserted: int,
    *,
    image_token_index: int = -200,
    ignore_index: int = -100,
    max_length: int | None = None,
) -> torch.Tensor:
    """How many positions the next-token loss scores after ``splice_inputs``, computed from the
    raw batch (on whatever device it lives: the trainer counts its host copy, no GPU sync).

    ``num_inserted``: the rows that replace an image placeholder (NI + NT). A text token at raw
    position p lands at p (before the placeholder) or p + num_inserted - 1 (after it), less the
    leading padding a left-padded row gives up to fit ``max_length`` (``_layout``); it is
    scored when its label is not ignored, fewer than ``max_length`` real positions precede it
    in the spliced row, and it is not the
    sequence's first position (the causal shift predicts position t + 1 from t). Returns a 0-d
    int64 tensor, equal to ``(spliced.labels[:, 1:] != ignore_index).sum()`` for
    ``splice_inputs`` (any padding) and for ``splice_reference`` with right padding (the seed's
    loop re-pads every row on the right, so left padding moves its labels)."""
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None \
        else attention_mask.bool()
    is_img = (input_ids == image_token_index) & real
    lay = _layout(real, is_img, num_inserted, max_length)
    scored = lay.text_kept & (labels != ignore_index) & (lay.text_slot >= 1)
    return scored.sum()


def splice_reference(
    input_ids, attention_mask, labels, image_features, task_tokens, embed_tokens, *,
    image_token_index: int = -200, ignore_index: int = -100, max_length: int | None = None,
) -> SplicedInputs:
    """The seed's per-sample loop (SPEC 1.4), right padding only: the oracle of splice_inputs."""
    _check_ids(input_ids, attention_mask, labels, image_features, image_token_index,
               getattr(embed_tokens, "num_embeddings", None))
    _check_max_length(max_length)
    b = input_ids.shape[0]
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None \
        else attention_mask.bool()
    rows, row_labels, starts, has, cut = [], [], [], [], 0
    for i in range(b):
        ids_i = input_ids[i][real[i]]
        lab_i = None if labels is None else labels[i][real[i]]
        where = (ids_i == image_token_index).nonzero().flatten().tolist()
        if where and image_features is not None:
            p = where[0]
            dtype = embed_tokens.weight.dtype
            pieces = [embed_tokens(ids_i[:p].long()), image_features[i].to(dtype),
                      task_tokens.to(dtype), embed_tokens(ids_i[p + 1:].long())]
            ignore = torch.full((image_features.shape[1] + task_tokens.shape[0],), ignore_index)
            lab = None if lab_i is None else torch.cat([lab_i[:p].cpu(), ignore,
                                                        lab_i[p + 1:].cpu()])
            starts.append(p)
            has.append(True)
        else:
            pieces = [embed_tokens(ids_i.long())]
            lab = None if lab_i is None else lab_i.cpu()
            starts.append(0)
            has.append(False)
        row = torch.cat(pieces, 0)
        if max_length is not None:
            cut += max(0, row.shape[0] - max_length)
            row = row[:max_length]
            lab = None if lab is None else lab[:max_length]
        rows.append(row)
        row_labels.append(lab)
    length = max(r.shape[0] for r in rows)
    hidden = rows[0].shape[-1]
    dev = input_ids.device
    embeds = rows[0].new_zeros(b, length, hidden)
    mask = torch.zeros(b, length, dtype=torch.bool, device=dev)
    out_labels = None if labels is None else torch.full((b, length), ignore_index,
                                                        dtype=torch.long, device=dev)
    for i, row in enumerate(rows):
        embeds[i, : row.shape[0]] = row
        mask[i, : row.shape[0]] = True
        if out_labels is not None:
            out_labels[i, : row.shape[0]] = row_labels[i].to(dev)
    n_img = 0 if image_features is None else image_features.shape[1]
    return SplicedInputs(embeds, mask, out_labels, torch.tensor(starts, device=dev),
                         torch.tensor(has, device=dev), n_img, task_tokens.shape[0] if n_img else 0,
                         torch.tensor(cut, dtype=torch.long, device=dev))


def task_token_positions(spliced: SplicedInputs, offset: int, count: int) -> torch.Tensor:
    """(B, count) positions of one task's tokens (clamped into range for text-only samples)."""
    pos = spliced.task_block_start[:, None] + offset + torch.arange(
        count, device=spliced.image_start.device)[None, :]
    return pos.clamp(max=spliced.attention_mask.shape[1] - 1)


def head_key_mask(spliced: SplicedInputs, offset: int, count: int, *, pass_text_to_aux: bool,
                  mask_padding: bool, fixed_image_start: int | None = None) -> torch.Tensor:
    """(B, L) bool, True where the task's head may attend (SPEC 1.6): everything before the
    task-token block (system prompt and image), this task's ``count`` tokens at ``offset`` in
    the block, and the text after the block when ``pass_text_to_aux``. ``mask_padding`` also
    drops padding (the seed attends to it). ``fixed_image_start`` uses the seed's hard-coded
    offset instead of each sample's (seed_compat)."""
    b, length = spliced.attention_mask.shape
    dev = spliced.attention_mask.device
    if fixed_image_start is not None:
        start = torch.full((b,), fixed_image_start + spliced.num_image_tokens, device=dev)
        has = torch.ones(b, dtype=torch.bool, device=dev)
    else:
        start = spliced.task_block_start
        has = spliced.has_image
    pos = torch.arange(length, device=dev)[None, :]
    block_lo = start[:, None]
    block_hi = block_lo + spliced.num_task_tokens
    in_block = (pos >= block_lo) & (pos < block_hi)
    mine = (pos >= block_lo + offset) & (pos < block_lo + offset + count)
    keep = ~in_block | mine
    if not pass_text_to_aux:
        keep &= pos < block_hi
    keep = torch.where(has[:, None], keep, torch.ones_like(keep))
    if mask_padding:
        keep &= spliced.attention_mask
    return keep
