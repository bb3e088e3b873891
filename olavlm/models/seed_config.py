# The seed's config.json <-> our ModelConfig and the HF LLM config (SPEC 1.3, 2.2, 11).
"""Map the seed's ``config.json`` (an ``OlaLlava{Llama,Phi3}ForCausalLM`` HF config with the
LLaVA/OLA keys) to ours, and back.

- ``seed_model_config(seed_config, **overrides)``: the :class:`ModelConfig` (tower, projector,
  ``aux_mode``, task tokens, heads from ``image_{gen,depth,seg}``, layer taps, loss weights).
- ``seed_llm_config(seed_config)``: the plain transformers config of the LLM (the seed's keys
  minus ``mm_*``, ``image_*`` and the OLA ones, with the base model type).
- ``seed_num_sys_tokens(seed_config)``: the seed's hard-coded image offset for its LLM.
- ``seed_config_dict(model)``: the inverse, the seed's ``config.json`` for an :class:`OlaVLM`.

``olavlm.models.checkpoint_io`` reads and writes the weights with these and re-exports them.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from .config import HeadConfig, ModelConfig, parse_aux_mode
from .ola import OlaVLM

__all__ = [
    "SEED_TASK_PREFIX",
    "seed_config_dict",
    "seed_llm_config",
    "seed_model_config",
    "seed_num_sys_tokens",
]

SEED_TASK_PREFIX = {"gen": "img", "depth": "depth", "seg": "seg"}  # image_gen["img_layer_indices"]
# LLaVA / OLA keys of the seed's config.json that are not the LLM's (besides mm_*, image_*).
_OLA_CONFIG_KEYS = frozenset({
    "aux_mode", "num_task_tokens", "contrastive_loss_weight", "tokenizer_model_max_length",
    "tokenizer_padding_side", "freeze_mm_mlp_adapter", "freeze_mm_vision_resampler",
    "tune_mm_mlp_adapter", "tune_mm_vision_resampler", "unfreeze_mm_vision_tower", "use_mm_proj",
    "pass_text_to_aux", "use_contrastive", "use_ce", "image_generator", "image_segmentor",
    "depth_estimator", "task_token_format", "probe_mode", "freeze_task_token"})
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- seed config.json -> ours ----------------------------------------------------------------

def _base_model_type(seed_config: Mapping) -> str:
    """"ola_llama" / "llava_phi3" / "OlaLlavaPhi3ForCausalLM" -> the transformers model type."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = str(seed_config.get("model_type", ""))
    candidates = [model_type, re.sub(r"^(?:(?:ola|llava)_)+", "", model_type)]
    for arch in seed_config.get("architectures") or []:
        name = re.sub(r"ForCausalLM$", "", re.sub(r"^(?:Ola|Llava)+", "", str(arch)))
        candidates.append(name.lower())
    for candidate in candidates:
        if candidate in CONFIG_MAPPING:
            return candidate
    raise ValueError(f"config.json: cannot tell the LLM type from model_type {model_type!r} and "
                     f"architectures {seed_config.get('architectures')!r}; expected e.g. "
                     "'ola_llama' / 'OlaLlavaPhi3ForCausalLM'")


def seed_llm_config(seed_config: Mapping):
    """The plain transformers config of the seed's LLM: ``config.json`` minus the LLaVA/OLA
    keys (``mm_*``, ``image_*`` and ``_OLA_CONFIG_KEYS``), with the base model type."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    base = _base_model_type(seed_config)
    kept = {k: v for k, v in seed_config.items()
            if not k.startswith(("mm_", "image_")) and k not in _OLA_CONFIG_KEYS
            and k not in ("model_type", "architectures", "_name_or_path", "transformers_version")}
    if "torch_dtype" in kept:  # transformers 4 name
        kept.setdefault("dtype", kept.pop("torch_dtype"))
    config = CONFIG_MAPPING[base](**kept)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"config.json: transformers has no causal LM for model type {base!r}")
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].__name__]
    return config


def _seed_head(task: str, head: Mapping) -> tuple[HeadConfig, list[int], float]:
    prefix = SEED_TASK_PREFIX[task]
    needed = ("depth", "dim_head", "num_heads", "num_tokens", "output_dim", "ff_mult",
              f"{prefix}_layer_indices", f"{prefix}_loss_weight")
    absent = [k for k in needed if k not in head]
    if absent:
        raise ValueError(f"config.json: image_{task} lacks {absent}; it has {sorted(head)}")
    queries, out = int(head["num_tokens"]), int(head["output_dim"])
    side = round(queries ** 0.5)
    # The teacher's target per sample is not in the seed's config: seg's is a (C, h, w) map of
    # the h*w query grid (SPEC 2.3); gen's and depth's are the head's own (queries, C).
    target = (out, side, side) if task == "seg" and side * side == queries else (queries, out)
    mlps = 3 if task == "depth" and head.get("use_intermediate_depth", True) else 0
    config = HeadConfig(num_queries=queries, output_dim=out, target_shape=target,
                        depth=int(head["depth"]), dim_head=int(head["dim_head"]),
                        heads=int(head["num_heads"]), ff_mult=int(head["ff_mult"]),
                        num_mlps=mlps)
    # The seed splits the string on "-" and keeps every number (1-based blocks, 0 = final).
    layers = [int(n) for n in str(head[f"{prefix}_layer_indices"]).split("-") if n != ""]
    return config, layers, float(head[f"{prefix}_loss_weight"])


def seed_num_sys_tokens(seed_config: Mapping) -> int | None:
    """The seed's hard-coded image offset (SPEC 1.3): Llama 38 (vocab >= 128000) or 26, Phi-3
    13; None for other LLMs."""
    base = _base_model_type(seed_config)
    if base == "llama":
        return 38 if int(seed_config.get("vocab_size", 0)) >= 128000 else 26
    return 13 if base == "phi3" else None


def seed_model_config(seed_config: Mapping, **overrides) -> ModelConfig:
    """The :class:`ModelConfig` of a seed ``config.json`` (a dict); ``overrides`` replace any
    field (``impl``, ``seed_compat``, ``vision_tower``, ...). ``seed_compat=True`` without
    ``num_sys_tokens`` takes the seed's value for the LLM (``seed_num_sys_tokens``). ``llm`` is
    "" (the LLM comes from the checkpoint's tensors)."""
    aux_mode = overrides.get("aux_mode", seed_config.get("aux_mode", "gen-depth-seg"))
    tasks = parse_aux_mode(aux_mode)
    heads, layers, weights = {}, {}, {}
    for task in tasks:
        if not isinstance(seed_config.get(f"image_{task}"), Mapping):
            raise NotImplementedError(
                f"config.json: aux_mode {aux_mode!r} names {task!r} but there is no image_{task} "
                "head config (the seed then inserts the task's tokens but trains no head); pass "
                "aux_mode= without that task")
        heads[task], layers[task], weights[task] = _seed_head(task, seed_config[f"image_{task}"])
    token_format = seed_config.get("task_token_format", "expand_emb")
    if token_format not in (None, "expand_emb"):
        raise NotImplementedError(
            f"config.json: task_token_format={token_format!r}; OlaVLM inserts the task tokens "
            "as the released checkpoints do (expand_emb: depth/seg rows mean-pooled to "
            "num_task_tokens), the only mode implemented (SPEC 1.5)")
    num_task_tokens = int(seed_config.get("num_task_tokens", 0) or 0)
    if tasks and num_task_tokens == 0:
        raise NotImplementedError("config.json: num_task_tokens is absent or 0: the seed's heads "
                                  "with learned latents (GenHead, DepthHead, probes) are not "
                                  "implemented; OlaVLM has the task-token heads only")
    feature = seed_config.get("mm_vision_select_feature", "patch")
    if feature != "patch":
        # Our towers are built with the patch tokens only (the OLA-VLM recipes' setting); the
        # CLS token would add a position and change every offset after the image.
        raise NotImplementedError(f"config.json: mm_vision_select_feature={feature!r} is not "
                                  "implemented on import; OlaVLM imports 'patch' towers")
    if tasks and seed_config.get("use_contrastive", True) is False:
        raise NotImplementedError("config.json: use_contrastive=false (no logit scales) is not "
                                  "implemented")
    dtype = seed_config.get("dtype") or seed_config.get("torch_dtype")
    values = dict(
        llm="", vision_tower=str(seed_config.get("mm_vision_tower", "")),
        vision_kind=_seed_tower_kind(seed_config),
        vision_select_layer=int(seed_config.get("mm_vision_select_layer", -2)),
        projector=seed_config.get("mm_projector_type", "linear"),  # LLaVA's default
        aux_mode=aux_mode, num_task_tokens=num_task_tokens, layer_indices=layers,
        loss_weights=weights, heads=heads,
        contrastive_weight=float(seed_config.get("contrastive_loss_weight", 0.3)),
        pass_text_to_aux=bool(seed_config.get("pass_text_to_aux", True)),
        max_length=int(seed_config.get("tokenizer_model_max_length", 4096)),
        dtype=dtype if dtype in _DTYPES else "float32")
    values.update(overrides)
    if values.get("seed_compat") and values.get("num_sys_tokens") is None:
        values["num_sys_tokens"] = seed_num_sys_tokens(seed_config)
    return ModelConfig.from_dict(values)


def _seed_tower_kind(seed_config: Mapping) -> str | None:
    """The seed picks the tower class by the name in ``mm_vision_tower`` (SPEC 1.1); keep that
    kind when a local folder of another name is passed."""
    from .vision import tower_kind

    try:
        return tower_kind(seed_config.get("mm_vision_tower", ""))
    except ValueError:
        return None


# ---- ours -> seed config.json ----------------------------------------------------------------

def _llm_dtype_name(model: OlaVLM) -> str:
    dtype = next(model.llm.parameters()).dtype
    return next((name for name, d in _DTYPES.items() if d == dtype), model.config.dtype)


def seed_config_dict(model: OlaVLM, *, image_aspect_ratio: str = "pad") -> dict:
    """The seed's ``config.json`` for ``model``: the LLM's config with ``model_type``
    ``ola_<type>`` and ``OlaLlava<Type>ForCausalLM``, plus the SPEC 11 keys. Run settings the
    seed's config has no key for (impl, seed_compat, smooth_l1_beta, ...) are not written."""
    cfg = model.config
    feature = getattr(model.vision_tower, "select_feature", "patch")
    data = model.llm.config.to_dict()
    base_cls = type(model.llm).__name__.removesuffix("ForCausalLM")
    data.update(model_type=f"ola_{data['model_type']}",
                architectures=[f"OlaLlava{base_cls}ForCausalLM"])
    data["torch_dtype"] = data["dtype"] = _llm_dtype_name(model)  # transformers 4 and 5 names
    data.update(
        aux_mode=cfg.aux_mode, num_task_tokens=cfg.num_task_tokens,
        contrastive_loss_weight=cfg.contrastive_weight, use_contrastive=True,
        mm_hidden_size=model.vision_tower.hidden_size, mm_vision_tower=cfg.vision_tower,
        mm_vision_select_layer=cfg.vision_select_layer, mm_vision_select_feature=feature,
        mm_projector_type=cfg.projector, mm_patch_merge_type="flat", use_mm_proj=True,
        image_aspect_ratio=image_aspect_ratio, tokenizer_model_max_length=cfg.max_length,
        pass_text_to_aux=cfg.pass_text_to_aux,
        task_token_format="expand_emb")  # (SPEC 1.5: released configs carry it; ours inserts so)
    for task in model.tasks:
        data[f"image_{task}"] = _seed_head_dict(task, cfg.heads[task], model.layers[task],
                                                model.loss_weights[task])
    return data


def _seed_head_dict(task: str, head: HeadConfig, layers: list[int], weight: float) -> dict:
    if head.dim is not None:
        raise ValueError(f"heads[{task!r}].dim={head.dim} has no key in the seed's config (it "
                         "always uses output_dim, or the LLM width for depth); cannot export")
    if head.num_mlps not in ((0, 3) if task == "depth" else (0,)):
        raise ValueError(f"heads[{task!r}].num_mlps={head.num_mlps} has no seed equivalent "
                         "(depth: 3 or 0, others: 0)")
    prefix = SEED_TASK_PREFIX[task]
    out = {"depth": head.depth, "dim_head": head.dim_head, "num_heads": head.heads,
           "num_tokens": head.num_queries, "output_dim": head.output_dim,
           "ff_mult": head.ff_mult, f"{prefix}_layer_indices": "-".join(map(str, layers)),
           f"{prefix}_loss_weight": weight}
    if task == "depth":
        out["use_intermediate_depth"] = head.num_mlps == 3
    return out
