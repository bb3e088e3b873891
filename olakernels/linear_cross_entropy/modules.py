# LinearCrossEntropy: an nn.Linear LM head whose forward returns the loss when given labels.
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .api import IMPLS, REDUCTIONS, check_loss_options, check_max_valid_tokens, linear_cross_entropy


class _EmptyWhenCopied:
    """Host-side call state of a module: not part of the state_dict, and a deep copy or pickle
    starts empty (CUDA events and weak references cannot be copied)."""

    def __deepcopy__(self, memo):
        return type(self)()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


class _CountHistory(_EmptyWhenCopied):
    """The previous call's labelled count, copied to the host without a sync: a pinned buffer
    filled by a non-blocking copy, and the CUDA event after it."""

    def __init__(self) -> None:
        self.host: torch.Tensor | None = None  # the count (int64, pinned on CUDA)
        self.event = None  # torch.cuda.Event recorded after the copy (None on the CPU)
        self.tokens = 0  # the positions that call had

    def fraction(self) -> float | None:
        """The previous call's labelled fraction. Waits for its copy if it is still pending
        (issued a call earlier: the host may run one call ahead, no further), so the choice is
        the same on every run, whatever the timing."""
        if self.host is None:
            return None
        if self.event is not None:
            self.event.synchronize()
        return int(self.host) / max(self.tokens, 1)

    def record(self, num_valid: torch.Tensor, tokens: int) -> None:
        count = num_valid.detach().reshape(())
        if count.device.type == "cuda":
            if self.host is None or self.event is None:
                self.host = torch.empty((), dtype=torch.int64, pin_memory=True)
            self.host.copy_(count, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        elif count.device.type == "cpu":
            self.host, self.event = count.clone(), None
        else:  # another device type: no history (the schedule's default applies)
            self.host, self.event = None, None
            return
        self.tokens = tokens


class _CallHints(_EmptyWhenCopied):
    """The hint each call took, by its labels tensor (and that tensor's version): activation
    checkpointing runs the forward again during the backward with the same labels, and that
    rerun must take the schedule the first run took (the previous call's fraction then; this
    call's own now), or the checkpoint finds other saved tensors and fails. Only a call made
    during a backward is taken for a rerun: a loop may pass one labels tensor twice."""

    def __init__(self) -> None:
        self.seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def hint(self, labels: torch.Tensor, history: _CountHistory) -> tuple[float | None, bool]:
        """(the hint for this call, whether it reruns an earlier call with these labels)."""
        if not torch.is_grad_enabled() or labels.is_inference():  # no backward, so no rerun
            return history.fraction(), False  # (and inference tensors have no version counter)
        earlier = self.seen.get(labels)
        in_backward = torch._C._current_graph_task_id() != -1
        if in_backward and earlier is not None and earlier[0] == labels._version:
            return earlier[1], True
        hint = history.fraction()
        self.seen[labels] = (labels._version, hint)
        return hint, False


def _history_allowed() -> bool:
    """No host-side state under torch.compile or while a CUDA graph is being captured."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


class LinearCrossEntropy(nn.Linear):
    """Drop-in LM head: ``nn.Linear(H, V)`` with the same state_dict (``weight``, ``bias``).

    ``head(hidden)`` returns ``F.linear(hidden, weight, bias)``, as the ``nn.Linear`` it
    replaces (the model's own forward applies what follows, e.g. Gemma-2's
    ``final_logit_softcapping``); ``head(hidden, labels)`` returns the cross-entropy of the
    logits (softcapped first when ``logit_softcap`` is set) without materializing them (see
    :func:`linear_cross_entropy`). Loss options are fixed when the module is built.

    ``adaptive_schedule`` (default on): without a bound (``max_valid_tokens``), each call passes
    the previous call's labelled fraction as ``labelled_fraction_hint``, so dense batches (SFT,
    text) get the BLAS schedule and mostly-ignored ones (multimodal pre-training) the kernels
    that skip unlabelled rows, without waiting for the current call's work: the count travels
    to the host by a non-blocking copy and is read one call later, after that copy's event
    (the host may stay a call ahead of the GPU, no further). Off under torch.compile and CUDA
    graph capture, where the op's own default applies.

    Example::

        head = LinearCrossEntropy.from_linear(model.lm_head, shift_labels=True)
        loss = head(hidden_states, input_labels)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss_weight: float = 0.0,
        logit_softcap: float | None = None,
        shift_labels: bool = False,
        max_valid_tokens: int | str | None = None,
        adaptive_schedule: bool = True,
        impl: str = "auto",
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        check_loss_options("LinearCrossEntropy", ignore_index, label_smoothing, z_loss_weight,
                           logit_softcap)
        max_valid_tokens = check_max_valid_tokens("LinearCrossEntropy", max_valid_tokens)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss_weight = z_loss_weight
        self.logit_softcap = logit_softcap
        self.shift_labels = shift_labels
        # The default for forward's max_valid_tokens: "count" lets a drop-in head (no CPU copy
        # of the labels in the loop) size its buffers and pick its schedule from the true
        # count, at one device sync per call.
        self.max_valid_tokens = max_valid_tokens
        if not isinstance(adaptive_schedule, bool):
            raise ValueError(f"adaptive_schedule must be a bool, got {adaptive_schedule!r}")
        self.adaptive_schedule = adaptive_schedule
        self._history = _CountHistory()
        self._hints = _CallHints()
        self.impl = impl

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, shift_labels: bool | None = None,
                    **options) -> LinearCrossEntropy:
        """A head sharing ``linear``'s parameters (no copy), e.g. a model's tied ``lm_head``.

        ``shift_labels`` must be given: True for Hugging Face-style labels (the same positions
        as ``input_ids``; the head scores position t against label t+1, as the model's own
        loss does), False for labels already aligned with ``hidden``. A module whose forward is
        not ``nn.Linear``'s (a LoRA adapter, PEFT's ``base_layer`` wrapper) is refused: the
        fused head would compute without it."""
        if not isinstance(shift_labels, bool):
            raise TypeError("LinearCrossEntropy.from_linear: pass shift_labels=True for Hugging "
                            "Face-style labels (aligned with input_ids; the next token is "
                            "scored, as the model's own loss does) or shift_labels=False for "
                            f"labels already aligned with hidden; got {shift_labels!r}")
        overridden = type(linear).forward is not nn.Linear.forward and \
            not isinstance(linear, LinearCrossEntropy)
        if not isinstance(linear, nn.Linear) or overridden or hasattr(linear, "base_layer"):
            raise TypeError(f"LinearCrossEntropy.from_linear: linear must be an nn.Linear "
                            f"computing F.linear(x, weight, bias), got {type(linear).__name__}"
                            f"{' (its forward is its own: an adapter?)' if overridden else ''}: "
                            "the fused head would drop what its forward adds; merge an adapter "
                            "into the weight first (peft: merge_and_unload) or keep this head")
        head = cls(linear.in_features, linear.out_features, bias=False, device="meta",
                   shift_labels=shift_labels, **options)
        head.weight = linear.weight
        head.bias = linear.bias
        return head

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None,
                return_stats: bool = False, max_valid_tokens: int | str | None = None):
        """Logits without ``labels``; the loss with them (``max_valid_tokens``: a host-side
        bound on the labelled tokens, or "count", see :func:`linear_cross_entropy`; None: the
        module's own, set at construction, which a call cannot switch off)."""
        if max_valid_tokens is None:
            max_valid_tokens = self.max_valid_tokens
        if labels is None:  # the nn.Linear it replaces (a softcap is the caller's, as in
            return F.linear(hidden, self.weight, self.bias)  # Gemma-2's forward)
        tracked = self.adaptive_schedule and _history_allowed()
        adaptive = tracked and max_valid_tokens is None
        hint, again = self._hints.hint(labels, self._history) if adaptive else (None, False)
        out = linear_cross_entropy(
            hidden, self.weight, labels, bias=self.bias, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing,
            z_loss_weight=self.z_loss_weight, logit_softcap=self.logit_softcap,
            shift_labels=self.shift_labels, return_stats=True,
            max_valid_tokens=max_valid_tokens,
            labelled_fraction_hint=hint, impl=self.impl,
        )
        if tracked and not again:  # bounded calls too: the next unbounded call reads the latest
            self._history.record(out.num_valid, labels.numel())
        return out if return_stats else out.loss

    def extra_repr(self) -> str:
        # The options that change the loss whenever set.
        options = {"label_smoothing": (self.label_smoothing, 0.0),
                   "z_loss_weight": (self.z_loss_weight, 0.0),
                   "logit_softcap": (self.logit_softcap, None),
                   "shift_labels": (self.shift_labels, False),
                   "max_valid_tokens": (self.max_valid_tokens, None),
                   "adaptive_schedule": (self.adaptive_schedule, True)}
        set_ = "".join(f", {name}={value!r}" for name, (value, default) in options.items()
                       if value != default)
        return (f"{super().extra_repr()}, ignore_index={self.ignore_index}, "
                f"reduction={self.reduction!r}{set_}, impl={self.impl!r}")
