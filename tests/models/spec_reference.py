# Independent float64 oracle of OlaVLM's pre-training forward, written from SPEC.md alone.
"""``spec_forward`` recomputes the training loss of SPEC section 10 (with the section 12
choices) in float64 with its own code: its own Llama / Qwen2 / Phi-3 decoder, splice, task
tokens, resampler heads and losses. Nothing here imports olavlm's model code; it reads

- an ``OlaVLM``'s ``state_dict()`` (the weights, by their checkpoint keys; SPEC 11),
- the fields of its ``ModelConfig`` (aux_mode, num_task_tokens, layer_indices, loss_weights,
  contrastive_weight, smooth_l1_beta, heads, pass_text_to_aux, seed_compat, num_sys_tokens,
  max_length),
- the decoder's HF ``config.json`` as a dict,
- the frozen vision tower's patch features (``clip_patch_features``: HF's CLIPVisionModel).

Sections used: 1.1 (vision features), 1.2 (projector), 1.4 (splice), 1.5 (task tokens),
1.6 (which states feed which head), 2.1-2.3 (heads), 4.1-4.3 (losses), 10 and 12.

Two layouts (SPEC 12):
- default: every row is spliced from its real tokens (left or right padding dropped), the
  image offset is found per row, and the heads read only a row's real positions; the
  embedding losses are per-sample means over rows with mask 1.
- ``config.seed_compat``: the seed's fixed image offset ``num_sys_tokens``, rows right-padded
  with zero embeddings (masked in the decoder, read by the heads), and the seed's arithmetic
  (smooth-L1 mean over all elements, contrastive mean times mean(mask)).

Shape letters: B batch, T a row's length, H decoder width, N image tokens, n task tokens per
task, Q head queries, D the flattened prediction.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["clip_patch_features", "spec_forward"]

F64 = torch.float64
IMAGE_TOKEN = -200
IGNORE = -100
MAX_LOGIT_SCALE = 100.0  # SPEC 4.2: clamp(exp(logit_scale), max=100)
LN_EPS = 1e-5  # the resampler's LayerNorms (SPEC 2.1)
TASK_LETTERS = {"d": "depth", "s": "seg", "g": "gen"}


# ---- config strings (SPEC 1.6, 4.3) --------------------------------------------------------


def parse_layers(spec: str | dict, tasks: list[str]) -> dict[str, list[int]]:
    """"d2-4_s1-3" -> {"depth": [2, 4], "seg": [1, 3]}: discrete layers, not ranges. A task the
    spec does not name gets [0], the final normed state (the seed's "0" -> index -1)."""
    if isinstance(spec, dict):
        found = {t: [int(k) for k in v] for t, v in spec.items()}
    else:
        found = {TASK_LETTERS[m[0]]: [int(k) for k in m[1:].split("-")]
                 for m in re.findall(r"[a-zA-Z]\d+(?:-\d+)?", spec)}
    return {t: found.get(t, [0]) for t in tasks}


def parse_weights(spec: str | dict, tasks: list[str]) -> dict[str, float]:
    """"d0.25_g1.0" -> per-task weights; a missing task defaults to 0.5."""
    if isinstance(spec, dict):
        found = {t: float(w) for t, w in spec.items()}
    else:
        found = {TASK_LETTERS[m[0]]: float(m[1:]) for m in re.findall(r"[a-zA-Z]\d+\.\d+", spec)}
    return {t: found.get(t, 0.5) for t in tasks}


# ---- vision features (SPEC 1.1) ------------------------------------------------------------


@torch.no_grad()
def clip_patch_features(tower_dir: str | Path, images: torch.Tensor,
                        select_layer: int = -2) -> torch.Tensor:
    """(B, 3, S, S) -> (B, N, C): ``hidden_states[select_layer][:, 1:]`` of HF's CLIP tower."""
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel.from_pretrained(str(tower_dir), dtype=F64).eval()
    out = tower(pixel_values=images.to(F64), output_hidden_states=True)
    return out.hidden_states[select_layer][:, 1:]


# ---- decoder: Llama / Qwen2 / Phi-3 (HF semantics) -----------------------------------------


class Decoder:
    """The HF decoder's ``hidden_states`` for one row: [embeddings, block 1, ..., block L-1,
    norm(block L)] (HF replaces the last block's output by its normed state)."""

    def __init__(self, weights: dict[str, torch.Tensor], config: dict) -> None:
        self.w = {k.removeprefix("llm."): v for k, v in weights.items() if k.startswith("llm.")}
        self.kind = config["model_type"]
        self.num_layers = config["num_hidden_layers"]
        self.num_heads = config["num_attention_heads"]
        self.num_kv_heads = config.get("num_key_value_heads") or self.num_heads
        self.head_dim = config.get("head_dim") or config["hidden_size"] // self.num_heads
        self.eps = config["rms_norm_eps"]
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        self.theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        # Only what the tiny test decoders use; anything else would need more code here.
        assert self.kind in ("llama", "qwen2", "phi3"), self.kind
        assert rope.get("rope_type", "default") == "default", rope
        assert rope.get("partial_rotary_factor") in (None, 1.0), rope
        assert config.get("partial_rotary_factor") in (None, 1.0)
        assert not config.get("tie_word_embeddings"), "lm_head.weight is read from its own key"

    def _rms(self, x: torch.Tensor, key: str) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.w[key]

    def _rope(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate-half RoPE on (heads, T, d) at positions 0..T-1."""
        d = x.shape[-1]
        inv_freq = 1.0 / self.theta ** (torch.arange(0, d, 2, dtype=F64) / d)
        angles = torch.arange(x.shape[1], dtype=F64)[:, None] * inv_freq[None]
        angles = torch.cat([angles, angles], -1)
        rotated = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
        return x * angles.cos() + rotated * angles.sin()

    def _qkv(self, x: torch.Tensor, pre: str):
        if self.kind == "phi3":  # one fused projection
            sizes = [self.num_heads * self.head_dim] + [self.num_kv_heads * self.head_dim] * 2
            return (x @ self.w[pre + "qkv_proj.weight"].T).split(sizes, -1)
        out = []
        for name in ("q_proj", "k_proj", "v_proj"):
            y = x @ self.w[f"{pre}{name}.weight"].T
            out.append(y + self.w[f"{pre}{name}.bias"] if self.kind == "qwen2" else y)
        return out

    def _attention(self, x: torch.Tensor, pre: str, allowed: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self._qkv(x, pre)
        q = self._rope(q.view(T, self.num_heads, self.head_dim).transpose(0, 1))
        k = self._rope(k.view(T, self.num_kv_heads, self.head_dim).transpose(0, 1))
        v = v.view(T, self.num_kv_heads, self.head_dim).transpose(0, 1)
        group = self.num_heads // self.num_kv_heads  # grouped-query attention
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        out = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
        return out.transpose(0, 1).reshape(T, -1) @ self.w[pre + "o_proj.weight"].T

    def _mlp(self, x: torch.Tensor, pre: str) -> torch.Tensor:
        if self.kind == "phi3":
            gate, up = (x @ self.w[pre + "gate_up_proj.weight"].T).chunk(2, -1)
        else:
            gate = x @ self.w[pre + "gate_proj.weight"].T
            up = x @ self.w[pre + "up_proj.weight"].T
        return (F.silu(gate) * up) @ self.w[pre + "down_proj.weight"].T

    def hidden_states(self, embeds_TH: torch.Tensor,
                      key_valid_T: torch.Tensor | None = None) -> list[torch.Tensor]:
        """``key_valid_T``: which positions may be attended to (a padded row's real ones)."""
        T = embeds_TH.shape[0]
        allowed = torch.ones(T, T, dtype=torch.bool).tril()
        if key_valid_T is not None:
            allowed = allowed & key_valid_T[None, :]
        h = embeds_TH
        states = [h]
        for i in range(self.num_layers):
            pre = f"model.layers.{i}."
            h = h + self._attention(self._rms(h, pre + "input_layernorm.weight"),
                                    pre + "self_attn.", allowed)
            h = h + self._mlp(self._rms(h, pre + "post_attention_layernorm.weight"), pre + "mlp.")
            states.append(h)
        states[-1] = self._rms(h, "model.norm.weight")
        return states


# ---- heads (SPEC 2.1, 2.3) -----------------------------------------------------------------


def _sub(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}


def _layer_norm(x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), w[name + ".weight"], w[name + ".bias"], LN_EPS)


def perceiver_attention(w, x_KE, lat_QE, heads: int, dim_head: int) -> torch.Tensor:
    """Latents attend to [inputs, latents] (keys: inputs THEN latents), scale d^-1/4 twice."""
    x_n, lat_n = _layer_norm(x_KE, w, "norm1"), _layer_norm(lat_QE, w, "norm2")
    q = lat_n @ w["to_q.weight"].T
    k, v = (torch.cat([x_n, lat_n], 0) @ w["to_kv.weight"].T).chunk(2, -1)
    q, k, v = (t.view(t.shape[0], heads, dim_head).transpose(0, 1) for t in (q, k, v))
    s = dim_head ** -0.25
    attn = ((q * s) @ (k * s).transpose(-1, -2)).softmax(-1)
    return (attn @ v).transpose(0, 1).reshape(lat_QE.shape[0], -1) @ w["to_out.weight"].T


def _match_queries(latents: torch.Tensor, num_queries: int) -> torch.Tensor:
    """TaskTokenResampler's rule when the latents' count is not num_queries."""
    n = latents.shape[0]
    if n == num_queries:
        return latents
    if num_queries > 1 and num_queries % n == 0:
        return latents.repeat(num_queries // n, 1)
    return latents.mean(0, keepdim=True).repeat(num_queries, 1)


def task_token_resampler(w, x_KH, latents, head) -> torch.Tensor:
    """TaskTokenResampler: the SAME proj_in maps inputs and latents; (Q, output_dim)."""
    lat = F.linear(_match_queries(latents, head.num_queries), w["proj_in.weight"],
                   w["proj_in.bias"])
    x = F.linear(x_KH, w["proj_in.weight"], w["proj_in.bias"])
    for j in range(head.depth):
        lat = lat + perceiver_attention(_sub(w, f"layers.{j}.0."), x, lat, head.heads,
                                        head.dim_head)
        ff = _sub(w, f"layers.{j}.1.")  # LN -> Linear -> exact GELU -> Linear, no biases
        lat = lat + F.gelu(_layer_norm(lat, ff, "0") @ ff["1.weight"].T) @ ff["3.weight"].T
    return _layer_norm(F.linear(lat, w["proj_out.weight"], w["proj_out.bias"]), w, "norm_out")


def head_prediction(task: str, w, x_KH, queries, head) -> torch.Tensor:
    """One sample's prediction in the target's layout: depth mlp1(v) (Q, C); seg (C, h, w);
    gen (1, C)."""
    y = task_token_resampler(_sub(w, "projector."), x_KH, queries, head)
    if task == "depth":  # only linear_1 feeds the loss (SPEC 2.3)
        y = F.linear(F.relu(F.linear(y, w["linear_1.0.weight"], w["linear_1.0.bias"])),
                     w["linear_1.2.weight"], w["linear_1.2.bias"])
    if task == "seg":
        y = y.T.reshape(head.target_shape)
    return y


# ---- splice (SPEC 1.2, 1.4, 1.5) -----------------------------------------------------------


def project_images(weights, features_BNC: torch.Tensor) -> torch.Tensor:
    """mlp2x_gelu: Linear -> exact GELU -> Linear, with biases."""
    h = F.gelu(F.linear(features_BNC, weights["mm_projector.0.weight"],
                        weights["mm_projector.0.bias"]))
    return F.linear(h, weights["mm_projector.2.weight"], weights["mm_projector.2.bias"])


def inserted_task_tokens(weights, order: list[str], n: int) -> torch.Tensor:
    """(n * tasks, H): depth/seg rows are means of n consecutive blocks of their parameter
    ("expand_emb"); gen's n rows as they are."""
    rows = []
    for task in order:
        p = weights[f"task_tokens.special_{task}_tokens"]
        rows.append(p if task == "gen" else p.view(n, -1, p.shape[-1]).mean(1))
    return torch.cat(rows, 0)


def splice_row(ids_T, labels_T, embed, image_NH, task_rows, max_length: int):
    """One row's real tokens -> (embeds, labels, first task-token position or None)."""
    where = (ids_T == IMAGE_TOKEN).nonzero().flatten().tolist()
    assert len(where) <= 1, "one image per sample"
    if not where:  # text-only: nothing inserted
        return embed[ids_T][:max_length], labels_T[:max_length], None
    p = where[0]
    inserted = torch.cat([image_NH, task_rows], 0)
    embeds = torch.cat([embed[ids_T[:p]], inserted, embed[ids_T[p + 1:]]], 0)
    ignored = torch.full((inserted.shape[0],), IGNORE, dtype=labels_T.dtype)
    labels = torch.cat([labels_T[:p], ignored, labels_T[p + 1:]], 0)
    return embeds[:max_length], labels[:max_length], p + image_NH.shape[0]


# ---- losses (SPEC 4.1-4.3, 12) -------------------------------------------------------------


def next_token_loss(finals, labels, lm_head) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over every labelled next token of the batch, and their count."""
    total, count = torch.zeros((), dtype=F64), 0
    for final_TH, labels_T in zip(finals, labels, strict=True):
        logits = final_TH[: labels_T.shape[0] - 1] @ lm_head.T
        target = labels_T[1:]
        keep = target != IGNORE
        total = total + F.cross_entropy(logits[keep], target[keep], reduction="sum")
        count += int(keep.sum())
    return total / max(count, 1), count


def embedding_loss(pred, target, mask_B, logit_scale, config):
    """(smooth-L1, weighted InfoNCE) of one (task, layer).

    Default (SPEC 12): per-sample means over rows with mask 1. SPEC 4.2 says text-only
    samples serve as negatives, but 4.4/12 drop them from the loss; whether a masked sample's
    target stays an InfoNCE candidate is left open there. The engine's documented rule (its
    embedding_distill_loss docstring) is that masked targets are no candidates, so here too.
    seed_compat: the seed's arithmetic, every sample a row and a candidate (SPEC 4.1)."""
    B = pred.shape[0]
    sl1 = F.smooth_l1_loss(pred, target, reduction="none", beta=config.smooth_l1_beta)
    p = F.normalize(pred.reshape(B, -1), dim=-1)
    t = F.normalize(target.reshape(B, -1), dim=-1)
    logits = p @ t.T * torch.clamp(logit_scale.reshape(()).exp(), max=MAX_LOGIT_SCALE)
    w = config.contrastive_weight
    if config.seed_compat:
        ce = F.cross_entropy(logits, torch.arange(B), reduction="none")
        sl1_mean = (sl1 * mask_B.view(-1, *[1] * (sl1.dim() - 1))).mean()
        return sl1_mean, w * ce.mean() * mask_B.mean()
    valid = mask_B > 0
    if not valid.any():
        return torch.zeros((), dtype=F64), torch.zeros((), dtype=F64)
    ce = F.cross_entropy(logits.masked_fill(~valid[None, :], float("-inf"))[valid],
                         torch.arange(B)[valid], reduction="sum")
    num_valid = mask_B.sum()
    return (sl1.reshape(B, -1).mean(1) * mask_B).sum() / num_valid, w * ce / num_valid


# ---- the forward (SPEC 10) -----------------------------------------------------------------


def head_inputs(h_TH, start, task_index: int, order: list[str], n: int, config):
    """(keys, gen queries) of one row: cat(h[:P], h[ts:te], h[end:]) (SPEC 1.6). A text-only
    row (start None, default layout only) feeds its whole row; its prediction is masked out."""
    if start is None:
        return h_TH, h_TH[-n:]
    ts = start + n * task_index
    parts = [h_TH[:start], h_TH[ts: ts + n]]
    if config.pass_text_to_aux:
        parts.append(h_TH[start + n * len(order):])
    gen = start + n * order.index("gen") if "gen" in order else None
    return torch.cat(parts, 0), (None if gen is None else h_TH[gen: gen + n])


def task_loss(task, states, starts, targets, mask_B, weights, config, order, scalars):
    """Sum over the task's layers of smooth-L1 + InfoNCE; logs both per layer."""
    n, head = config.num_task_tokens, config.heads[task]
    # depth/seg: the (576, H) parameter itself is the queries; gen: its tokens' hidden states
    own_queries = None if task == "gen" else weights[f"task_tokens.special_{task}_tokens"]
    total = torch.zeros((), dtype=F64)
    for j, k in enumerate(parse_layers(config.layer_indices, order)[task]):
        w = _sub(weights, f"image_{task}_heads.{j}.")
        preds = []
        for row_states, start in zip(states, starts, strict=True):
            # hidden_states[k] is block k's output (k = L: the normed final); 0 -> final too.
            h = row_states[k] if k >= 1 else row_states[-1]
            keys, gen_queries = head_inputs(h, start, order.index(task), order, n, config)
            queries = gen_queries if own_queries is None else own_queries
            preds.append(head_prediction(task, w, keys, queries, head))
        sl1, con = embedding_loss(torch.stack(preds), targets[task].to(F64), mask_B,
                                  weights[f"{task}_logit_scale"], config)
        scalars[f"{task}/L{k}/smooth_l1"], scalars[f"{task}/L{k}/contrastive"] = sl1, con
        total = total + sl1 + con
    return total


def run_decoder(decoder, embeds, config) -> list[list[torch.Tensor]]:
    """Each row alone on its real tokens, or (seed_compat) right-padded with zero embeddings
    to the batch's longest row and masked: the heads then also read the padding's states."""
    if not config.seed_compat:
        return [decoder.hidden_states(e) for e in embeds]
    length = max(e.shape[0] for e in embeds)
    out = []
    for e in embeds:
        valid = torch.arange(length) < e.shape[0]
        padded = torch.cat([e, e.new_zeros(length - e.shape[0], e.shape[1])], 0)
        out.append(decoder.hidden_states(padded, valid))
    return out


def spec_forward(state_dict, config, llm_config: dict, vision_features, input_ids,
                 attention_mask, labels, loss_mask, targets) -> tuple[torch.Tensor, dict]:
    """The training loss and its logged parts: ("loss", {name: value}) with the names of
    OlaOutput.components ("ntp", "<task>", "<task>/L<k>/smooth_l1|contrastive") plus
    "num_valid_tokens". Differentiable in every floating entry of ``state_dict`` (pass leaves
    that require grad to get their gradients).

    vision_features: (B, N, C) tower features; input_ids/attention_mask/labels: (B, T), left
    or right padded; loss_mask: (B,) 1 for samples whose embedding losses count;
    targets: {task: (B, *target_shape)}."""
    weights = {k: v.to(F64) if v.is_floating_point() else v for k, v in state_dict.items()}
    assert config.projector == "mlp2x_gelu", config.projector
    order = config.aux_mode.split("-")
    n = config.num_task_tokens
    images = project_images(weights, vision_features.to(F64))
    task_rows = inserted_task_tokens(weights, order, n)
    embed = weights["llm.model.embed_tokens.weight"]
    rows = []
    for i in range(input_ids.shape[0]):
        real = attention_mask[i].bool()  # drop padding first (SPEC 1.4 step 1)
        rows.append(splice_row(input_ids[i][real], labels[i][real], embed, images[i],
                               task_rows, config.max_length))
    embeds, row_labels, starts = (list(x) for x in zip(*rows, strict=True))
    if config.seed_compat:  # the seed slices every row at the same fixed offset
        starts = [config.num_sys_tokens + images.shape[1]] * len(rows)
    states = run_decoder(Decoder(weights, llm_config), embeds, config)
    ntp, count = next_token_loss([s[-1] for s in states], row_labels,
                                 weights["llm.lm_head.weight"])
    scalars = {"ntp": ntp, "num_valid_tokens": count}
    loss = ntp
    task_weights = parse_weights(config.loss_weights, order)
    for task in order:
        scalars[task] = task_weights[task] * task_loss(
            task, states, starts, targets, loss_mask.to(F64), weights, config, order, scalars)
        loss = loss + scalars[task]
    return loss, scalars
