# Drop olakernels' linear cross-entropy into a Hugging Face causal LM's loss (no forward patched).
"""The next-token loss of a transformers causal LM without the (batch, seq, vocab) logits.

    python examples/hf_causal_lm_loss.py

Builds a tiny random Llama (no download), then computes the loss two ways:
  1. the library's own:  model(input_ids, attention_mask=..., labels=labels).loss
  2. ours: the decoder's hidden states from model.model, then the LM head as a
     LinearCrossEntropy module sharing lm_head's weight (a module swap, not a patched forward)
and checks they agree, gradients included.
"""
import os

import torch

if not torch.cuda.is_available():  # before triton is imported: Triton runs in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from olakernels import LinearCrossEntropy  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    input_ids = torch.randint(0, config.vocab_size, (2, 24))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 18:] = 0  # right padding on the second sequence
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :10] = -100  # e.g. image and prompt positions carry no label

    # 1. transformers' loss: full logits, shift inside the model.
    hf_loss = model(input_ids, attention_mask=attention_mask, labels=labels).loss
    hf_grad = torch.autograd.grad(hf_loss, model.lm_head.weight)[0]

    # 2. ours: swap the head module once (same parameters, same state_dict keys) ...
    model.lm_head = LinearCrossEntropy.from_linear(model.lm_head, shift_labels=True)
    # ... generation is unchanged: called without labels the head returns logits ...
    logits = model(input_ids, attention_mask=attention_mask).logits
    # ... and training calls the decoder, then the head with labels: no logits tensor exists.
    hidden = model.model(input_ids, attention_mask=attention_mask).last_hidden_state
    loss = model.lm_head(hidden, labels)
    grad = torch.autograd.grad(loss, model.lm_head.weight)[0]

    print(f"transformers loss {hf_loss.item():.6f}   olakernels loss {loss.item():.6f}")
    print(f"max |grad difference| {(grad - hf_grad).abs().max().item():.2e}")
    torch.testing.assert_close(loss, hf_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, hf_grad, rtol=1e-4, atol=1e-6)
    assert logits.shape == (2, 24, config.vocab_size)
    print("ok: same loss and gradients, logits still available for generation")


if __name__ == "__main__":
    main()
