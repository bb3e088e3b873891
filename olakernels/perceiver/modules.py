# Perceiver resampler modules with the seed's state_dict layout; reference or fast forward.
"""``PerceiverResampler`` (learned latents), ``TaskTokenResampler`` (latents passed in) and
``EmbeddingPredictorHead`` (a resampler as ``projector`` plus the depth head's MLPs).

The parameter layout is the seed's (SPEC sections 2.1 and 11), so seed checkpoints load
unchanged: ``latents`` (learned variant only), ``proj_in``, ``proj_out``, ``norm_out``,
``layers.{j}.0.{norm1,norm2,to_q,to_kv,to_out}`` (attention) and ``layers.{j}.1.{0,1,3}``
(the feed-forward ``Sequential(LayerNorm, Linear, GELU, Linear)``).

``impl``: "reference" runs the seed's eager math (impl/reference.py); "torch" the fast path
with PyTorch's LayerNorm and GELU; "triton" the fast path with the Triton LayerNorm/GELU
kernels; "auto" (default) is "torch", except for a few per-sample latents (the gen head's one
mean-pooled query per sample), where it is "reference". Measured on an H200 (docs/PERF.md,
perceiver runs 4 and 6) and an H100 (run 7): the Triton LayerNorm/GELU kernels tie at the
largest heads and lose up to 2x at small ones (launch-bound custom ops); with per-sample
latents the fast path has nothing to share, and the seed's eager math was 1.13-1.31x faster
at the same peak memory (runs 6 and 7; in run 4 the fast path was the faster). All share the
same parameters.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._amp import _enabled as _amp_enabled
from .._amp import autocast_layer_norm_in_fp32
from .._checks import refuse_func_transforms
from .._triton import check_triton_device

IMPLS = ("auto", "triton", "torch", "reference")
# impl="auto" runs the seed's eager math when each sample brings its own latents and at most
# this many queries run (after the latents adaptation rule; module docstring: measured faster
# for the gen head's single query).
AUTO_REFERENCE_MAX_LATENTS = 16


def _refuse_key_padding_mask(value) -> None:
    """The mask argument is ``attend_mask`` (True = attend, as SDPA's boolean ``attn_mask``);
    PyTorch's ``key_padding_mask`` (nn.MultiheadAttention) means the opposite, True = padding.
    The old name is refused rather than read either way."""
    if value is not None:
        raise TypeError("key_padding_mask is not an argument here: pass attend_mask (True = "
                        "attend the key); nn.MultiheadAttention's key_padding_mask is True "
                        "on padding, so attend_mask=~key_padding_mask")


class PerceiverAttention(nn.Module):
    """Latents attend to [inputs; latents]: norm1 (inputs), norm2 (latents), to_q, to_kv, to_out."""

    def __init__(self, *, dim: int, dim_head: int = 64, heads: int = 8) -> None:
        super().__init__()
        self.dim_head, self.heads = dim_head, heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)


def FeedForward(dim: int, mult: int = 4) -> nn.Sequential:  # noqa: N802 - the seed's name
    """LayerNorm -> Linear (no bias) -> GELU (exact erf) -> Linear (no bias)."""
    inner = int(dim * mult)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


class _TorchOps:
    @staticmethod
    def layer_norm(x, ln: nn.LayerNorm):
        return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)

    gelu = staticmethod(F.gelu)

    @staticmethod
    def layer_norm_linear(x, ln: nn.LayerNorm, weight):
        """LayerNorm then a bias-free Linear; autograd keeps ``x`` only (impl/recompute.py;
        under autocast with autocast's casts)."""
        from .impl import recompute  # noqa: PLC0415

        if _amp_enabled(x.device.type):
            return recompute.autocast_layer_norm_linear(x, ln.weight, ln.bias, ln.eps, weight)
        return recompute.layer_norm_linear(x, ln.weight, ln.bias, ln.eps, weight)

    @staticmethod
    def gelu_linear(a, weight):
        """GELU then a bias-free Linear, keeping ``a`` only (as layer_norm_linear)."""
        from .impl import recompute  # noqa: PLC0415

        if _amp_enabled(a.device.type):
            return recompute.autocast_gelu_linear(a, weight)
        return recompute.gelu_linear(a, weight)


class _TritonOps:
    @staticmethod
    def layer_norm(x, ln: nn.LayerNorm):
        from .impl.triton import layer_norm_fwd  # noqa: PLC0415 - triton only when used

        # Under CUDA autocast eager's LayerNorm returns fp32 (the next Linear's cast to the
        # autocast dtype is then the one rounding): the head's last LayerNorm output, and
        # its dtype, are eager's.
        return layer_norm_fwd(x, ln.weight, ln.bias, ln.eps,
                              autocast_layer_norm_in_fp32(x.device))[0]

    @staticmethod
    def gelu(x):
        from .impl.triton import gelu_fwd  # noqa: PLC0415

        return gelu_fwd(x)

    @staticmethod
    def layer_norm_linear(x, ln: nn.LayerNorm, weight):
        return F.linear(_TritonOps.layer_norm(x, ln), weight)

    @staticmethod
    def gelu_linear(a, weight):
        return F.linear(_TritonOps.gelu(a), weight)


class PerceiverResampler(nn.Module):
    """The seed's ``Resampler``: learned latents (num_queries, dim) read the inputs.

    forward(x (B, N, embedding_dim), attend_mask (B, N) bool or None, True = attend)
    -> (B, num_queries, output_dim). The seed passes no mask (padding is attended).
    """

    learned_latents = True

    def __init__(self, *, dim: int = 1024, depth: int = 8, dim_head: int = 64, heads: int = 16,
                 num_queries: int = 8, embedding_dim: int = 768, output_dim: int = 1024,
                 ff_mult: int = 4, impl: str = "auto") -> None:
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        for name, value in (("dim", dim), ("depth", depth), ("dim_head", dim_head),
                            ("heads", heads), ("num_queries", num_queries),
                            ("embedding_dim", embedding_dim), ("output_dim", output_dim),
                            ("ff_mult", ff_mult)):
            if isinstance(value, bool) or not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.dim, self.num_queries, self.embedding_dim = dim, num_queries, embedding_dim
        self.output_dim, self.impl = output_dim, impl
        if self.learned_latents:
            self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList([
            nn.ModuleList([PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads),
                           FeedForward(dim=dim, mult=ff_mult)])
            for _ in range(depth)
        ])

    def forward(self, x: torch.Tensor, attend_mask: torch.Tensor | None = None, *,
                key_padding_mask=None):
        _refuse_key_padding_mask(key_padding_mask)
        self._check_inputs(x, attend_mask)
        return self._run(x, None, attend_mask)

    def _run(self, x, latents, attend_mask):
        """The forward of checked inputs (each public forward checks its own first)."""
        impl = self._resolve(x, latents)
        if impl != "reference":
            refuse_func_transforms(type(self).__name__, impl)
        if impl == "reference":
            from .impl.reference import resampler_ref  # noqa: PLC0415

            return resampler_ref(self, x, latents, attend_mask)
        from .impl.fast import resampler_fast  # noqa: PLC0415

        ops = _TritonOps if impl == "triton" else _TorchOps
        return resampler_fast(self, x, latents, attend_mask, ops)

    def _resolve(self, x: torch.Tensor, latents: torch.Tensor | None = None) -> str:
        if self.impl not in IMPLS:  # set after construction (OlaVLM.set_impl, benchmarks)
            raise ValueError(f"{type(self).__name__}: impl must be one of {IMPLS}, got "
                             f"{self.impl!r}")
        if self.impl == "auto":  # whichever measured faster (module docstring)
            # Per-sample latents leave the fast path nothing to share (at B = 1 neither do
            # shared ones); the reference's fp32 scores grow with the queries, so few only.
            per_sample = latents is not None and latents.shape[0] == x.shape[0]
            if per_sample and self.num_queries <= AUTO_REFERENCE_MAX_LATENTS:
                return "reference"
            return "torch"
        if self.impl == "triton":
            check_triton_device(x, type(self).__name__)
            if x.dtype == torch.float64:  # the kernels compute and store in fp32
                raise NotImplementedError(f"{type(self).__name__}: impl='triton' has no "
                                          "float64 kernels; use impl='torch' or 'reference'")
        return self.impl

    def _check_inputs(self, x, attend_mask) -> None:
        name = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: x must be a Tensor (B, N, embedding_dim), got "
                            f"{type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.embedding_dim or x.shape[0] == 0:
            raise ValueError(f"{name}: x must have shape (B, N, embedding_dim) = (?, ?, "
                             f"{self.embedding_dim}) with B >= 1, got {tuple(x.shape)}")
        if attend_mask is not None:
            if not isinstance(attend_mask, torch.Tensor):
                raise TypeError(f"{name}: attend_mask must be a bool Tensor (B, N), got "
                                f"{type(attend_mask).__name__}")
            if attend_mask.dtype != torch.bool or attend_mask.shape != x.shape[:2]:
                raise ValueError(f"{name}: attend_mask must be a bool tensor of shape "
                                 f"(B, N) = {tuple(x.shape[:2])}, got "
                                 f"{attend_mask.dtype} {tuple(attend_mask.shape)}")
            if attend_mask.device != x.device:
                raise ValueError(f"{name}: attend_mask must be on x's device {x.device}, got "
                                 f"{attend_mask.device}")

    def extra_repr(self) -> str:
        return f"num_queries={self.num_queries}, impl={self.impl!r}"


class TaskTokenResampler(PerceiverResampler):
    """The seed's ``TaskTokenResampler``: no learned latents; ``forward(x, latents)``.

    latents: (B, n, embedding_dim), or (1, n, embedding_dim) / (n, embedding_dim) when every
    sample shares them (the depth and seg heads' task-token parameters: the fast path then runs
    their projections once). They go through the same ``proj_in`` as ``x``. When n differs from
    num_queries the seed's rule applies (see latents.adapt_latents).
    """

    learned_latents = False

    def forward(self, x: torch.Tensor, latents: torch.Tensor,
                attend_mask: torch.Tensor | None = None, *, key_padding_mask=None):
        _refuse_key_padding_mask(key_padding_mask)
        self._check_inputs(x, attend_mask)  # (before the latents' checks read x.shape)
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"TaskTokenResampler: latents must be a Tensor, got "
                            f"{type(latents).__name__}")
        if latents.device != x.device:  # (proj_in's own error names neither)
            raise ValueError(f"TaskTokenResampler: latents must be on x's device {x.device}, "
                             f"got {latents.device}")
        if latents.dim() == 2:
            latents = latents.unsqueeze(0)
        if (latents.dim() != 3 or latents.shape[-1] != self.embedding_dim
                or latents.shape[1] == 0 or latents.shape[0] not in (1, x.shape[0])):
            raise ValueError(
                f"TaskTokenResampler: latents must have shape (B, n, embedding_dim) with "
                f"B in (1, {x.shape[0]}), n >= 1 and embedding_dim {self.embedding_dim}, got "
                f"{tuple(latents.shape)}"
            )
        return self._run(x, latents, attend_mask)


class EmbeddingPredictorHead(nn.Module):
    """A resampler as ``projector``, optionally followed by the depth head's MLPs.

    ``num_mlps=3`` adds ``linear_{1,2,3} = Sequential(Linear, ReLU, Linear)`` (mlp_dim wide) as
    the seed's depth head has them (state_dict keys ``linear_{i}.{0,2}.*``). Only ``linear_1``
    feeds the loss, so forward computes only it; ``visualisation_outputs`` gives all of them.
    """

    def __init__(self, projector: PerceiverResampler, *, num_mlps: int = 0,
                 mlp_dim: int | None = None) -> None:
        super().__init__()
        if num_mlps not in (0, 3):
            raise ValueError(f"num_mlps must be 0 or 3 (the seed's depth head), got {num_mlps}")
        self.projector = projector
        self.num_mlps = num_mlps
        out, width = projector.output_dim, mlp_dim or projector.output_dim
        for i in range(1, num_mlps + 1):  # (the seed's: output_dim wide throughout)
            setattr(self, f"linear_{i}", nn.Sequential(nn.Linear(out, width), nn.ReLU(),
                                                       nn.Linear(width, out)))

    def _project(self, x, latents, attend_mask):
        if isinstance(self.projector, TaskTokenResampler):
            return self.projector(x, latents, attend_mask)
        if latents is not None:  # would be dropped without a word
            raise ValueError(f"EmbeddingPredictorHead: its {type(self.projector).__name__} "
                             "projector has learned latents; pass latents=None")
        return self.projector(x, attend_mask)

    def forward(self, x, latents=None, attend_mask=None, *, key_padding_mask=None):
        _refuse_key_padding_mask(key_padding_mask)
        out = self._project(x, latents, attend_mask)
        return self.linear_1(out) if self.num_mlps else out

    @torch.no_grad()
    def visualisation_outputs(self, x, latents=None, attend_mask=None, *,
                              key_padding_mask=None) -> list:
        """[linear_1(v), linear_2(v), linear_3(v), v] as the seed's depth head returns them."""
        _refuse_key_padding_mask(key_padding_mask)
        v = self._project(x, latents, attend_mask)
        return [getattr(self, f"linear_{i}")(v) for i in range(1, self.num_mlps + 1)] + [v]
