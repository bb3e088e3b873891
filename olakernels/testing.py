# Test helpers shared by every op: realistic input factories and the tolerance rule.
"""Testing helpers for olakernels ops.

The tolerance rule (used by every op's tests): a fast kernel's error against a float64 oracle
must be at most ``k`` times the error that plain PyTorch makes in the same dtype, plus a rounding
floor. This makes tolerances follow the dtype and the problem instead of being tuned by hand.
"""
from __future__ import annotations

import contextlib
import math
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = [
    "assert_close_to_reference",
    "make_embedding_pair",
    "make_lm_head_inputs",
    "make_sample_mask",
    "max_abs_error",
    "track_host_syncs",
    "track_peak_memory",
]


def _as_f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


def max_abs_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |out - ref| over finite reference entries, in float64 (0.0 for empty tensors)."""
    diff = (_as_f64(out) - _as_f64(ref)).abs()
    if diff.numel() == 0:
        return 0.0
    return float(torch.nan_to_num(diff, nan=math.inf).max())


def assert_close_to_reference(
    out: torch.Tensor,
    ref_fp64: torch.Tensor,
    eager_same_dtype: torch.Tensor | None,
    *,
    name: str,
    k: float = 2.0,
    floor_ulps: float = 4.0,
    dtype: torch.dtype | None = None,
    reduction_size: int = 1,
) -> None:
    """Assert ``out`` is as close to the float64 oracle as eager PyTorch is, up to ``k`` times.

    budget = k * max|eager_same_dtype - ref| + floor, with
    floor  = floor_ulps * eps(dtype) * sqrt(reduction_size) * max|ref|.

    ``dtype`` defaults to ``out.dtype``: the precision the result is stored in. Pass the
    reduction length for outputs that are sums of many rounded terms (rounding errors of a sum of
    n terms grow like sqrt(n)). NaN positions must match exactly: NaN in the reference must
    propagate, and NaN where the reference is finite is an error; an infinite reference must
    be met exactly; positions where eager overflowed do not widen the budget.
    The failure message names the tensor, the max error, the budget, the eager error and where.
    """
    if tuple(out.shape) != tuple(ref_fp64.shape):
        raise AssertionError(
            f"{name}: shape {tuple(out.shape)} differs from the reference {tuple(ref_fp64.shape)}"
        )
    o, r = _as_f64(out), _as_f64(ref_fp64)
    nan_o, nan_r = torch.isnan(o), torch.isnan(r)
    if not torch.equal(nan_o, nan_r):
        where = torch.nonzero(nan_o != nan_r)[0].tolist()
        raise AssertionError(
            f"{name}: NaN pattern differs from the reference at index {where} "
            f"(out={o[tuple(where)].item()}, ref={r[tuple(where)].item()})"
        )
    inf_r = torch.isinf(r)
    if bool((inf_r & (o != r)).any()):  # an infinite reference must be met exactly
        where = torch.nonzero(inf_r & (o != r))[0].tolist()
        raise AssertionError(f"{name}: the reference is {r[tuple(where)].item()} at index "
                             f"{where}, out is {o[tuple(where)].item()}")
    finite = ~nan_r & ~inf_r
    if not bool(finite.any()):
        return
    o, r = torch.where(finite, o, 0.0), torch.where(finite, r, 0.0)
    err = (o - r).abs()
    eager_err = 0.0
    if eager_same_dtype is not None:
        # Where eager overflowed (inf/NaN against a finite reference) it sets no budget: an
        # infinite eager error would let any finite output pass. The output is held there to
        # the budget eager earned elsewhere (and the floor).
        e = torch.where(finite, _as_f64(eager_same_dtype), 0.0)
        eager_abs = (e - r).abs()
        counted = torch.isfinite(eager_abs)
        eager_err = float(eager_abs[counted].max()) if bool(counted.any()) else 0.0
    eps = torch.finfo(dtype or out.dtype).eps
    ref_max = float(r.abs().max())
    floor = floor_ulps * eps * math.sqrt(max(reduction_size, 1)) * ref_max
    budget = k * eager_err + floor
    max_err = float(err.max())
    if not max_err <= budget:
        idx = torch.unravel_index(torch.argmax(err), err.shape) if err.dim() else ()
        idx = tuple(int(i) for i in idx)
        raise AssertionError(
            f"{name}: max abs error {max_err:.3e} exceeds the budget {budget:.3e} "
            f"(= {k} x eager error {eager_err:.3e} + floor {floor:.3e}; max|ref| {ref_max:.3e}) "
            f"at index {idx}: out={o[idx].item():.6e}, ref={r[idx].item():.6e}"
        )


def make_embedding_pair(
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    target_scale: float = 2.0,
    noise: float = 0.8,
    seed: int = 0,
    requires_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (pred, target) pair shaped like a predictor head's output and a teacher's embedding.

    Targets look like teacher features: a per-sample direction plus heavier-tailed per-channel
    structure, scaled by ``target_scale`` (DINOv2/Swin features have |x| of a few units).
    Predictions are the target plus Gaussian noise of relative size ``noise``, like a partly
    trained head, so |pred - target| straddles beta=1 and both smooth-L1 branches are exercised,
    and the contrastive logits are peaked but not saturated.
    """
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    heavy = torch.randn(shape, generator=g, dtype=torch.float64) ** 3 * 0.2
    target = target_scale * (base + heavy)
    pred = target + noise * target_scale * torch.randn(shape, generator=g, dtype=torch.float64)
    pred = pred.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    return pred, target.to(device=device, dtype=dtype)


def make_sample_mask(
    batch: int, kind: str = "mixed", *, device: str | torch.device = "cpu", seed: int = 0
) -> torch.Tensor:
    """Per-sample 0/1 image mask: "ones" (pre-training), "zeros", or "mixed" (some text-only).

    "mixed" always keeps at least one valid and, for batch > 1, one masked sample.
    """
    if kind == "ones":
        return torch.ones(batch, device=device)
    if kind == "zeros":
        return torch.zeros(batch, device=device)
    if kind != "mixed":
        raise ValueError(f"kind must be 'ones', 'zeros' or 'mixed', got {kind!r}")
    g = torch.Generator().manual_seed(seed)
    m = (torch.rand(batch, generator=g) < 0.6).float()
    m[0] = 1.0
    if batch > 1:
        m[-1] = 0.0
    return m.to(device)


def make_lm_head_inputs(
    leading: tuple[int, ...],
    hidden_size: int,
    vocab: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    ignored: float = 0.3,
    bias: bool = False,
    ignore_index: int = -100,
    seed: int = 0,
    draw_on_device: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(hidden, weight, labels, bias) shaped like a decoder's last layer and its LM head.

    Hidden states are RMS-normalized (unit RMS, as after the final norm); the head is scaled so
    logits have a spread of a few units and are peaked (a trained LM's next-token distribution),
    and the labels mostly sit among the top logits; ``ignored`` is the fraction of positions
    labelled ``ignore_index`` (image, prompt and padding tokens in multimodal pre-training).
    ``draw_on_device``: draw hidden and weight in fp32 with a generator on ``device`` instead of
    in float64 on the host (benchmarks at real sizes: the host draw of Llama-3's 128k x 4096
    head is single-threaded and takes ~20 s); the values then depend on the device.
    """
    g = torch.Generator().manual_seed(seed)
    if draw_on_device:
        gd = torch.Generator(device=device).manual_seed(seed)
        f32 = dict(device=device, dtype=torch.float32, generator=gd)
        hidden = torch.randn(leading + (hidden_size,), **f32)
        weight = torch.randn(vocab, hidden_size, **f32)
    else:
        hidden = torch.randn(leading + (hidden_size,), generator=g, dtype=torch.float64)
        weight = torch.randn(vocab, hidden_size, generator=g, dtype=torch.float64)
    hidden = hidden / hidden.square().mean(-1, keepdim=True).sqrt()
    weight = weight * (2.5 / hidden_size**0.5)
    # Labels: the argmax most of the time, a random token otherwise. The argmax runs on `device`
    # in fp32 row chunks: at benchmark shapes (16k x 4096 x 128k) a float64 CPU matmul takes a
    # minute, and no (N, V) tensor is ever held whole.
    h_dev = hidden.reshape(-1, hidden_size).to(device=device, dtype=torch.float32)
    w_dev = weight.to(device=device, dtype=torch.float32)
    top = torch.cat([(rows @ w_dev.T).argmax(-1) for rows in h_dev.split(2048)]).cpu()
    del h_dev, w_dev
    labels = torch.where(torch.rand(leading, generator=g) < 0.5, top.reshape(leading),
                         torch.randint(0, vocab, leading, generator=g))
    n = labels.numel()
    drop = torch.randperm(n, generator=g)[: round(ignored * n)]
    labels.view(-1)[drop] = ignore_index
    b = 0.1 * torch.randn(vocab, generator=g, dtype=torch.float64) if bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(hidden), cast(weight), labels.to(device), cast(b)


def _storage_key(obj) -> int | None:
    if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
        return obj.untyped_storage().data_ptr()
    if isinstance(obj, torch.UntypedStorage):
        return obj.data_ptr()
    return None


def _custom_op_body(func, args, kwargs):
    """The Python kernel a torch.library.custom_op overload would run for these arguments (the
    one registered for their device type, else the default), or None: aten ops, an op with no
    kernel for that device (calling the op raises then, as it should), or a torch without the
    private lookup (then only the op's outputs are counted)."""
    try:
        from torch._library.custom_ops import _maybe_get_opdef
    except ImportError:  # pragma: no cover - private API of torch 2.4+
        return None
    opdef = _maybe_get_opdef(func)
    kernels = getattr(opdef, "_backend_fns", None) if opdef is not None else None
    if not kernels:
        return None
    devices = [t.device.type for t in tree_flatten((args, kwargs))[0]
               if isinstance(t, torch.Tensor)]
    return kernels.get(devices[0] if devices else None) or kernels.get(None)


class _PeakMemory(TorchDispatchMode):
    """Counts the bytes of every tensor storage created inside the mode while it is alive."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # Outputs that share an input's storage (views, in-place ops, set_) allocate nothing:
        # skipping them keeps storages from before the block out of the count. Read before the
        # call: an op that gives an argument new storage (resize_, out=) allocates.
        inputs = {_storage_key(a) for a in tree_flatten((args, kwargs))[0]}
        body = _custom_op_body(func, args, kwargs)
        if body is not None:
            # A torch.library.custom_op (olakernels' fused ops) runs its Python body below this
            # mode, which would see only the op's outputs: run the body with the mode active so
            # that its temporaries (dlogits buffers, accumulators) count too.
            with self:
                out = body(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self._seen or key == 0 or key in inputs:
                continue  # a view of a storage already counted, or of an input
            self._seen.add(key)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key, storage.nbytes())
        return out


@contextlib.contextmanager
def track_peak_memory():
    """Peak bytes of tensors allocated (and still alive) inside the block, on any device.

    Works on CPU, where torch has no allocator statistics: every aten op's outputs are seen
    through a TorchDispatchMode. Storages that existed before the block do not count.
    Usage: ``with track_peak_memory() as mem: ...; mem.peak``.
    """
    mode = _PeakMemory()
    with mode:
        yield mode


# aten ops that make the host wait for a CUDA device: a value read back (item(), bool(),
# int()), or an output whose size depends on the data (the host must learn the size).
_SYNCING_OPS = frozenset({
    "aten._local_scalar_dense.default", "aten.item.default", "aten.is_nonzero.default",
    "aten.equal.default",
    "aten.nonzero.default", "aten.nonzero_static.default", "aten.masked_select.default",
    "aten.unique.default", "aten._unique.default", "aten._unique2.default",
    "aten.unique_dim.default", "aten.unique_consecutive.default",
    "aten.repeat_interleave.Tensor",
})


def _host_sync_reason(func, args, kwargs) -> str | None:
    name = str(func)
    if name == "aten.repeat_interleave.Tensor" and kwargs.get("output_size") is not None:
        return None  # the output size is given: no read
    if name in _SYNCING_OPS:
        return name
    if name.startswith(("aten.index.", "aten.index_put")):
        # boolean-mask indexing runs nonzero() inside the op
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
            return f"{name} with a boolean mask"
    if name in ("aten._to_copy.default", "aten.copy_.default"):
        # a blocking copy from an accelerator to the host
        copy = name == "aten.copy_.default"
        src = args[1] if copy else args[0]
        dst = args[0].device if copy else kwargs.get("device")
        non_blocking = kwargs.get("non_blocking", args[2] if copy and len(args) > 2 else False)
        if (isinstance(src, torch.Tensor) and src.device.type not in ("cpu", "meta")
                and dst is not None and torch.device(dst).type == "cpu" and not non_blocking):
            return f"{name} to the host"
    return None


class HostSyncs(TorchDispatchMode):
    """Records every op that would make the host wait for a CUDA device (see track_host_syncs)."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str]] = []  # (why, where: the Python stack)
        self.muted = 0

    def record(self, reason: str) -> None:
        import traceback  # noqa: PLC0415

        self.events.append((reason, "".join(traceback.format_stack()[:-2])))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = _host_sync_reason(func, args, kwargs)
        if reason is not None and not self.muted:
            self.record(reason)
            self.muted += 1  # (the ops it runs inside are the same read)
            try:
                return func(*args, **kwargs)
            finally:
                self.muted -= 1
        body = _custom_op_body(func, args, kwargs)
        if body is not None:  # look inside olakernels' custom ops too (as track_peak_memory)
            with self:
                return body(*args, **kwargs)
        return func(*args, **kwargs)

    def outside(self, *allowed: str) -> list[tuple[str, str]]:
        """The events whose stack mentions none of ``allowed`` (file or function names)."""
        return [(why, where) for why, where in self.events
                if not any(a in where for a in allowed)]


@contextlib.contextmanager
def track_host_syncs():
    """Every op inside the block that would stall the host on a CUDA device: value reads
    (``.item()``, ``bool(t)``, ``if t.any():``), data-dependent output sizes (``nonzero``,
    boolean-mask indexing, ``unique``, ``masked_select``), blocking device-to-host copies.

    Works on CPU tensors, so a CPU test can prove a training step free of syncs: a CUDA
    stream would otherwise run dry while the host waits, and CUDA graphs refuse such code.
    Usage: ``with track_host_syncs() as syncs: step(); assert not syncs.events``; each event
    is ``(op, Python stack)``; ``syncs.outside("masking_utils.py")`` filters known ones.
    """
    mode = HostSyncs()
    # tolist() and numpy() read a CPU tensor's memory without any aten op (on a GPU tensor
    # they copy to the host first): seen by wrapping the two methods for the block.
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def reading(name, method):
        def wrapper(self, *args, **kwargs):
            mode.record(f"Tensor.{name}()")
            mode.muted += 1  # (its own copy to the host is the same read)
            try:
                return method(self, *args, **kwargs)
            finally:
                mode.muted -= 1
        return wrapper

    try:
        for name, method in originals.items():
            setattr(torch.Tensor, name, reading(name, method))
        with mode:
            yield mode
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
