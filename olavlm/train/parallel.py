# Process group, device, and the performance switches: FSDP2, checkpointing, compile, float8.
"""Everything that changes how (not what) the model computes, each switch off-able:

- ``init_distributed``: torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK) -> process group (NCCL on
  CUDA, gloo on CPU) and the device of this rank.
- ``apply_liger``: liger-kernel's RMSNorm and SwiGLU MLP swapped in *as modules* (the decoder's
  norm / mlp submodules are replaced; no library forward is reassigned). RoPE is a function in
  Hugging Face decoders, not a module, so it is left alone (reassigning it would patch the
  library). CUDA only.
- ``apply_float8``: torchao ``convert_to_float8_training`` on the decoder blocks' Linear layers
  whose dims are multiples of 16 (tensorwise or rowwise scaling); H100/MI300X class GPUs
  (compute capability >= 8.9 / gfx94x-gfx95x); on CPU it runs for numerics only (a warning
  says so).
- ``apply_activation_checkpointing``: "full" wraps every decoder block, "selective" every other
  block (torchtitan's layer-selective option: about half the recompute for half the saving).
  The layer taps' hooks move onto the wrappers (torch.compile refuses a hook's side effect
  inside a checkpoint); blocks with dropout replay the forward's RNG state.
- ``check_switches``: the switches this device or installation cannot run, refused before any
  work is done.
- ``apply_compile``: ``torch.compile`` per decoder block (blocks are identical: one compile).
- ``apply_fsdp``: FSDP2 ``fully_shard`` per decoder block, the vision tower as its own unit,
  the root last; ``MixedPrecisionPolicy(param_dtype, reduce_dtype=fp32)``. Frozen parameters
  are sharded like the others (no gradients are reduced for them).

The order matters and is the one ``apply_parallelism`` uses: liger, float8, checkpointing,
compile, FSDP (each wraps what the previous produced).
"""
from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from olavlm.models.lean_norm import LeanRMSNorm, is_llama_rms_norm

__all__ = ["DistInfo", "apply_parallelism", "check_switches", "free_port", "init_distributed",
           "resolve_device", "enable_tf32", "set_tf32_state", "tf32_state", "wants_fsdp"]

logger = logging.getLogger("olavlm.train")

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class DistInfo:
    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 device: torch.device | None = None) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = device or torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA device is available; use "
                             "train.device=cpu (or auto)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ValueError(f"train.device must be auto, cpu or cuda, got {name!r}")
    return torch.device("cpu")


def init_distributed(device_name: str, backend: str = "auto", *,
                     single_group: bool = False) -> DistInfo:
    """Join torchrun's process group when WORLD_SIZE > 1. A single process needs none, except
    for FSDP2 (``single_group``: a 1-rank group on a free local port), which is how a single
    process trains in bf16 with fp32 master weights."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local)
    if (world > 1 or single_group) and not torch.distributed.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        # Not launched by torchrun (no RANK): a private 1-rank group on a free local port, also
        # when the shell exports MASTER_ADDR (SLURM jobs often do), which env:// would take
        # for a rendezvous and then fail for lack of RANK.
        if world == 1 and "RANK" not in os.environ:
            kwargs.update(init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        torch.distributed.init_process_group(backend=backend, **kwargs)
    return DistInfo(rank, world, local, device)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wants_fsdp(cfg, world_size: int) -> bool:
    """FSDP2 when asked, when several processes run, or for mixed precision (fp32 master
    weights, bf16 compute: what FSDP2's MixedPrecisionPolicy gives, also on one process)."""
    if cfg.fsdp not in ("auto", "on", "off"):
        raise ValueError(f"parallel.fsdp must be auto, on or off, got {cfg.fsdp!r}")
    if cfg.fsdp == "off":
        if world_size > 1:  # no FSDP and no DDP: each rank would train its own copy
            raise ValueError(f"parallel.fsdp=off with {world_size} processes would train "
                             f"{world_size} unsynchronized copies of the model (no gradient "
                             "is averaged); set parallel.fsdp=auto or on, or run one process")
        if cfg.mixed_precision != "fp32":
            raise ValueError("parallel.mixed_precision=bf16 needs FSDP2 (fp32 master weights, "
                             "bf16 compute); set parallel.fsdp=auto or on")
        return False
    return cfg.fsdp == "on" or world_size > 1 or cfg.mixed_precision != "fp32"


def check_switches(cfg, device: torch.device, world_size: int = 1) -> None:
    """The switches this device or installation cannot run, refused before any work (the
    model, data and teachers are built before apply_parallelism and the optimizer, and an SDPA
    backend without a kernel here would only fail inside the first step). ``world_size``: the
    job's processes (whether FSDP2, and its compute dtype, applies)."""
    p, cuda = cfg.parallel, device.type == "cuda"
    if p.liger and not cuda:
        raise ValueError("parallel.liger=true needs a CUDA GPU (liger-kernel's Triton kernels); "
                         f"this run is on {device}")
    if p.liger and not _installed("liger_kernel"):
        raise ValueError("parallel.liger=true needs liger-kernel (pip install liger-kernel), "
                         "which is not installed")
    if p.float8 != "none":
        if not _installed("torchao"):
            raise ValueError(f"parallel.float8={p.float8} needs torchao (pip install torchao), "
                             "which is not installed")
        if cuda:
            check_float8_device(p.float8, device)
    if p.sdpa_backend in ("efficient", "cudnn") and not cuda:
        raise ValueError(f"parallel.sdpa_backend={p.sdpa_backend} needs a CUDA GPU (PyTorch "
                         f"has no such kernel on {device}); use auto, flash or math")
    _check_attention(cfg, device, world_size)
    if cfg.optim.fused in ("on", "apex") and not cuda:
        raise ValueError(f"optim.fused={cfg.optim.fused} needs a CUDA device, the run is on "
                         f"{device}; use auto or off")
    if cfg.optim.fused == "apex" and not _installed("apex.optimizers"):
        raise ValueError("optim.fused=apex needs NVIDIA apex (not on PyPI; build it from "
                         "github.com/NVIDIA/apex), which is not installed")


# model.attn_implementation -> the module Hugging Face imports for it (the flash-attn package)
FLASH_MODULES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


def _check_attention(cfg, device: torch.device, world_size: int = 1) -> None:
    """flash-attn's kernels: CUDA only, installed by the user, fp16/bf16 compute only (else
    transformers fails while loading the LLM, or the first step inside the kernel)."""
    attn = cfg.model.attn_implementation
    if attn not in FLASH_MODULES:
        return
    key = f"model.attn_implementation={attn}"
    if device.type != "cuda":
        raise ValueError(f"{key} needs a CUDA GPU (flash-attn's kernels); this run is on "
                         f"{device}: use sdpa")
    if not _installed(FLASH_MODULES[attn]):
        hint = ("pip install flash-attn --no-build-isolation" if attn == "flash_attention_2"
                else "flash-attn's hopper/ build, for H100-class GPUs")
        raise ValueError(f"{key} needs the flash-attn package ({hint}), whose module "
                         f"{FLASH_MODULES[attn]!r} is not installed; or use sdpa (PyTorch's own "
                         "flash kernel, for rows padded on the right only)")
    # The decoder computes in FSDP2's param dtype where FSDP2 wraps it: mixed_precision=fp32
    # casts a bf16/fp16-stored LLM's gathered weights up to fp32 too.
    if wants_fsdp(cfg.parallel, world_size):
        if cfg.parallel.mixed_precision == "fp32":
            raise ValueError(f"{key} computes in fp16/bf16 only, and this run computes in fp32 "
                             "(under FSDP2 the decoder computes in parallel.mixed_precision="
                             f"fp32, whatever model.dtype={cfg.model.dtype}): set "
                             "parallel.mixed_precision=bf16, or use sdpa")
    elif cfg.model.dtype == "float32":
        raise ValueError(f"{key} computes in fp16/bf16 only, and this run computes in fp32 "
                         "(model.dtype=float32, parallel.mixed_precision=fp32): set "
                         "model.dtype=bfloat16 or parallel.mixed_precision=bf16, or use sdpa")


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # (a dotted name whose parent package is missing)
        return False


# ---- switches ---------------------------------------------------------------------------------


def _liger_swiglu_fits(mlp: nn.Module) -> bool:
    """LigerSwiGLUMLP is SiLU-gated with bias-free projections: an MLP with biases
    (``mlp_bias=True``) or another activation (Gemma's GELU) keeps its own module."""
    act = getattr(getattr(mlp, "config", None), "hidden_act", None)
    return act in ("silu", "swish") and all(
        getattr(getattr(mlp, p), "bias", None) is None for p in ("gate_proj", "up_proj",
                                                                  "down_proj"))


def apply_liger(model: nn.Module, device: torch.device) -> int:
    """Swap RMSNorm and SwiGLU MLP modules of the decoder for liger-kernel's. Returns the count."""
    if device.type != "cuda":
        raise ValueError("parallel.liger=true needs a CUDA GPU (liger-kernel's Triton kernels); "
                         f"this run is on {device}")
    try:
        from liger_kernel.transformers.rms_norm import LigerRMSNorm
        from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
    except ImportError as exc:
        raise ValueError("parallel.liger=true needs liger-kernel (pip install liger-kernel)") \
            from exc
    swapped = 0
    for parent in list(model.llm.modules()):
        for name, child in list(parent.named_children()):
            kind = type(child).__name__
            # LigerRMSNorm's defaults are Llama's formula: Gemma's (1 + weight) norms stay.
            if isinstance(child, LeanRMSNorm) or is_llama_rms_norm(child):
                eps = child.variance_epsilon
                new = LigerRMSNorm(child.weight.shape[0], eps=eps).to(child.weight)
                new.weight.data.copy_(child.weight.data)
                new.weight.requires_grad_(child.weight.requires_grad)
            elif kind.endswith("MLP") and all(hasattr(child, a) for a in
                                              ("gate_proj", "up_proj", "down_proj")) \
                    and _liger_swiglu_fits(child):
                # Built where the old one lives: on the meta device on parallel.load=rank0's
                # meta ranks (no full-size MLP allocated there).
                with torch.device(child.down_proj.weight.device):
                    new = LigerSwiGLUMLP(child.config) if hasattr(child, "config") else None
                if new is None:
                    continue
                new.load_state_dict(child.state_dict())
                new.to(child.gate_proj.weight).requires_grad_(child.gate_proj.weight.requires_grad)
            else:
                continue
            setattr(parent, name, new)
            swapped += 1
    return swapped


def apply_float8(model: nn.Module, recipe: str, device: torch.device) -> int:
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as exc:
        raise ValueError("parallel.float8 needs torchao (pip install torchao)") from exc
    if device.type == "cuda":
        check_float8_device(recipe, device)
    else:
        warnings.warn("parallel.float8 on CPU runs for numerics only (no speed-up)", stacklevel=2)
    config = Float8LinearConfig.from_recipe_name(recipe)
    count = 0

    def suitable(module: nn.Module, fqn: str) -> bool:
        nonlocal count
        ok = (isinstance(module, nn.Linear) and ".layers." in fqn
              and module.in_features % 16 == 0 and module.out_features % 16 == 0)
        count += ok
        return ok

    convert_to_float8_training(model.llm, config=config, module_filter_fn=suitable)
    return count


def check_float8_device(recipe: str, device: torch.device) -> None:
    """float8 matmuls (torch._scaled_mm) need sm_89+ on CUDA, MI300/MI350 (gfx94x/gfx95x) on
    ROCm: elsewhere the first step would fail inside torchao. ROCm reports gfx90a (MI250X) as
    capability 9.0, so there the architecture name decides."""
    major, minor = torch.cuda.get_device_capability(device)
    if torch.version.hip is not None:
        arch = torch.cuda.get_device_properties(device).gcnArchName.split(":")[0]
        ok, what = arch.startswith(("gfx94", "gfx95")), arch
    else:
        ok, what = (major, minor) >= (8, 9), f"sm_{major}{minor}"
    if not ok:
        raise ValueError(
            f"parallel.float8={recipe} needs an H100-class GPU (compute capability >= 8.9; "
            f"MI300X/MI350 (gfx94x/gfx95x) on ROCm), this one is "
            f"{torch.cuda.get_device_name(device)} ({what}); use parallel.float8=none")


def apply_activation_checkpointing(model: nn.Module, mode: str) -> int:
    if mode == "none":
        return 0
    if mode not in ("full", "selective"):
        raise ValueError(f"parallel.activation_checkpointing must be none, selective or full, "
                         f"got {mode!r}")
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = model.parts.layers
    every = 1 if mode == "full" else 2
    wrapped = 0
    for i in range(len(layers)):
        if i % every == 0:
            # The recompute must draw the forward's dropout masks (else the gradients are not
            # those of the loss); blocks without dropout skip the RNG bookkeeping.
            layers[i] = checkpoint_wrapper(layers[i], preserve_rng_state=_has_dropout(layers[i]))
            wrapped += 1
    # The layer taps' hooks move from the blocks to their wrappers: a hook inside the
    # checkpoint stores into a dict outside it, a side effect torch.compile refuses in a
    # checkpoint (a graph break that left every checkpointed block uncompiled, silently).
    taps = getattr(model, "_taps", None)
    if taps is not None and taps.handles:
        taps.remove()
        taps.install()
    return wrapped


def _has_dropout(block: nn.Module) -> bool:
    """Dropout modules, or Hugging Face attention's functional ``attention_dropout`` rate."""
    for m in block.modules():
        rate = m.p if isinstance(m, nn.Dropout) else getattr(m, "attention_dropout", 0.0)
        if isinstance(rate, (int, float)) and rate > 0:
            return True
    return False


def apply_compile(model: nn.Module) -> None:
    for layer in model.parts.layers:
        layer.compile()


def apply_fsdp(model: nn.Module, mixed_precision: str, reduce_dtype: str) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=_DTYPES[mixed_precision],
                                  reduce_dtype=_DTYPES[reduce_dtype])
    for layer in model.parts.layers:
        fully_shard(layer, mp_policy=policy)
    if any(True for _ in model.vision_tower.parameters()):
        fully_shard(model.vision_tower, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def tf32_state() -> tuple[str, object, object]:
    """The process's fp32 matmul and convolution precision, read through whichever API the
    process uses: ("legacy", torch.get_float32_matmul_precision(), cudnn.allow_tf32), or
    ("fp32_precision", matmul, conv) once the newer ``fp32_precision`` settings were used
    (torch then refuses reads through the legacy API)."""
    try:
        return ("legacy", torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        return ("fp32_precision", torch.backends.cuda.matmul.fp32_precision,
                torch.backends.cudnn.conv.fp32_precision)


def set_tf32_state(state: tuple[str, object, object]) -> None:
    api, matmul, conv = state
    if api == "legacy":
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = conv
    else:
        torch.backends.cuda.matmul.fp32_precision = matmul
        torch.backends.cudnn.conv.fp32_precision = conv


def enable_tf32(cfg, device: torch.device) -> tuple | None:
    """``parallel.tf32`` on CUDA: TF32 for fp32 matmuls and convolutions. The switches are
    process-wide, so this returns the state it replaced (set_tf32_state puts it back: the
    Trainer does in close() and after a failed start), or None when it changed nothing."""
    if not (cfg.tf32 and device.type == "cuda"):
        return None
    before = tf32_state()
    if before[0] == "legacy":
        set_tf32_state(("legacy", "high", True))  # "high": TF32 for cuBLAS fp32 matmuls
    else:
        set_tf32_state(("fp32_precision", "tf32", "tf32"))
    return before


def apply_parallelism(model: nn.Module, cfg, dist_info: DistInfo) -> dict:
    """Apply the ParallelConfig switches in order; returns what was done (for the run log),
    the model's own switches (lean_mlp, lean_norm, fused_rope, attention) and tf32 included.
    (``parallel.tf32`` is only reported here: process-wide, it is the Trainer's, enable_tf32.)"""
    done: dict = {}
    device = dist_info.device
    if cfg.liger:
        done["liger_modules"] = apply_liger(model, device)
    if cfg.float8 != "none":
        done["float8_linears"] = apply_float8(model, cfg.float8, device)
    done["checkpointed_blocks"] = apply_activation_checkpointing(model,
                                                                 cfg.activation_checkpointing)
    if cfg.compile:
        apply_compile(model)
        done["compiled_blocks"] = len(model.parts.layers)
    if wants_fsdp(cfg, dist_info.world_size):
        apply_fsdp(model, cfg.mixed_precision, cfg.reduce_dtype)
        done["fsdp"] = f"{dist_info.world_size} ranks, params {cfg.mixed_precision}, reduce " \
                       f"{cfg.reduce_dtype}"
    if cfg.sdpa_backend != "auto":
        done["sdpa_backend"] = cfg.sdpa_backend
    if cfg.tf32 and device.type == "cuda":  # (enable_tf32's, reported with the others)
        done["tf32"] = "fp32 matmuls and convolutions"
    return {**_model_switches(model), **done}  # (after liger, which replaces lean modules)


def _model_switches(model: nn.Module) -> dict:
    """What the model's own switches did (ModelConfig lean_mlp, lean_norm, fused_rope: how many
    modules run them; a decoder whose code they do not recognise keeps its own, silently
    otherwise) and the attention implementation the decoder runs."""
    from olavlm.models.fused_rope import FusedRopeAttention
    from olavlm.models.lean_mlp import LeanSwiGLUMLP

    config, modules = getattr(model, "config", None), list(model.llm.modules())
    done = {}
    for key, cls, flag in (("lean_mlp", LeanSwiGLUMLP, "lean"), ("lean_norm", LeanRMSNorm, "lean"),
                           ("fused_rope", FusedRopeAttention, "fused_rope")):
        if getattr(config, key, False):
            done[f"{key}_modules"] = sum(isinstance(m, cls) and getattr(m, flag) for m in modules)
    attn = getattr(model.llm.config, "_attn_implementation", None)
    if attn is not None:
        done["attention"] = attn
    return done


def sdpa_context(backend: str):
    """A context selecting SDPA's backend for the forward ("auto": PyTorch's choice)."""
    if backend == "auto":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    if backend not in names:
        raise ValueError(f"parallel.sdpa_backend must be auto or one of {sorted(names)}, got "
                         f"{backend!r}")
    return _naming_the_key(backend, sdpa_kernel(names[backend]))


@contextmanager
def _naming_the_key(backend: str, kernel_choice):
    """PyTorch's error for inputs the chosen kernel cannot take (flash: fp16/bf16 only, no
    arbitrary mask; efficient/cudnn: CUDA only) names no config key: this one does."""
    with kernel_choice:
        try:
            yield
        except RuntimeError as exc:
            if "No viable backend for scaled_dot_product_attention" not in str(exc):
                raise
            raise RuntimeError(
                f"parallel.sdpa_backend={backend}: this SDPA kernel cannot take these inputs "
                f"(dtype, mask or device; PyTorch's warnings above say why); use "
                f"parallel.sdpa_backend=auto") from exc
