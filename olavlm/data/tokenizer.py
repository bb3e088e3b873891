# Small local tokenizers with the chat templates' real special tokens (no download, ever).
"""Train a small BPE tokenizer on local text and wrap it as a transformers fast tokenizer.

Used by ``olavlm data synth`` (the built-in dataset ships its own tokenizer) and by the tests,
which need tokenizers whose special tokens are the real ones of Llama-3 and Phi-3 so that the
templates and the label masks are exercised exactly as with the released models.

Two styles mirror the two tokenizer families of the seed's LLMs:

- ``"byte_level"``: Llama-3 style. Llama-3's pre-tokenizer regex (it keeps ``"\\n\\n"`` in one
  piece, as Llama-3 does after ``<|end_header_id|>``) followed by GPT-2 byte-level BPE.
- ``"metaspace"``: SentencePiece style (Phi-3, Llama-2): words carry a ``"\\u2581"`` prefix, a
  text piece that starts a sequence gets one prepended (the source of the seed's Phi-3
  off-by-one corrections), and ``"\\n"`` is always a token of its own.

Both add a BOS token in front of every encoding (as Llama-3 and Phi-3 do) and report character
offsets, which the label masking relies on.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "LLAMA3_SPECIAL_TOKENS",
    "load_local_tokenizer",
    "LLAMA3_SPLIT_PATTERN",
    "PHI3_SPECIAL_TOKENS",
    "TOKENIZER_STYLES",
    "train_tokenizer",
]

TOKENIZER_STYLES = ("byte_level", "metaspace")

# Files one of which a saved tokenizer folder holds (fast, SentencePiece, BPE/WordPiece vocab).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                    "vocab.json", "vocab.txt", "spiece.model")


def load_local_tokenizer(path, what: str):
    """``AutoTokenizer.from_pretrained`` on a local folder, never a hub id. ``what`` names the
    option the path came from (``--tokenizer``, ``data.tokenizer``): a missing folder, one
    without tokenizer files, or one transformers cannot load raise ValueError or
    FileNotFoundError naming it (transformers' own message says neither the option nor the
    folder)."""
    from transformers import AutoTokenizer  # noqa: PLC0415 - the data extra

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: expected a local tokenizer folder, got {str(path)!r} "
                                f"({'not a directory' if folder.exists() else 'does not exist'})")
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise ValueError(f"{what}: {str(folder)!r} holds no tokenizer (none of "
                         f"{', '.join(_TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{what}: could not load the tokenizer in {str(folder)!r}: "
                         f"{first}") from exc

# Special tokens of the released tokenizers that the templates use (SPEC 1.3), plus <pad>, which
# the seed adds to Llama-3 (it has none).
LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eot_id|>", "<pad>",
)
PHI3_SPECIAL_TOKENS = ("<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>",
                       "<|end|>", "<pad>")

# Llama-3's pre-tokenizer split (tokenizer.json of Meta-Llama-3-8B-Instruct).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _bpe_core(style: str, texts: list[str], vocab_size: int, special: list[str], unk: str | None):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if style == "byte_level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()  # every byte encodable: no <unk> needed
    else:
        tok = Tokenizer(models.BPE(unk_token=unk))
        # "\n" stays a token of its own, as in Phi-3's SentencePiece (byte fallback <0x0A>).
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first"),
        ])
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
        alphabet = sorted({ch for text in texts for ch in text})
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def train_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int = 1024,
    style: str = "byte_level",
    special_tokens: Iterable[str] = LLAMA3_SPECIAL_TOKENS + PHI3_SPECIAL_TOKENS[3:7],
    bos_token: str = "<|begin_of_text|>",
    eos_token: str = "<|end_of_text|>",
    pad_token: str = "<pad>",
    unk_token: str | None = None,
    save_dir: str | Path | None = None,
):
    """A BPE tokenizer trained on ``texts``, as a ``transformers.PreTrainedTokenizerFast``.

    Equivalent to training a Llama-3-like (``style="byte_level"``) or SentencePiece-like
    (``"metaspace"``) BPE with the ``tokenizers`` library, adding a post-processor that puts
    ``bos_token`` in front of every encoding, and wrapping it; with ``save_dir`` it is also
    written with ``save_pretrained`` (reload with ``AutoTokenizer.from_pretrained(save_dir)``).
    The default special tokens cover both chat templates, so one tokenizer serves
    ``llava_llama_3``, ``llava_phi_3`` and ``plain``. Training is deterministic for the same
    texts in the same order.
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    if style not in TOKENIZER_STYLES:
        raise ValueError(f"style must be one of {TOKENIZER_STYLES}, got {style!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 64:
        raise ValueError(f"vocab_size must be an int >= 64, got {vocab_size!r}")
    special = list(dict.fromkeys(special_tokens))
    named = [t for t in (bos_token, eos_token, pad_token, unk_token) if t is not None]
    special += [t for t in named if t not in special]
    if style == "metaspace" and unk_token is None:
        raise ValueError("unk_token must be given for style='metaspace' (unseen characters map "
                         "to it), got None")
    texts = list(texts)
    if not texts:
        raise ValueError("texts must hold at least one string, got an empty iterable")
    # The trainer does not know the special tokens are atomic: cut them out first, or it learns
    # merges such as "|>" + "\n\n" that never occur once they are split off when encoding.
    cut = re.compile("|".join(re.escape(t) for t in sorted(special, key=len, reverse=True)))
    texts = [piece for text in texts for piece in cut.split(text) if piece]
    tok = _bpe_core(style, texts, vocab_size, special, unk_token)
    bos_id = tok.token_to_id(bos_token)
    template = processors.TemplateProcessing(
        single=f"{bos_token} $A", pair=f"{bos_token} $A $B:1", special_tokens=[(bos_token, bos_id)]
    )
    if style == "byte_level":
        # trim_offsets=False keeps a leading space inside its token's offsets, so the label
        # masking sees exactly which characters each token covers.
        tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False),
                                                  template])
    else:
        tok.post_processor = template
    extra = [t for t in special if t not in named]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
        unk_token=unk_token, additional_special_tokens=extra,
    )
    if save_dir is not None:
        fast.save_pretrained(str(save_dir))
    return fast
