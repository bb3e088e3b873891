# The LLM: any Hugging Face causal decoder, with hooks on the tapped layers (SPEC 9 item 14).
"""Load a local HF causal LM and find its parts; keep only the tapped layers' hidden states.

The seed asks the decoder for ``output_hidden_states=True`` (all 33 states of Llama-3-8B kept
alive) and slices. Here a forward hook on each tapped block stores that block's output and
nothing else; the blocks after the last tap still run, because the next-token loss needs the
final state. Layer numbers are 1-based blocks; 0 is the final normed state (the decoder's
``last_hidden_state``).
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

__all__ = ["DecoderParts", "LayerTaps", "decoder_parts", "load_llm"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_llm(path: str | Path, *, dtype: str = "float32", attn_implementation: str = "sdpa",
             device: torch.device | str | None = None, meta: bool = False):
    """``AutoModelForCausalLM`` from a local directory (never a download). ``device`` (a GPU)
    loads the weights straight onto it (``device_map``, needs accelerate). ``meta``: the same
    modules on the meta device, built from config.json alone (no weight is read or allocated):
    the ranks that receive their shards from rank 0 (``parallel.load=rank0``)."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"llm: {str(path)!r} is not a local Hugging Face model directory (no config.json); "
            "models are never downloaded, pass a local path")
    if meta:
        return _meta_llm(path, _DTYPES[dtype], attn_implementation)
    extra = {}
    if device is not None and torch.device(device).type == "cuda" and \
            importlib.util.find_spec("accelerate") is not None:
        extra["device_map"] = {"": torch.device(device)}
    model, info = AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, dtype=_DTYPES[dtype], attn_implementation=attn_implementation,
        output_loading_info=True, **extra)
    # transformers initializes missing weights at random with a log line (which the launcher
    # quiets): a damaged or mismatched folder would train or export a partly random model.
    missing = sorted(map(str, info.get("missing_keys") or ()))
    if missing:
        shown = ", ".join(missing[:5]) + (f", ... ({len(missing) - 5} more)"
                                          if len(missing) > 5 else "")
        raise ValueError(f"llm: {str(path)!r} lacks {len(missing)} weights its config.json's "
                         f"architecture needs ({shown}); they would start from random values. "
                         "Check the folder's *.safetensors (and their index) are complete")
    return model


def _meta_llm(path: Path, dtype: torch.dtype, attn_implementation: str):
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 attn_implementation=attn_implementation)
    # What from_pretrained does besides reading weights: eval mode, the generation config.
    if (path / "generation_config.json").is_file() and model.can_generate():
        model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    return model.eval()


class DecoderParts:
    """embed_tokens, the decoder (called with inputs_embeds), its block list and the lm_head."""

    def __init__(self, llm: nn.Module) -> None:
        decoder = llm.get_decoder() if hasattr(llm, "get_decoder") \
            else getattr(llm, "model", None)
        layers = getattr(decoder, "layers", None)
        if decoder is None or not isinstance(layers, nn.ModuleList):
            raise ValueError(f"llm: {type(llm).__name__} is not a supported causal decoder (no "
                             "decoder with a `layers` ModuleList; Llama, Phi-3, Qwen2, Mistral "
                             "and Gemma layouts are)")
        self.decoder = decoder
        self.layers = layers
        self.embed_tokens = llm.get_input_embeddings()
        self.lm_head = llm.get_output_embeddings()
        if self.lm_head is None:
            raise ValueError(f"llm: {type(llm).__name__} has no LM head (output embeddings)")

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def decoder_parts(llm: nn.Module) -> DecoderParts:
    return DecoderParts(llm)


class LayerTaps:
    """Forward hooks that keep the outputs of the given 1-based blocks during one forward.

    The hooks are installed once (``install``) and stay: only ``capture(layers)`` makes them
    store anything, so the blocks' hook set never changes between steps (per-block
    ``torch.compile`` guards on it) and wrappers added later (FSDP2, activation checkpointing)
    keep calling them."""

    def __init__(self, parts: DecoderParts, layers: set[int]) -> None:
        bad = sorted(k for k in layers if not 0 <= k <= parts.num_layers)
        if bad:
            raise ValueError(f"layer_indices: layers {bad} are outside the LLM's "
                             f"{parts.num_layers} blocks (1-based; 0 = the final normed state)")
        # Weakly: the tapped blocks hold this object (``_ola_taps``), so a strong reference
        # back to them (parts -> layers -> block) made a cycle that kept the whole LLM's
        # weights alive after ``del model`` until a garbage collection ran. The OlaVLM holds
        # the parts.
        self._parts = weakref.ref(parts)
        # Hooks on blocks 1..n-1 only: block n's state, as the seed reads it, is the decoder's
        # final normed output, which the caller has anyway (0 means the same).
        self.layers = sorted(k for k in layers if 0 < k < parts.num_layers)
        self.states: dict[int, torch.Tensor] = {}
        self.wanted: frozenset[int] = frozenset()
        self.handles: list = []

    @property
    def parts(self) -> DecoderParts:
        parts = self._parts()
        if parts is None:
            raise RuntimeError("LayerTaps: its DecoderParts were freed; keep a reference to "
                               "them while the taps are in use (OlaVLM.parts does)")
        return parts

    def __getstate__(self) -> dict:  # (copy.deepcopy and pickle: the copy's own parts)
        return {**self.__dict__, "_parts": self.parts}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _parts=weakref.ref(state["_parts"]))

    def install(self) -> LayerTaps:
        if not self.handles:
            for k in self.layers:
                block = self.parts.layers[k - 1]
                owner = getattr(block, "_ola_taps", None)
                if owner is not None and owner is not self:
                    raise ValueError("llm: this decoder instance already feeds another OlaVLM "
                                     "(its blocks carry that model's layer taps); load or "
                                     "copy a separate LLM for each model")
                # The hook finds its taps through the block, not a closure: a deep copy of the
                # model (copy.deepcopy) then taps into the copy's own LayerTaps.
                block._ola_taps, block._ola_tap_layer = self, k
                self.handles.append(block.register_forward_hook(_store_tap))
        return self

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    @contextmanager
    def capture(self, layers=None):
        """Collect the outputs of ``layers`` (default: all installed) during the block."""
        self.install()
        self.states = {}
        self.wanted = frozenset(self.layers if layers is None else layers)
        try:
            yield self.states
        finally:  # the caller keeps its dict; the module holds no activations afterwards
            self.wanted = frozenset()
            self.states = {}


def _store_tap(module, _args, output) -> None:
    """Forward hook of a tapped block: keep its output while its LayerTaps captures."""
    taps, k = module._ola_taps, module._ola_tap_layer
    # Blocks return a tensor or a tuple whose first item is the hidden state. Under activation
    # checkpointing the hook fires again in the recompute: keep the first.
    if k in taps.wanted and k not in taps.states:
        taps.states[k] = output[0] if isinstance(output, (tuple, list)) else output
