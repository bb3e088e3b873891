# Conversation templates (llava_llama_3, llava_phi_3, plain), tokenization and label masking.
"""Conversation templates, tokenization and the label masks of SPEC sections 1.3 and 5.2.

A LLaVA conversation is a list of turns ``{"from": "human"|"gpt", "value": str}``. It becomes
one prompt string (``render``), which is tokenized the seed's way: split at ``"<image>"``, each
piece tokenized on its own, the pieces joined with ``IMAGE_TOKEN_INDEX`` (-200) and the BOS of
every piece after the first dropped (the seed's ``tokenizer_image_token``).

Labels (``IGNORE_INDEX`` = -100 everywhere except):
- every token of an assistant answer and of the separator that closes it (``<|eot_id|>``,
  ``<|end|>``, ``"\\n"`` for ``plain``);
- the last token of the assistant header (``"\\n\\n"`` after ``<|end_header_id|>``, ``"\\n"``
  after ``<|assistant|>``). This is the seed's net effect (SPEC 5.2: ``instruction_len =
  len(tok(instruction + sep)) - 2`` after a BOS at position 0) and is kept for fidelity.

The seed derives the mask from per-round token counts and masks the whole sample when the
count disagrees with the full tokenization. Here the mask comes from the character offsets of
the full tokenization: a token is labelled when it starts inside a supervised span, so a merge
across a span's edge is never ambiguous (at the start such a token also ends the header, whose
last token is labelled anyway; at the end it is the closing separator, e.g. Phi-3's
``<|end|>`` absorbing the next newline). On tokenizers without such merges (Llama-3's, the
test tokenizers) both give the same labels (tests/data/test_templates.py).
"""
from __future__ import annotations

import bisect
import dataclasses
import itertools
from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_PLACEHOLDER",
    "IMAGE_TOKEN_INDEX",
    "SEED_NUM_TOKENS_BEFORE_IMAGE",
    "TEMPLATES",
    "ConversationError",
    "Rendered",
    "Template",
    "TokenizedConversation",
    "check_template_tokens",
    "get_template",
    "num_tokens_before_image",
    "prepare_turns",
    "render",
    "tokenize_conversation",
]

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
IMAGE_PLACEHOLDER = "<image>"

# The seed's hard-coded NUM_SYS_TOKENS (SPEC 1.3) for the released tokenizers; with those,
# num_tokens_before_image() must return these values (the model checks it when it imports
# seed checkpoints). Tiny local tokenizers give other counts, which is why it is computed.
SEED_NUM_TOKENS_BEFORE_IMAGE = {"llava_llama_3": 38, "llava_phi_3": 13}

# "from" values: LLaVA uses human/gpt; user/assistant (ShareGPT-style files) mean the same.
_ROLE_INDEX = {"human": 0, "user": 0, "gpt": 1, "assistant": 1}


class ConversationError(ValueError):
    """A conversation that cannot be turned into a training sample; ``reason`` names why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Template:
    """A chat template: ``style="mpt"`` renders ``system + sep + sum(role + msg + sep)``;
    ``style="plain"`` renders ``"<image>" + answer + sep`` (LLaVA's pre-training format)."""

    name: str
    system: str
    roles: tuple[str, str]
    sep: str
    style: str
    special_tokens: tuple[str, ...] = ()


TEMPLATES: dict[str, Template] = {
    "llava_llama_3": Template(
        name="llava_llama_3",
        system=(
            "<|start_header_id|>system<|end_header_id|>\n\nA chat between a curious user and an "
            "artificial intelligence assistant. The assistant gives helpful, detailed, and polite "
            "answers to the user's questions."
        ),
        roles=("<|start_header_id|>user<|end_header_id|>\n\n",
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
        sep="<|eot_id|>",
        style="mpt",
        special_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    "llava_phi_3": Template(
        name="llava_phi_3",
        system="<|system|>\nYou are a helpful AI assistant.",
        roles=("\n<|user|>\n", "\n<|assistant|>\n"),
        sep="<|end|>",
        style="mpt",
        special_tokens=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    ),
    "plain": Template(name="plain", system="", roles=("", ""), sep="\n", style="plain"),
}


def get_template(template: str | Template) -> Template:
    """The Template named ``template`` (one of ``TEMPLATES``), or ``template`` itself."""
    if isinstance(template, Template):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {sorted(TEMPLATES)}, got {template!r}")
    return TEMPLATES[template]


@dataclasses.dataclass(frozen=True)
class Rendered:
    """A rendered prompt: ``supervised`` holds the [start, end) character spans whose tokens
    are labels (answer + closing sep); the token that ends at each of ``header_ends`` (the
    last token of an assistant header) is a label too (the seed's quirk, module docstring)."""

    text: str
    supervised: tuple[tuple[int, int], ...]
    header_ends: tuple[int, ...]


def prepare_turns(conversations: Sequence[Mapping], has_image: bool) -> list[tuple[int, str]]:
    """(role index, text) per turn: 0 = human, 1 = gpt, with ``"<image>"`` moved.

    Every ``"<image>"`` is removed from the text; with ``has_image`` the first human turn
    becomes ``("<image>\\n" + text).strip()`` (the seed's ``preprocess_multimodal``), even when
    the file forgot the placeholder, so an image is never loaded without being used. A leading
    gpt turn is dropped (as the seed does); roles must then alternate human, gpt, human, ...
    """
    if not isinstance(conversations, Sequence) or isinstance(conversations, str):
        raise ConversationError("no_conversations", "conversations must be a list of turns, "
                                f"got {type(conversations).__name__}")
    turns: list[tuple[int, str]] = []
    for j, turn in enumerate(conversations):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("value"), str):
            raise ConversationError("bad_entry", f"turn {j} must be a dict with a str 'value', "
                                    f"got {turn!r:.80}")
        frm = turn.get("from")
        role = _ROLE_INDEX.get(frm) if isinstance(frm, str) else None  # (a list: unhashable)
        if role is None:
            raise ConversationError("bad_entry", f"turn {j} 'from' must be one of "
                                    f"{sorted(_ROLE_INDEX)}, got {turn.get('from')!r}")
        text = turn["value"]
        try:  # JSON may escape a lone UTF-16 surrogate ("\ud83d"): no tokenizer takes it
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ConversationError("bad_entry", f"turn {j} 'value' is not valid Unicode: "
                                    f"{err.reason} at character {err.start}") from None
        if IMAGE_PLACEHOLDER in text:
            # Until none is left: one pass over "<im<image>age>" leaves a placeholder behind,
            # a second image token (or one in a text-only sample) that the splice refuses.
            while IMAGE_PLACEHOLDER in text:
                text = text.replace(IMAGE_PLACEHOLDER, "")
            text = text.strip()
        turns.append((role, text))
    if turns and turns[0][0] == 1:
        turns = turns[1:]
    if not turns:
        raise ConversationError("no_conversations", "conversations hold no human turn")
    for j, (role, _) in enumerate(turns):
        if role != j % 2:
            raise ConversationError("bad_entry", f"roles must alternate human, gpt, ...; turn "
                                    f"{j} is {'gpt' if role else 'human'}")
    if has_image:
        turns[0] = (0, (IMAGE_PLACEHOLDER + "\n" + turns[0][1]).strip())
    return turns


def check_template_tokens(tokenizer, template: str | Template) -> None:
    """ValueError unless each of the template's special tokens is one token of ``tokenizer``.

    Without them the chat markup is tokenized as plain text (a Phi-3 tokenizer with
    ``llava_llama_3``: ``"<|eot_id|>"`` in pieces) and the label masks still come out, wrong and
    silent, so a template that does not match the LLM's tokenizer is refused up front."""
    tpl = get_template(template)
    missing = [t for t in tpl.special_tokens
               if len(tokenizer(t, add_special_tokens=False)["input_ids"]) != 1]
    if missing:
        raise ValueError(f"template {tpl.name!r} needs the special tokens {missing} as single "
                         f"tokens, but {type(tokenizer).__name__} splits them: use the template "
                         f"of the tokenizer's LLM (one of {sorted(TEMPLATES)})")


def render(template: str | Template, turns: Sequence[tuple[int, str]], *,
           add_generation_prompt: bool = False) -> Rendered:
    """The prompt of ``turns`` (from ``prepare_turns``) and its supervised character spans.

    ``mpt``: ``system + sep + sum(role + msg + sep)``, as the seed's MPT separator style; with
    ``add_generation_prompt`` the assistant role is appended after a final human turn.
    ``plain``: exactly one human and one gpt turn; the human text is replaced by the image
    placeholder (if it had one) and the prompt is ``placeholder + answer + sep``.
    """
    tpl = get_template(template)
    if tpl.style == "plain":
        if len(turns) != 2:
            raise ConversationError("bad_entry", "template 'plain' needs exactly one human and "
                                    f"one gpt turn, got {len(turns)} turns")
        head = IMAGE_PLACEHOLDER if turns[0][1].startswith(IMAGE_PLACEHOLDER) else ""
        text = head + turns[1][1] + tpl.sep
        return Rendered(text, ((len(head), len(text)),), ())
    parts = [tpl.system, tpl.sep]
    size = len(tpl.system) + len(tpl.sep)
    spans, header_ends = [], []
    for role, msg in turns:
        parts.append(tpl.roles[role])
        size += len(tpl.roles[role])
        if not msg:
            continue  # an empty message renders the role only (a generation prompt)
        start = size
        parts += [msg, tpl.sep]
        size += len(msg) + len(tpl.sep)
        if role == 1:
            spans.append((start, size))
            header_ends.append(start)
    if add_generation_prompt and turns and turns[-1][0] == 0:
        parts.append(tpl.roles[1])
    return Rendered("".join(parts), tuple(spans), tuple(header_ends))


def _encode_pieces(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int] | None]]:
    """ids and character spans of ``text`` tokenized the seed's way around ``"<image>"``.

    The span is None for tokens that cover no text (the BOS added by the tokenizer)."""
    ids: list[int] = []
    spans: list[tuple[int, int] | None] = []
    drop_bos = 0
    start = 0
    for k, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        enc = tokenizer(chunk, return_offsets_mapping=True, return_special_tokens_mask=True)
        chunk_ids = list(enc["input_ids"])
        chunk_spans = [None if special else (a + start, b + start) for (a, b), special
                       in zip(enc["offset_mapping"], enc["special_tokens_mask"], strict=True)]
        if k == 0:
            drop_bos = int(bool(chunk_ids) and chunk_ids[0] == tokenizer.bos_token_id)
        else:
            ids.append(IMAGE_TOKEN_INDEX)
            spans.append(None)
            chunk_ids, chunk_spans = chunk_ids[drop_bos:], chunk_spans[drop_bos:]
        ids += chunk_ids
        spans += chunk_spans
        start += len(chunk) + len(IMAGE_PLACEHOLDER)
    return ids, spans


def _labels_from_spans(ids, spans, rendered: Rendered) -> list[int]:
    """A token is labelled when it *starts* inside a supervised span. Tokens may cross a span's
    edges: at its end, a separator that absorbs the following newline (Phi-3's ``<|end|>``
    declared with rstrip) is still the separator; at its start, a token that also covers the
    header's last character (Llama-3's ``"\n\n\n"`` before an answer opening with a newline,
    a SentencePiece ``"\nblue"``) is the header's last token, labelled below anyway.
    Binary searches over the ordered spans: linear in the tokens, not tokens x turns (a
    conversation of thousands of short turns took seconds of a loader worker)."""
    labels = [IGNORE_INDEX] * len(ids)
    merged: list[list[int]] = []  # the supervised spans, sorted and merged
    for a, e in sorted(rendered.supervised):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([a, e])
    sup_starts = [a for a, _ in merged]
    for i, (tok_id, span) in enumerate(zip(ids, spans, strict=True)):
        if span is None:
            continue
        j = bisect.bisect_right(sup_starts, span[0]) - 1
        if j >= 0 and span[0] < merged[j][1]:
            labels[i] = tok_id
    # Token offsets come in text order: the token covering a character is among the last few
    # that start at or before it (a full scan where offsets are out of order or none is).
    order = [i for i, sp in enumerate(spans) if sp]
    starts = [spans[i][0] for i in order]
    in_order = all(x <= y for x, y in itertools.pairwise(starts))
    for h in rendered.header_ends:
        # The last token that covers the character just before the answer.
        k = bisect.bisect_right(starts, h - 1) - 1 if in_order else -1
        last = next((order[m] for m in range(k, max(-1, k - 16), -1)
                     if spans[order[m]][0] <= h - 1 < spans[order[m]][1]), None)
        if last is None:
            last = max((i for i, sp in enumerate(spans) if sp and sp[0] <= h - 1 < sp[1]),
                       default=None)
        if last is None:
            raise ConversationError("tokenization_mismatch",
                                    f"no token covers the assistant header ending at {h}")
        labels[last] = ids[last]
    return labels


@dataclasses.dataclass
class TokenizedConversation:
    """``input_ids``/``labels``: (T,) int64; ``image_position``: index of IMAGE_TOKEN_INDEX or
    -1; ``truncated``: the sequence was cut to fit ``max_length``; ``num_tokens``: its length
    before that cut."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    image_position: int
    truncated: bool
    num_tokens: int


# A prompt longer than (max_length + 8) x this many characters is cut to that length before it
# is tokenized: no token spans that many characters, so the first max_length tokens are the
# same, and a 50 MB answer no longer costs its full tokenization (gigabytes of offsets).
MAX_CHARS_PER_TOKEN = 64


def _cut(rendered: Rendered, limit: int) -> Rendered:
    """The first ``limit`` characters of a rendered prompt, its spans clipped to them."""
    spans = tuple((a, min(b, limit)) for a, b in rendered.supervised if a < limit)
    return Rendered(rendered.text[:limit], spans,
                    tuple(h for h in rendered.header_ends if h <= limit))


def tokenize_conversation(
    conversations: Sequence[Mapping],
    tokenizer,
    template: str | Template = "llava_llama_3",
    *,
    has_image: bool,
    max_length: int | None = None,
    num_image_tokens: int = 0,
) -> TokenizedConversation:
    """Tokenize one LLaVA conversation and mask its labels (module docstring).

    ``tokenizer``: a fast (offset-reporting) transformers tokenizer that adds BOS itself.
    ``max_length`` bounds the sequence *after* splicing, where the single image placeholder
    becomes ``num_image_tokens`` positions (image patches + task tokens): text is cut from the
    right (``truncated=True``; a prompt of more than (max_length + 8) x MAX_CHARS_PER_TOKEN
    characters is cut to that before tokenizing, and ``num_tokens`` then counts the cut
    prompt's tokens); a cut that would remove the image placeholder raises
    ``ConversationError(reason="too_long")``. Other errors: ``no_conversations``,
    ``bad_entry``, ``tokenization_mismatch``.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("tokenizer must be a fast transformers tokenizer (it must report "
                        f"character offsets), got {type(tokenizer).__name__}")
    rendered = render(template, prepare_turns(conversations, has_image))
    cut = False
    if max_length is not None and len(rendered.text) > (max_length + 8) * MAX_CHARS_PER_TOKEN:
        rendered, cut = _cut(rendered, (max_length + 8) * MAX_CHARS_PER_TOKEN), True
    ids, spans = _encode_pieces(tokenizer, rendered.text)
    labels = _labels_from_spans(ids, spans, rendered)
    image_position = ids.index(IMAGE_TOKEN_INDEX) if IMAGE_TOKEN_INDEX in ids else -1
    num_tokens = len(ids)  # (of the cut prompt when it was cut: a lower bound then)
    truncated = cut
    if max_length is not None:
        budget = max_length - (num_image_tokens - 1 if image_position >= 0 else 0)
        if image_position >= budget or budget <= 0:
            raise ConversationError(
                "too_long", f"max_length={max_length} leaves no room for the image "
                f"({num_image_tokens} positions) after {max(image_position, 0)} prompt tokens")
        if len(ids) > budget:
            ids, labels, truncated = ids[:budget], labels[:budget], True
    return TokenizedConversation(
        input_ids=torch.tensor(ids, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
        image_position=image_position,
        truncated=truncated,
        num_tokens=num_tokens,
    )


def num_tokens_before_image(tokenizer, template: str | Template) -> int:
    """How many tokens precede the image (the seed's NUM_SYS_TOKENS), from the template and
    tokenizer: BOS + system + sep + user role for the chat templates, BOS for ``plain``."""
    turns = [{"from": "human", "value": "?"}, {"from": "gpt", "value": "."}]
    out = tokenize_conversation(turns, tokenizer, template, has_image=True)
    return out.image_position
