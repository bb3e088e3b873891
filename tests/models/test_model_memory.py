# A model's memory is freed when its last reference goes (no reference cycle through the
# layer taps), and its copies tap into their own blocks.
from __future__ import annotations

import copy
import gc
import io
import weakref

import torch
from tiny_ola import tiny_batch, tiny_model

from olavlm.train.parallel import apply_activation_checkpointing


def _no_gc():
    enabled = gc.isenabled()
    gc.disable()
    return enabled


def test_deleting_a_model_frees_its_llm_weights_without_a_garbage_collection(tmp_path):
    """``del model`` (then ``torch.cuda.empty_cache()``) must give the LLM's memory back: the
    tapped blocks' reference to the layer taps, which held the decoder's parts, made a cycle
    that kept every weight of the LLM alive until Python's cyclic collector happened to run
    (a second model loaded in the same process, or an export after training, could OOM)."""
    gc.collect()
    enabled = _no_gc()
    try:
        model = tiny_model(tmp_path)
        model(*tiny_batch(model, batch=2)).loss.backward()
        assert model._taps.handles  # (the taps are installed on blocks)
        weights = {name: weakref.ref(p) for name, p in model.named_parameters()}
        del model
        alive = [name for name, ref in weights.items() if ref() is not None]
    finally:
        if enabled:
            gc.enable()
    assert not alive, f"{len(alive)} weights outlive the model, e.g. {alive[:3]}"


def test_copies_of_a_model_tap_their_own_blocks(tmp_path):
    """copy.deepcopy and pickling give a model whose taps sit on (and read) its own blocks; the
    checkpoint wrappers' re-install uses the copy's blocks too."""
    model = tiny_model(tmp_path)
    batch = tiny_batch(model, batch=2)
    want = model(*batch).loss
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(model), torch.load(buffer, weights_only=False)]
    for other in copies:
        assert other._taps.parts is other.parts
        for k in other._taps.layers:
            assert other.parts.layers[k - 1]._ola_taps is other._taps
        torch.testing.assert_close(other(*batch).loss, want, rtol=0, atol=0)
    wrapped = copies[0]
    apply_activation_checkpointing(wrapped, "full")
    for k in wrapped._taps.layers:
        assert wrapped.parts.layers[k - 1]._ola_taps is wrapped._taps
    torch.testing.assert_close(wrapped(*batch).loss, want, rtol=0, atol=0)
    # The original's hooks were not touched by the copy's re-install.
    hooked = [k for k in range(1, model.parts.num_layers + 1)
              if model.parts.layers[k - 1]._forward_hooks]
    assert hooked == model._taps.layers
