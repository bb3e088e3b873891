# SPEC 5.1's stages (PT, VPT, IFT) for Llama-3-8B / Phi-3-mini with CLIP ViT-L/336 or ConvNeXt-XXL.
"""``<llm>_<vision>_<stage>`` recipes, generated for llm in (llama3_8b, phi3_mini), vision in
(clip, convnext) and stage in (pt, vpt, ift): the seed's 8-GPU scripts (SPEC 5.1).

Model, teacher, data and checkpoint paths are placeholders under /models, /data and
/checkpoints: point them at local copies, e.g. ``model.llm=/weights/Meta-Llama-3-8B-Instruct
data.path=... data.image_folder=...`` (nothing is downloaded; a missing model folder's error
names the Hub repository to fetch, ``WEIGHTS_REPOS``). The ConvNeXt placeholder ends in the
seed's ``-res768``: the folder of ``laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup``
is found with or without it.

- PT (``*_pt``): LLaVA-558K, lr 1e-3, 32 per device (x 8 GPUs = 256 global), square images.
  Trains the projector, the heads, the task tokens and the logit scales; NTP plus the
  embedding losses against depth, seg and gen teacher targets computed online (for targets
  from ``olavlm targets extract``: ``teachers.mode=cache teachers.cache_dir=DIR``). Task
  tokens gen-depth-seg x 8, layers d18-20_s10-18_g12-20, weights d0.5_s0.5_g0.5, contrastive
  0.3.
- VPT (``*_vpt``): ALLaVA-Caption from the PT checkpoint (``checkpoint.init_from``), lr 2e-5,
  16 per device (x 8 = 128 global), padded images, batches grouped by modality length. Trains
  the LLM and the projector; NTP only (``teachers.mode=none``); task tokens still inserted.
- IFT (``*_ift``): LLaVA-665K from the PT checkpoint (the seed's ``finetune.sh``; from the VPT
  one for llama3_8b_convnext, the seed's released PT+VPT+IFT model), otherwise as VPT.

All stages: 1 epoch (``train.max_steps=0``), cosine schedule with 3% warmup, AdamW (0.9,
0.999), eps 1e-8, no weight decay, gradient clipping at 1.0, bf16 compute with fp32 master
weights and reductions (FSDP2 over the GPUs of ``torchrun``), selective activation
checkpointing, sequences up to 4096 tokens, a checkpoint every 200 steps (last 3 kept).
The global batch is per-device batch x GPUs x ``optim.grad_accum``: on fewer GPUs raise
``optim.grad_accum`` to keep it.
"""
from __future__ import annotations

from collections.abc import Callable

from olavlm.config import (
    CheckpointConfig,
    Config,
    DataConfig,
    OptimConfig,
    ParallelConfig,
    TeachersConfig,
    TrainConfig,
)
from olavlm.models.config import ModelConfig, default_heads

__all__ = ["LLAVA_RECIPES", "LLMS", "STAGES", "VISION_TOWERS", "WEIGHTS_REPOS", "llava_recipe"]

# name -> (placeholder path, conversation template)
LLMS = {
    "llama3_8b": ("/models/Meta-Llama-3-8B-Instruct", "llava_llama_3"),
    "phi3_mini": ("/models/Phi-3-mini-4k-instruct", "llava_phi_3"),
}
# name -> (placeholder path, vision_kind, image side; None: the tower's own, 336 for CLIP)
VISION_TOWERS = {
    "clip": ("/models/clip-vit-large-patch14-336", "clip", None),
    "convnext": ("/models/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup-res768",
                 "convnext", 768),
}
STAGES = ("pt", "vpt", "ift")
# IFT starts from the PT checkpoint (the seed's finetune.sh), except where the seed released a
# PT+VPT+IFT model (SPEC 7): Llama-3-8B with ConvNeXt-XXL, whose IFT starts from VPT
# (vpt_ift.sh). Override with checkpoint.init_from=... .
IFT_STARTS_FROM = {("llama3_8b", "convnext"): "vpt"}
# stage -> (data file, image folder)
DATA = {
    "pt": ("/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json", "/data/LLaVA-Pretrain/images"),
    "vpt": ("/data/ALLaVA/ALLaVA-Caption.json", "/data/ALLaVA"),
    "ift": ("/data/LLaVA-Finetune/llava_v1_5_mix665k.json", "/data/LLaVA-Finetune"),
}
# placeholder folder name -> the Hugging Face repository it stands for: what a missing
# model.llm / model.vision_tower error tells the user to download (the teachers name theirs).
# The ConvNeXt repository has no "-res768": the seed appends it to say the input side, and the
# tower loader strips it to find the folder.
WEIGHTS_REPOS = {
    "Meta-Llama-3-8B-Instruct": "meta-llama/Meta-Llama-3-8B-Instruct",
    "Phi-3-mini-4k-instruct": "microsoft/Phi-3-mini-4k-instruct",
    "clip-vit-large-patch14-336": "openai/clip-vit-large-patch14-336",
    "CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup":
        "laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup",
}
TEACHER_WEIGHTS = {
    "depth": "/models/Depth-Anything-V2-Large-hf",
    "seg": "/models/oneformer_coco_swin_large",
    "gen": "/models/stable-diffusion-2-1-unclip",
}


def llava_recipe(llm: str, vision: str, stage: str) -> Config:
    """The Config of one (llm, vision, stage) run; see the module docstring."""
    llm_path, template = LLMS[llm]
    tower_path, vision_kind, image_size = VISION_TOWERS[vision]
    data_path, image_folder = DATA[stage]
    pt = stage == "pt"
    previous = {"vpt": "pt", "ift": IFT_STARTS_FROM.get((llm, vision), "pt")}.get(stage)
    return Config(
        recipe=f"{llm}_{vision}_{stage}",
        model=ModelConfig(
            llm=llm_path, vision_tower=tower_path, vision_kind=vision_kind,
            projector="mlp2x_gelu", aux_mode="gen-depth-seg", num_task_tokens=8,
            layer_indices="d18-20_s10-18_g12-20", loss_weights="d0.5_s0.5_g0.5",
            contrastive_weight=0.3, heads=default_heads(), max_length=4096,
            # PT: the frozen LLM stored in bf16 (half the host and GPU memory), what the
            # optimizer updates in fp32. VPT/IFT train the LLM: fp32 master weights.
            dtype="bfloat16" if pt else "float32", trainable_dtype="float32"),
        data=DataConfig(
            path=data_path, image_folder=image_folder, template=template,
            batch_size=32 if pt else 16, num_workers=4, group_by_modality_length=not pt,
            aspect="square" if pt else "pad", image_size=image_size),
        teachers=TeachersConfig(
            mode="online" if pt else "none", names="depth,seg,gen",
            weights=dict(TEACHER_WEIGHTS) if pt else {}),
        parallel=ParallelConfig(
            fsdp="auto", mixed_precision="bf16", reduce_dtype="fp32",
            activation_checkpointing="selective", tf32=True),
        optim=OptimConfig(
            lr=1e-3 if pt else 2e-5, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8,
            warmup_ratio=0.03, schedule="cosine", grad_clip=1.0, grad_accum=1),
        train=TrainConfig(stage=stage, max_steps=0, epochs=1),
        checkpoint=CheckpointConfig(
            every_steps=200, keep_last=3,
            init_from=f"/checkpoints/{llm}_{vision}_{previous}" if previous else None),
    )


def _bind(llm: str, vision: str, stage: str) -> Callable[[], Config]:
    def recipe() -> Config:
        return llava_recipe(llm, vision, stage)

    recipe.__name__ = recipe.__qualname__ = f"{llm}_{vision}_{stage}"
    recipe.__doc__ = f"SPEC 5.1 {stage.upper()} for {llm} with the {vision} tower."
    return recipe


LLAVA_RECIPES: dict[str, Callable[[], Config]] = {
    f"{llm}_{vision}_{stage}": _bind(llm, vision, stage)
    for llm in LLMS for vision in VISION_TOWERS for stage in STAGES
}
