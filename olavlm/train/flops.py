# FLOPs per token of a decoder, device peaks, and model FLOPs utilization (MFU).
"""``flops_per_token`` counts a Hugging Face decoder's matmul FLOPs per token from its config
(causal attention, the LM head on the supervised fraction only, no weight gradients when the
weights are frozen); ``peak_flops`` is the device's dense peak for the compute precision;
``mfu`` divides one by the other. Re-exported by olavlm.train.metrics.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["flops_per_token", "llm_matmul_params", "mfu", "peak_flops", "peak_flops_for_name"]


# ---- FLOPs and MFU ----------------------------------------------------------------------------

# Decoders whose MLP is two matrices (up, down) rather than SwiGLU's three (gate, up, down).
_NON_GATED_MLP = {"gpt2", "gpt_neox", "gptj", "opt", "phi", "falcon", "bloom", "starcoder2"}


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def _decoder_dims(cfg: Any) -> dict[str, int]:
    if _get(cfg, "num_hidden_layers") is None and _get(cfg, "text_config") is not None:
        cfg = _get(cfg, "text_config")  # a multimodal wrapper config: its language model
    missing = [k for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                           "num_attention_heads", "vocab_size") if _get(cfg, k) is None]
    if missing:
        raise ValueError(f"llm_config must be a HF decoder config with {missing} set, got "
                         f"{type(cfg).__name__}")
    d = int(_get(cfg, "hidden_size"))
    heads = int(_get(cfg, "num_attention_heads"))
    return {
        "L": int(_get(cfg, "num_hidden_layers")), "d": d, "f": int(_get(cfg, "intermediate_size")),
        "h": heads, "h_kv": int(_get(cfg, "num_key_value_heads") or heads),
        "d_h": int(_get(cfg, "head_dim") or d // heads), "V": int(_get(cfg, "vocab_size")),
        "mlp_mats": 2 if _get(cfg, "model_type") in _NON_GATED_MLP else 3,
    }


def llm_matmul_params(llm_config: Any) -> int:
    """N: the parameters a token is multiplied with in a dense HF decoder, LM head included.

    Per layer: q and o projections ``2 d h d_h``, k and v ``2 d h_kv d_h``, the MLP
    ``3 d f`` (SwiGLU gate/up/down; ``2 d f`` for non-gated MLPs); plus the LM head ``d V``.
    The input embedding is a lookup (no FLOPs) and norms/biases are negligible, so both are left
    out. ``flops_per_token`` counts the head only where it runs (the labelled positions)."""
    k = _decoder_dims(llm_config)
    attn = 2 * k["d"] * k["h"] * k["d_h"] + 2 * k["d"] * k["h_kv"] * k["d_h"]
    mlp = k["mlp_mats"] * k["d"] * k["f"]
    return k["L"] * (attn + mlp) + k["d"] * k["V"]


def flops_per_token(llm_config: Any, *, seq_len: float, weights_trainable: bool = True,
                    trainable_fraction: float | None = None,
                    supervised_fraction: float = 1.0) -> float:
    """Training FLOPs per token of the LLM (forward + backward) that the model's math needs:

        flops = (4 + 2 f) * (N_body + d V s)  +  6 * L * h * d_h * T

    N_body + d V = :func:`llm_matmul_params` (the blocks, then the LM head). Each weight costs 2
    FLOPs per token forward, 2 for the input gradient in backward (needed whenever anything
    below the LLM trains, e.g. the projector in pre-training) and 2 for the weight gradient
    only if the weight trains: f = 1 for a trained LLM, 0 for a frozen one
    (``weights_trainable=False``, the "pt" stage); ``trainable_fraction`` (0..1, overrides the
    flag) covers partly trained LLMs. The LM head runs only on the ``supervised_fraction`` s of
    the tokens that carry a label (``linear_cross_entropy`` never multiplies the others): a
    count over every token would credit the run with FLOPs it does not need (~7% of Llama-3-8B's
    at pre-training's ~5% labelled positions). Attention: causal, so per token and layer
    ``2 * d_attn * T`` forward (scores and values over the half the mask keeps) and x3 with
    backward (dQ, dK, dV, dP; FlashAttention's recompute is not useful work), with
    T = ``seq_len`` the token-weighted mean sequence length ``sum(l^2) / sum(l)`` (a token's
    cost grows with its own sample's length). torchtitan and PaLM count the full T x T square
    (12 instead of 6) and the head on every token: their MFU reads higher for the same run.
    Vision tower, projector and embedding heads are not included (MFU is that of the LLM)."""
    if seq_len < 0:
        raise ValueError(f"seq_len must be >= 0, got {seq_len}")
    frac = (1.0 if weights_trainable else 0.0) if trainable_fraction is None \
        else float(trainable_fraction)
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"trainable_fraction must be in [0, 1], got {trainable_fraction}")
    if not 0.0 <= supervised_fraction <= 1.0:
        raise ValueError(f"supervised_fraction must be in [0, 1], got {supervised_fraction}")
    k = _decoder_dims(llm_config)
    head = k["d"] * k["V"]
    body = llm_matmul_params(llm_config) - head
    dense = (4.0 + 2.0 * frac) * (body + head * supervised_fraction)
    attention = 6.0 * k["L"] * k["h"] * k["d_h"] * seq_len
    return dense + attention


# Dense (no sparsity) peak FLOP/s from the vendors' data sheets. "fp32" is the non-tensor-core
# rate, "tf32" the tensor-core rate fp32 matmuls get with TF32 allowed. Longest names first so
# "H100 PCIe" wins over "H100".
_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756e12, "tf32": 378e12, "fp32": 51.2e12}),
    ("H100 NVL", {"bf16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12}),
    ("H200 NVL", {"bf16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12}),
    ("H200", {"bf16": 989e12, "tf32": 494.5e12, "fp32": 66.9e12}),  # SXM, GH200
    ("H100", {"bf16": 989e12, "tf32": 494.5e12, "fp32": 66.9e12}),  # SXM
    ("A100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("MI300X", {"bf16": 1307.4e12, "tf32": 653.7e12, "fp32": 163.4e12}),
)
_PRECISIONS = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "bf16", "float16": "bf16",
               "fp32": "fp32", "float32": "fp32"}


def _precision(precision: str | torch.dtype) -> str:
    key = str(precision).removeprefix("torch.")
    if key not in _PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(_PRECISIONS)} or a torch dtype, "
                         f"got {precision!r}")
    return _PRECISIONS[key]


def peak_flops_for_name(name: str, precision: str | torch.dtype = "bf16", *,
                        tf32: bool = False) -> float | None:
    """The dense peak FLOP/s of the device called ``name`` (as torch.cuda.get_device_name
    says it) for matmuls in ``precision``; None when the device is not in the table."""
    prec = _precision(precision)
    if prec == "fp32" and tf32:
        prec = "tf32"
    upper = name.upper()
    for key, peaks in _PEAKS:
        # The model number must end where the key does: "A100" is not the RTX A1000's.
        if re.search(re.escape(key.upper()) + r"(?!\d)", upper):
            return peaks[prec]
    return None


def peak_flops(device: torch.device | str, precision: str | torch.dtype = "bf16", *,
               tf32: bool = False) -> float | None:
    """Peak FLOP/s of ``device`` for the run's compute precision ("bf16" | "fp16" | "fp32"):
    H100 SXM / H200 989e12 bf16, A100 312e12, MI300X 1307e12; fp32 runs use the non-tensor-core
    rate (H100 66.9e12) unless ``tf32=True`` (then the TF32 tensor-core rate). float8 runs are
    measured against the bf16 peak, the usual convention. None (MFU not reported) on CPU and on
    GPUs not in the table."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device), precision, tf32=tf32)


def mfu(tokens_per_s: float, flops_token: float, peak: float | None,
        world_size: int = 1) -> float | None:
    """Model FLOPs utilization: achieved FLOP/s (job tokens/s x FLOPs/token) over the job's
    peak (``peak`` per device x ``world_size``); None when the peak is unknown."""
    if not peak:
        return None
    return tokens_per_s * flops_token / (peak * world_size)
