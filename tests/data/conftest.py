# Fixtures for the data tests: tiny local tokenizers with the real special tokens, small datasets.
from __future__ import annotations

from pathlib import Path

import pytest
from datahelpers import corpus

from olavlm.data.synthetic import write_synthetic_dataset
from olavlm.data.tokenizer import PHI3_SPECIAL_TOKENS, train_tokenizer


def _reload(tokenizer, path: Path):
    # Save and load back through AutoTokenizer: the path users take with a tokenizer folder.
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="session")
def llama_tokenizer(tmp_path_factory):
    """Llama-3-style byte-level BPE with Llama-3's chat special tokens and <pad>."""
    tok = train_tokenizer(corpus(), vocab_size=600)
    return _reload(tok, tmp_path_factory.mktemp("llama_tok"))


@pytest.fixture(scope="session")
def phi_tokenizer(tmp_path_factory):
    """Phi-3-style SentencePiece-like BPE with Phi-3's chat special tokens."""
    tok = train_tokenizer(corpus(), vocab_size=300, style="metaspace",
                          special_tokens=PHI3_SPECIAL_TOKENS, bos_token="<s>", eos_token="</s>",
                          unk_token="<unk>")
    return _reload(tok, tmp_path_factory.mktemp("phi_tok"))


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A small synthetic dataset (train 40, val 8, 64 px) with its own tokenizer."""
    out = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(out, 40, num_val=8, size=64, seed=3, text_only_fraction=0.15)
    return out
