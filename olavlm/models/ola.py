# OlaVLM: vision -> projector -> splice with task tokens -> HF decoder with layer taps -> losses.
"""The OLA-VLM model (SPEC sections 1, 2, 4, 10, 12) on any Hugging Face causal decoder.

One pre-training forward::

    features = projector(vision_tower(images))                      # (B, NI, H), tower frozen
    embeds   = splice(ids, features, task tokens)                   # (B, L, H), no Python loop
    hidden   = decoder(embeds); taps keep only the heads' layers    # forward hooks
    ntp      = linear_cross_entropy(norm(h_L), lm_head, labels)     # labelled positions only
    per task, per tapped layer k:
        pred = head_k(h_k, queries, key mask)                       # no (B, L-16, H) copies
        loss_task += w_task * embedding_distill_loss(pred, target, mask, logit_scale_task)
    loss = ntp + sum(loss_task)

Targets arrive with the batch (teachers or the target cache); the model never runs teachers.
``impl="reference"`` runs the seed's math end to end (per-sample splice loop,
output_hidden_states, explicit head-input concatenation, full logits, the ops' reference
paths): the parity oracle of the fused path.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from olakernels._checks import fail_if_any, host_checks
from olakernels.embedding_loss import embedding_distill_loss, gather_targets
from olakernels.linear_cross_entropy import linear_cross_entropy

from .config import IMPLS, ModelConfig
from .fused_rope import FusedRopeAttention, make_attention_rope_fused
from .heads import build_task_heads
from .lean_mlp import LeanSwiGLUMLP, make_mlps_lean
from .lean_norm import LeanRMSNorm, make_norms_lean
from .llm import DecoderParts, LayerTaps, load_llm
from .projector import build_projector
from .splice import (
    SplicedInputs,
    align_right,
    check_ids_shape,
    count_supervised_tokens,
    head_key_mask,
    splice_inputs,
    splice_reference,
    task_token_positions,
)
from .task_tokens import TaskTokens

__all__ = ["OlaOutput", "OlaVLM"]

IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100


@dataclass
class OlaOutput:
    """loss: the training loss (with grad). components: detached fp32 scalars, still on the
    device (no host sync): "ntp", "<task>" (weighted task loss) and
    "<task>/L<k>/smooth_l1", "<task>/L<k>/contrastive" per tapped layer k.
    num_valid_tokens, token_accuracy: next-token statistics from the same pass over V.
    predictions: {task: {layer: pred}} when asked for."""

    loss: torch.Tensor
    components: dict[str, torch.Tensor]
    num_valid_tokens: torch.Tensor
    token_accuracy: torch.Tensor
    num_truncated: torch.Tensor
    predictions: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)

    def scalars(self) -> dict[str, float]:
        """All components as Python floats with ONE host read (for logging)."""
        names = list(self.components) + ["num_valid_tokens", "token_accuracy"]
        values = torch.stack([v.float() for v in self.components.values()]
                             + [self.num_valid_tokens.float(), self.token_accuracy.float()])
        return dict(zip(names, values.tolist(), strict=True))


# Hugging Face rotary embeddings' frequency buffers (kept fp32 under a dtype cast: _apply).
_ROPE_BUFFERS = ("inv_freq", "original_inv_freq")


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # (a torch built without distributed)
        return False
    return isinstance(t, DTensor)


class OlaVLM(nn.Module):
    """Build from a :class:`ModelConfig` (local paths), or pass ``llm`` / ``vision_tower``
    modules directly. Parameters: ``llm`` (HF model), ``vision_tower`` (frozen), ``mm_projector``,
    ``task_tokens.special_{task}_tokens``, ``image_{task}_heads.{i}``, ``{task}_logit_scale``."""

    def __init__(self, config: ModelConfig, *, llm: nn.Module | None = None,
                 vision_tower: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.llm = llm if llm is not None else load_llm(
            config.llm, dtype=config.dtype, attn_implementation=config.attn_implementation)
        if vision_tower is None:
            from .vision import build_vision_tower, tower_dtype_for

            vision_tower = build_vision_tower(config.vision_tower, kind=config.vision_kind,
                                              select_layer=config.vision_select_layer,
                                              dtype=tower_dtype_for(config.dtype))
        self.vision_tower = vision_tower
        self.parts = DecoderParts(self.llm)
        if config.lean_mlp:  # same parameters and keys; 1/3 less MLP activation memory
            make_mlps_lean(self.parts.layers)
        if config.lean_norm:  # same parameters and keys; bf16 input saved, not an fp32 copy
            make_norms_lean(self.llm)
        if config.fused_rope:  # same parameters and keys; RoPE in one fused pass each way
            make_attention_rope_fused(self.llm)
        hidden = self.parts.embed_tokens.embedding_dim
        self.hidden_size = hidden
        self.tasks = config.tasks
        self.layers = config.layers_per_task
        self.loss_weights = config.weights_per_task
        # Validate layer numbers against the decoder now, not at the first forward.
        # Hooks on the tapped blocks, installed once; raises on a layer beyond the decoder.
        self._taps = LayerTaps(self.parts,
                               {k for ls in self.layers.values() for k in ls}).install()
        self.mm_projector = build_projector(config.projector, vision_tower.hidden_size, hidden)
        self.task_tokens = TaskTokens(
            self.tasks, hidden, config.num_task_tokens,
            {t: config.heads[t].num_queries for t in self.tasks})
        for task in self.tasks:
            setattr(self, f"image_{task}_heads", build_task_heads(
                task, config.heads[task], len(self.layers[task]), hidden, config.impl))
            # fp32 whatever the LLM's dtype (a scalar in bf16 could not learn at lr 1e-3).
            # Shape (1,), not 0-d: FSDP2 cannot shard 0-d parameters (seed checkpoints hold
            # 0-d ones; checkpoint_io reshapes).
            setattr(self, f"{task}_logit_scale",
                    nn.Parameter(torch.full((1,), float(config.logit_scale_init))))
        dtype = getattr(torch, config.trainable_dtype) if config.trainable_dtype \
            else next(self.llm.parameters()).dtype
        for module in (self.mm_projector, self.task_tokens,
                       *(self.heads(t) for t in self.tasks)):
            module.to(dtype)
        self.set_impl(config.impl)
        self.process_group = None  # set by the trainer for the contrastive targets' gather

    # ---- construction helpers -------------------------------------------------------------

    def _apply(self, fn, recurse=True):
        """``model.bfloat16()`` / ``.half()`` keep in fp32 what a bf16 config builds in fp32:
        the decoder's RoPE frequencies (``inv_freq``, ``original_inv_freq``: non-persistent
        buffers, never saved; bf16 puts Llama-3's rotation angles off by up to ~7 rad at
        position 4096) and the logit scales (a bf16 scalar cannot learn at lr 1e-3). An
        exported model, whose loader builds both in fp32, is then the model in memory. (A
        float64 cast, the tests' oracle, converts everything; parameters sharded by FSDP2,
        which wants one dtype over them, are cast as asked: use its MixedPrecisionPolicy.)"""
        keep = [(m, m._buffers, name, buf) for m in self.modules()
                for name, buf in m._buffers.items() if name in _ROPE_BUFFERS]
        keep += [(self, self._parameters, f"{t}_logit_scale", self.logit_scale(t))
                 for t in self.tasks]
        keep = [(m, store, name, t.detach().clone()) for m, store, name, t in keep
                if t is not None and t.dtype == torch.float32 and t.device.type != "meta"
                and not _is_dtensor(t)]  # (FSDP2 wants one dtype over its sharded params)
        super()._apply(fn, recurse)
        for _, store, name, before in keep:
            after = store.get(name)
            if after is None or after.dtype not in (torch.bfloat16, torch.float16) \
                    or after.shape != before.shape or after.device.type == "meta":
                continue
            if isinstance(after, nn.Parameter):
                after.data = before.to(after.device)  # (the same Parameter: optimizers keep it)
                if after.grad is not None:  # (cast with it: an optimizer needs them alike)
                    after.grad = after.grad.float()
            else:
                store[name] = before.to(after.device)
        return self

    def heads(self, task: str) -> nn.ModuleList:
        return getattr(self, f"image_{task}_heads")

    def logit_scale(self, task: str) -> nn.Parameter:
        return getattr(self, f"{task}_logit_scale")

    def set_impl(self, impl: str) -> OlaVLM:
        """Switch every op's implementation (same parameters): "reference" is the oracle."""
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.impl = impl
        for task in self.tasks:
            for head in self.heads(task):
                head.projector.impl = impl
        for module in self.llm.modules():  # the seed's reference keeps eager memory and math
            if isinstance(module, (LeanSwiGLUMLP, LeanRMSNorm)):
                module.lean = impl != "reference"
                if isinstance(module, LeanSwiGLUMLP):
                    module.impl = impl if impl != "reference" else "auto"
            elif isinstance(module, FusedRopeAttention):
                module.fused_rope = impl != "reference"
                module.rope_impl = impl if impl != "reference" else "auto"
        return self

    @property
    def num_image_tokens(self) -> int:
        return self.vision_tower.num_tokens

    @property
    def num_inserted_tokens(self) -> int:
        """Rows that replace an image placeholder: the image tokens, then every task's tokens."""
        return self.num_image_tokens + self.config.num_task_tokens * len(self.tasks)

    def count_supervised_tokens(self, input_ids, attention_mask, labels) -> torch.Tensor:
        """The positions this model's next-token loss scores for a raw batch, without splicing
        (on the batch's device: a host batch costs no GPU sync). See ``ntp_tokens``."""
        return count_supervised_tokens(
            input_ids, attention_mask, labels, self.num_inserted_tokens,
            image_token_index=IMAGE_TOKEN_INDEX, ignore_index=IGNORE_INDEX,
            max_length=self.config.max_length)

    # ---- forward pieces ------------------------------------------------------------------

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, NI, H): the frozen tower (no grad) then the projector."""
        features = self.vision_tower(images)
        proj_dtype = next(self.mm_projector.parameters()).dtype
        return self.mm_projector(features.to(proj_dtype))

    def splice(self, input_ids, attention_mask=None, labels=None, images=None,
               *, static_length: bool = False) -> SplicedInputs:
        check_ids_shape(input_ids)  # (before the images' count, which reads its rows)
        if torch.is_tensor(images) and torch.is_tensor(input_ids) and images.dim() >= 1 and \
                input_ids.dim() >= 1 and images.shape[0] != input_ids.shape[0]:
            raise ValueError(f"images: one per row of input_ids ({input_ids.shape[0]} rows; a "
                             "text-only row's image is not read, any placeholder will do), got "
                             f"{images.shape[0]} of shape {tuple(images.shape)}")
        features = None if images is None else self.encode_images(images)
        tokens = self.task_tokens.inserted().to(self.parts.embed_tokens.weight.dtype)
        kwargs = dict(image_token_index=IMAGE_TOKEN_INDEX, ignore_index=IGNORE_INDEX,
                      max_length=self.config.max_length)
        if self.impl == "reference":
            return splice_reference(input_ids, attention_mask, labels, features, tokens,
                                    self.parts.embed_tokens, **kwargs)
        return splice_inputs(input_ids, attention_mask, labels, features, tokens,
                             self.parts.embed_tokens, static_length=static_length, **kwargs)

    def _decoder_mask(self, spliced: SplicedInputs, keep: bool = False) -> torch.Tensor | None:
        """The padding mask the decoder needs, or None when plain causal attention gives the
        same real positions: rows padded on the right only. Without a mask SDPA can run flash
        attention (fp16/bf16) with is_causal on the grouped K/V; with one it falls back to a
        kernel that takes a mask (memory-efficient or cuDNN) over the full L x L square, and
        HF expands K/V to every query head (4x their saved bytes for Llama-3's 8 of 32).
        Padding positions' own states change (they see earlier padding), so the mask stays
        where heads may read them: seed_compat (unmasked padding in the heads) and
        ``keep`` (returned predictions: a text-only row's gen queries can sit on padding)."""
        if spliced.right_padded and not self.config.seed_compat and not keep:
            return None
        return spliced.attention_mask.long()

    def _decode(self, spliced: SplicedInputs, taps: set[int], keep_mask: bool = False):
        """Run the decoder; returns (final normed state, {layer: state})."""
        n = self.parts.num_layers
        if self.impl == "reference":  # the seed's way: every hidden state, then slice
            out = self.parts.decoder(inputs_embeds=spliced.inputs_embeds,
                                     attention_mask=spliced.attention_mask.long(),
                                     output_hidden_states=True, use_cache=False)
            states = out.hidden_states
            return out.last_hidden_state, {k: states[k] for k in taps if k > 0}
        # Block n's entry of the seed's hidden_states tuple is the *normed* final state (HF
        # appends norm(h) last), so a tap on the last block reads the final state, as the seed.
        hooked = {k for k in taps if 0 < k < n}
        with self._taps.capture(hooked) as states:
            out = self.parts.decoder(inputs_embeds=spliced.inputs_embeds,
                                     attention_mask=self._decoder_mask(spliced, keep_mask),
                                     use_cache=False)
        final = out.last_hidden_state
        return final, {k: (states[k] if k in hooked else final) for k in taps if k > 0}

    def _ntp(self, final: torch.Tensor, labels: torch.Tensor, ntp_tokens=None,
             ntp_micro_batches: int = 1, ntp_rows: int | None = None):
        """Mean next-token loss over labelled positions. Distributed: each rank returns
        world / N_global * (its sum), so the ranks' mean -- what FSDP's gradient averaging
        computes -- is the mean over the global batch's tokens, exactly as one process on the
        whole batch (a per-rank mean would weight ranks with few labels too much).
        ``ntp_tokens`` given (the whole step's count): the sum is divided by
        ntp_tokens / ntp_micro_batches instead (times world when distributed), the trainer's way
        to make accumulated micro-batches weigh every token equally."""
        head = self.parts.lm_head
        group = self.process_group
        reduction = "sum" if (group is not None or ntp_tokens is not None) else "mean"
        loss, num_valid, correct = linear_cross_entropy(
            final, head.weight, labels, bias=head.bias, ignore_index=IGNORE_INDEX,
            shift_labels=True, return_stats=True, reduction=reduction,
            max_valid_tokens=ntp_rows,
            impl="reference" if self.impl == "reference" else self.impl)
        world = 1 if group is None else torch.distributed.get_world_size(group)
        if isinstance(ntp_tokens, int):  # a host count: plain arithmetic, no copy to the device
            loss = loss * (world * ntp_micro_batches / max(ntp_tokens, 1))
        elif ntp_tokens is not None:  # a device tensor (the trainer's): no sync
            total = ntp_tokens.to(device=loss.device, dtype=torch.float32, non_blocking=True)
            loss = loss * (world * ntp_micro_batches / total.clamp(min=1.0))
        elif group is not None:
            total = num_valid.detach().to(torch.float32).clone()
            torch.distributed.all_reduce(total, group=group)
            loss = loss * (world / total.clamp(min=1.0))
        return loss, num_valid, correct

    def _head_forward(self, task: str, index: int, state: torch.Tensor,
                      spliced: SplicedInputs) -> torch.Tensor:
        cfg = self.config
        n_task = cfg.num_task_tokens
        offset = self.task_tokens.offset(task)
        head = self.heads(task)[index]
        head_dtype = next(head.parameters()).dtype  # (bf16 under FSDP2 mixed precision)
        state = state.to(head_dtype)
        fixed = cfg.num_sys_tokens if cfg.seed_compat else None
        if task == "gen":
            if fixed is not None:
                start = fixed + spliced.num_image_tokens + offset
                queries = state[:, start: start + n_task]
            else:
                pos = task_token_positions(spliced, offset, n_task)
                queries = state.gather(1, pos[..., None].expand(-1, -1, state.shape[-1]))
        else:
            queries = self.task_tokens.parameter_for(task)
        if self.impl == "reference":
            return self._head_reference(head, state, queries, spliced, offset, n_task, fixed)
        keys = head_key_mask(spliced, offset, n_task, pass_text_to_aux=cfg.pass_text_to_aux,
                             mask_padding=not cfg.seed_compat, fixed_image_start=fixed)
        return head(state, queries, attend_mask=keys)

    def _head_reference(self, head, state, queries, spliced, offset, n_task, fixed):
        """The seed's explicit ``cat(h[:, :P], h[:, ts:te], h[:, end:])``; without seed_compat,
        per sample over its real tokens only (an independent check of head_key_mask)."""
        cfg = self.config
        n_img, n_all = spliced.num_image_tokens, spliced.num_task_tokens

        def pieces(h, start):
            p = start + n_img
            parts = [h[:, :p], h[:, p + offset: p + offset + n_task]]
            if cfg.pass_text_to_aux:
                parts.append(h[:, p + n_all:])
            return torch.cat(parts, 1)

        if fixed is not None:
            return head(pieces(state, fixed), queries)
        outs = []
        for i in range(state.shape[0]):
            h = state[i: i + 1][:, spliced.attention_mask[i]]
            q = queries[i: i + 1] if queries.dim() == 3 and queries.shape[0] > 1 else queries
            x = pieces(h, int(spliced.image_start[i])) if bool(spliced.has_image[i]) else h
            outs.append(head(x, q))
        return torch.cat(outs, 0)

    # ---- the training forward ------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        targets: dict[str, torch.Tensor] | None = None,
        target_mask: torch.Tensor | None = None,
        *,
        return_predictions: bool = False,
        static_length: bool = False,
        ntp_tokens: torch.Tensor | int | None = None,
        ntp_micro_batches: int = 1,
        ntp_rows: int | None = None,
    ) -> OlaOutput:
        """Loss and its components. ``labels`` None: no next-token loss. ``targets`` None: no
        embedding losses (VPT/IFT); given, it must hold every task of aux_mode (a mapping: the
        teachers' ``WaitingTargets`` is read only after the decoder ran). The embedding
        losses' per-sample mask is ``target_mask`` if given, else ``image_mask``, else whether
        the sample has an image placeholder. ``ntp_tokens``: with gradient accumulation, the
        supervised token count of the whole optimizer step (``count_supervised_tokens`` summed
        over its ``ntp_micro_batches`` micro-batches and over the ranks), an int or an integer
        tensor; each micro-batch then divides its next-token sum by ntp_tokens /
        ntp_micro_batches, so that the micro-batches' losses / ntp_micro_batches is the mean over
        the step's tokens. Default: this batch's own count (over all ranks when distributed).
        An integer, not a float tensor: FSDP2's mixed precision casts floating forward inputs to
        bf16, which would round the divisor. ``ntp_rows``: this batch's own supervised token
        count as a host int (``count_supervised_tokens`` of the host copy), so the fused LM head
        sizes its buffers and grids for those rows, not every position
        (``linear_cross_entropy``'s ``max_valid_tokens``; a wrong count makes the loss NaN)."""
        if ntp_tokens is not None and not (
                (isinstance(ntp_tokens, int) and not isinstance(ntp_tokens, bool)) or
                (isinstance(ntp_tokens, torch.Tensor) and not ntp_tokens.is_floating_point()
                 and ntp_tokens.numel() == 1)):
            got = f"a {ntp_tokens.dtype} tensor of shape {tuple(ntp_tokens.shape)}" \
                if isinstance(ntp_tokens, torch.Tensor) else repr(ntp_tokens)
            raise ValueError("ntp_tokens must be an integer count (an int or a one-element "
                             f"integer tensor), got {got} (a float tensor would be cast to bf16 "
                             "by FSDP2's mixed precision, rounding the loss's divisor)")
        if not isinstance(ntp_micro_batches, int) or ntp_micro_batches < 1:
            raise ValueError(f"ntp_micro_batches must be an int >= 1, got {ntp_micro_batches!r}")
        spliced = self.splice(input_ids, attention_mask, labels, images,
                              static_length=static_length)
        want_heads = bool(self.tasks) and (targets is not None or return_predictions)
        if targets is not None:
            self._check_targets(targets, input_ids.shape[0])
        if want_heads and self.config.seed_compat:
            # The seed's heads slice at a fixed offset (SPEC 1.3): a sample whose image sits
            # elsewhere would feed its heads the wrong positions without a word.
            n = self.config.num_sys_tokens
            fail_if_any(spliced.has_image & (spliced.image_start != n), spliced.image_start,
                        f"seed_compat: every image sample's placeholder must sit at "
                        f"num_sys_tokens={n} (the seed's fixed image offset: check the chat "
                        "template, or turn seed_compat off); a sample's image position")
        taps = {k for t in self.tasks for k in self.layers[t]} if want_heads else set()
        final, states = self._decode(spliced, taps, keep_mask=return_predictions)
        dev = final.device
        zero = torch.zeros((), device=dev)
        components: dict[str, torch.Tensor] = {}
        if labels is not None:
            ntp, num_valid, correct = self._ntp(final, spliced.labels, ntp_tokens,
                                                  ntp_micro_batches, ntp_rows)
            accuracy = correct.sum() / num_valid.clamp(min=1)
        else:
            ntp, num_valid, accuracy = zero, zero.long(), zero
        total = ntp
        components["ntp"] = ntp.detach().float()
        predictions: dict[str, dict[int, torch.Tensor]] = {}
        if want_heads:
            mask = self._loss_mask(target_mask, image_mask, spliced)
            for task in self.tasks:
                task_loss = zero
                target = None if targets is None else targets[task]
                gathered = None
                for i, k in enumerate(self.layers[task]):
                    state = final if k == 0 else states[k]
                    pred = self._head_forward(task, i, state, spliced)
                    if return_predictions:
                        predictions.setdefault(task, {})[k] = pred.detach()
                    if target is None:
                        continue
                    if i == 0:
                        target = _align_target(task, target.to(dev), pred.shape)
                        if self.process_group is not None and self.impl != "reference":
                            # (a float mask: every backend's all-gather takes it)
                            gathered = gather_targets(target.reshape(target.shape[0], -1),
                                                      mask.float(), self.process_group)
                    loss, sl1, con = embedding_distill_loss(
                        pred, target, mask, self.logit_scale(task).reshape(()),
                        beta=self.config.smooth_l1_beta,
                        contrastive_weight=self.config.contrastive_weight,
                        mask_mode="seed" if self.config.seed_compat else "per_sample",
                        process_group=self.process_group, gathered=gathered,
                        impl="reference" if self.impl == "reference" else self.impl)
                    task_loss = task_loss + loss
                    components[f"{task}/L{k}/smooth_l1"] = sl1.detach().float()
                    components[f"{task}/L{k}/contrastive"] = con.detach().float()
                if target is not None:
                    weighted = self.loss_weights[task] * task_loss
                    components[task] = weighted.detach().float()
                    total = total + weighted
        return OlaOutput(total, components, num_valid, accuracy.detach(),
                         spliced.num_truncated, predictions)

    def forward_batch(self, batch, **kwargs) -> OlaOutput:
        """Forward on an ``olavlm.data.Batch`` (what it reads moved to the model's device by
        non-blocking copies: from the loader's pinned memory they do not wait for the GPU)."""
        dev = self.parts.embed_tokens.weight.device

        def move(t):
            return None if t is None else t.to(dev, non_blocking=True)

        targets = {k: move(v) for k, v in batch.targets.items()} or None
        return self(move(batch.input_ids), move(batch.attention_mask), move(batch.labels),
                    move(batch.images), move(batch.image_mask), targets,
                    move(batch.target_mask), **kwargs)

    def _check_targets(self, targets, batch: int) -> None:
        missing = [t for t in self.tasks if t not in targets]
        if missing:
            raise ValueError(f"targets: missing {missing} (aux_mode {self.config.aux_mode!r} "
                             f"needs {list(self.tasks)}); got {sorted(targets)}")
        for task in self.tasks:
            want = (batch, *self.config.heads[task].target_shape)
            # (WaitingTargets: the shape without waiting for the teachers' side stream)
            shape_of = getattr(targets, "shape_of", None)
            got = tuple(shape_of(task) if shape_of else targets[task].shape)
            if got != want:
                raise ValueError(f"targets[{task!r}] must have shape {want} (batch, "
                                 f"heads[{task!r}].target_shape), got {got}")

    def _loss_mask(self, target_mask, image_mask, spliced) -> torch.Tensor:
        """(B,) bool: the samples the embedding losses count. Checked once here and passed on
        as bool, which the losses take without their own 0/1 check (it would run per task and
        layer: six checks a step)."""
        mask = target_mask if target_mask is not None else image_mask
        if mask is None:
            mask = spliced.has_image
        mask = mask.to(spliced.inputs_embeds.device)
        if mask.dtype != torch.bool:
            fail_if_any((mask != 0) & (mask != 1), mask,
                        "target_mask / image_mask must hold only 0/1 values")
        return mask.bool()

    # ---- inference -------------------------------------------------------------------------

    @torch.no_grad()
    def visual_interpretations(self, input_ids, attention_mask=None, images=None
                               ) -> dict[str, dict[int, torch.Tensor]]:
        """Each head's predicted embedding per tapped layer: {task: {layer: pred}} (for probing
        and the demo; no losses), in the heads' layout (seg: (B, h*w, C)). A text-only row's
        predictions mean nothing (training masks them; its gen queries depend on the batch)."""
        with host_checks():  # a bad prompt: ValueError, not a device assert (see generate)
            out = self(input_ids, attention_mask, images=images, return_predictions=True)
        return out.predictions

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, images=None, **generate_kwargs):
        """Chat generation with the KV cache; the heads are skipped. Batches may mix image and
        text-only prompts, padded on either side: after splicing every row is aligned to the
        right (``align_right``). Returns the new tokens only (HF behaviour with
        inputs_embeds). A prompt with more than one image placeholder, or one without
        images, token ids out of the vocabulary, or a spliced prompt longer than
        ``config.max_length``, is a ValueError (checked on the host: a device assert would end
        the session)."""
        with host_checks():  # the splice's input checks read back to the host: one sync
            if torch.is_tensor(attention_mask) and attention_mask.dim() == 2:
                rows = torch.arange(attention_mask.shape[0], device=attention_mask.device)
                fail_if_any(~attention_mask.bool().any(1), rows, "attention_mask: every prompt "
                            "needs a real (True) position; a row with none")
            spliced = self.splice(input_ids, attention_mask, None, images)
        cut = int(spliced.num_truncated)
        if cut:  # training may cut a long sample's tail; a prompt's tail is the question
            raise ValueError(
                f"input_ids: the spliced prompt is longer than the model's max_length "
                f"({self.config.max_length}) by {cut} positions (in all rows), which would "
                "cut the end of the prompt; shorten it, or load the model with a larger "
                "max_length (load_exported(..., max_length=N))")
        embeds, mask = align_right(spliced.inputs_embeds, spliced.attention_mask)
        if "pad_token_id" not in generate_kwargs:
            generate_kwargs["pad_token_id"] = self._default_pad_id()
        return self.llm.generate(inputs_embeds=embeds, attention_mask=mask.long(),
                                 **generate_kwargs)

    def _default_pad_id(self) -> int | None:
        """The pad id generation fills finished rows with: the generation config's, the model
        config's, else the (first) end-of-sequence id, as HF does. (0 is a valid id: test for
        None, not falsiness; an eos list such as Llama-3's [128001, 128009] gives its first.)"""
        sources = [getattr(self.llm, "generation_config", None), self.llm.config]
        for name in ("pad_token_id", "eos_token_id"):
            for source in sources:
                value = getattr(source, name, None)
                if isinstance(value, (list, tuple)):
                    value = value[0] if value else None
                if value is not None:
                    return int(value)
        return None


def _align_target(task: str, target: torch.Tensor, pred_shape: torch.Size) -> torch.Tensor:
    """The target in the head's layout. seg's teacher map (B, C, h, w) is compared with the
    head's tokens (B, h*w, C): the seed permutes the *prediction* to (B, C, h, w) per layer;
    transposing the target once per step gives the same losses (smooth-L1 is elementwise, and
    the contrastive dot products see the same permutation on both sides)."""
    if tuple(target.shape[1:]) == tuple(pred_shape[1:]):
        return target
    if target.dim() == 4 and len(pred_shape) == 3 and \
            target.shape[1] == pred_shape[2] and target.shape[2] * target.shape[3] == pred_shape[1]:
        return target.flatten(2).transpose(1, 2).contiguous()
    raise ValueError(f"targets[{task!r}] of shape {tuple(target.shape)} does not match the "
                     f"head's output {tuple(pred_shape)}")
