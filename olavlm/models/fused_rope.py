# Decoder attention whose RoPE runs olakernels.rotary_embedding: one fused pass each way.
"""The decoder's attention with a fused rotary embedding (Llama, Mistral, Qwen2/3, Phi-3, ...).

Hugging Face's attention ``forward`` calls its module's ``apply_rotary_pos_emb`` (eager:
~0.55 GB of memory traffic forward and ~1.2 GB backward per Llama-3-8B block at 5.4k tokens).
``make_attention_rope_fused`` turns each attention module into an instance of a subclass of its
own class (``FusedRope<Class>``, state_dict and parameters unchanged) whose ``forward`` runs the
class's own forward code -- the very function object's code, not a copy of its source -- with
``apply_rotary_pos_emb`` resolved to a dispatcher: ``olakernels.rotary_embedding`` for the
full-rotary (B, H, L, D) case, the original function for anything else (partial rotary, other
layouts or dtypes). Only classes whose module's ``apply_rotary_pos_emb`` and ``rotate_half``
are Llama's or Phi-3's code (the half rotation) are swapped; others (Cohere's interleaved
rotation, GLM, GPT-J) keep theirs. Nothing in ``transformers`` is modified: other models in
the process, and these modules with ``fused_rope = False``, run the library's code as it is.
The forward's module namespace is copied when the class is first swapped: a later
monkey-patch of that ``transformers`` module does not reach the swapped modules. Pickling
(``torch.save(model)``, ``copy.deepcopy``) rebuilds the class from the library's one.

Falls back to the class's own forward (eager RoPE) when the call carries a KV cache
(generation), under torch.compile (Inductor fuses the formula itself), with ``fused_rope``
off (``impl="reference"``), or if a future ``transformers`` stops calling
``apply_rotary_pos_emb`` by name (then the class is not swapped: same numbers, eager speed).
"""
from __future__ import annotations

import contextvars
import functools
import inspect
import types

import torch
from torch import nn

from olakernels import rotary_embedding

__all__ = ["FusedRopeAttention", "make_attention_rope_fused"]

_ROPE_NAME = "apply_rotary_pos_emb"
# The impl the dispatcher uses, set by FusedRopeAttention.forward around the class's code (an
# activation-checkpointing recompute runs the same forward, so it sees the same value).
_ROPE_IMPL: contextvars.ContextVar[str] = contextvars.ContextVar("olavlm_rope_impl",
                                                                 default="auto")


def _code_key(fn) -> tuple:
    """What a function computes, without its name, docstring or line numbers."""
    code = fn.__code__
    consts = code.co_consts[1:] if code.co_consts and isinstance(code.co_consts[0], str) \
        else code.co_consts
    return code.co_code, code.co_names, code.co_varnames, consts


@functools.cache
def _half_rotation_keys() -> frozenset:
    """Code of the RoPE functions known to compute the half rotation: Llama's (copied by
    Mistral, Qwen2/3, Gemma, ...) and Phi-3's (the same with an optional partial rotary dim,
    which the dispatcher leaves to it)."""
    from transformers.models.llama import modeling_llama
    from transformers.models.phi3 import modeling_phi3

    return frozenset({_code_key(modeling_llama.apply_rotary_pos_emb),
                      _code_key(modeling_phi3.apply_rotary_pos_emb)})


def _is_half_rotation(namespace: dict) -> bool:
    """The module's ``apply_rotary_pos_emb`` and ``rotate_half`` are Llama's or Phi-3's code
    (Cohere's interleaved rotation, GLM's partial one or GPT-J's signature are not)."""
    from transformers.models.llama import modeling_llama

    rope, rotate = namespace.get(_ROPE_NAME), namespace.get("rotate_half")
    if not isinstance(rope, types.FunctionType) or not isinstance(rotate, types.FunctionType):
        return False
    rope = inspect.unwrap(rope)
    return _code_key(rope) in _half_rotation_keys() and \
        _code_key(rotate) == _code_key(modeling_llama.rotate_half)


def _dispatcher(original):
    """An ``apply_rotary_pos_emb`` with the original's signature for the fused case."""

    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        unsqueeze_dim = kwargs.get("unsqueeze_dim", 1)
        if (not args and set(kwargs) <= {"unsqueeze_dim"} and unsqueeze_dim == 1
                and q.dim() == 4 and k.dim() == 4 and cos.dim() == 3
                and cos.shape == sin.shape and cos.shape[-1] == q.shape[-1] == k.shape[-1]
                and q.dtype == k.dtype == cos.dtype == sin.dtype
                and not (cos.requires_grad or sin.requires_grad)):
            return rotary_embedding(q, k, cos, sin, impl=_ROPE_IMPL.get())
        return original(q, k, cos, sin, *args, **kwargs)

    return apply_rotary_pos_emb


@functools.cache
def _forward_with_fused_rope(cls: type):
    """``cls.forward``'s code with ``apply_rotary_pos_emb`` bound to the dispatcher, or None
    when the forward does not call it by that name."""
    fn = inspect.unwrap(cls.forward)  # below decorators such as deprecate_kwarg
    if not isinstance(fn, types.FunctionType) or _ROPE_NAME not in fn.__code__.co_names \
            or not _is_half_rotation(fn.__globals__):
        return None
    namespace = dict(fn.__globals__)
    namespace[_ROPE_NAME] = _dispatcher(fn.__globals__[_ROPE_NAME])
    new = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__,
                             fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    return new


def _rebuild(base_cls: type, state: dict):
    """Unpickle a FusedRope<Class> (its class is made at run time, so pickle cannot name it)."""
    cls = _fused_class(base_cls)
    module = cls.__new__(cls)
    module.__setstate__(state)
    return module


class FusedRopeAttention:
    """Mixin placed before the decoder's attention class (see the module doc)."""

    fused_rope = True
    rope_impl = "auto"  # rotary_embedding's impl: "auto" | "triton" | "torch" (set_impl's)
    _base_class: type

    def __reduce_ex__(self, protocol):
        return _rebuild, (self._base_class, self.__dict__.copy())

    def forward(self, *args, **kwargs):
        if (self.fused_rope and not torch.compiler.is_compiling()
                and kwargs.get("cache") is None and kwargs.get("past_key_values") is None):
            token = _ROPE_IMPL.set(self.rope_impl)
            try:
                return self._forward_fused_rope(*args, **kwargs)
            finally:
                _ROPE_IMPL.reset(token)
        return super().forward(*args, **kwargs)


@functools.cache
def _fused_class(cls: type) -> type | None:
    forward = _forward_with_fused_rope(cls)
    if forward is None:
        return None
    return type(f"FusedRope{cls.__name__}", (FusedRopeAttention, cls),
                {"_forward_fused_rope": forward, "_base_class": cls, "__module__": __name__})


def make_attention_rope_fused(model: nn.Module) -> int:
    """Give every decoder attention module of ``model`` that applies RoPE through
    ``apply_rotary_pos_emb`` the fused RoPE (module doc); returns the count. Idempotent."""
    count = 0
    for module in model.modules():
        cls = type(module)
        if isinstance(module, FusedRopeAttention) or not cls.__module__.startswith(
                "transformers.models.") or not cls.__name__.endswith("Attention"):
            continue
        fused = _fused_class(cls)
        if fused is not None:
            module.__class__ = fused
            count += 1
    return count
