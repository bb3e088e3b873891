# The decoder-memory count: each lean step keeps less, by the bytes the modules' design says.
from __future__ import annotations


def test_each_variant_saves_what_its_design_says(load_bench, capsys):
    dsb = load_bench("decoder_saved_bytes")
    hidden, inter, tokens = 64, 160, 32
    block = dsb.build_block(hidden, inter, heads=8, kv_heads=2)
    counts = [dsb.saved_bytes_per_token(m, tokens, mask) for _, m, mask in dsb.variants(block)]
    eager, lean_mlp, lean_norm, no_mask = counts
    assert eager - lean_mlp == inter * 2  # silu(gate) in bf16, no longer kept
    # Three norms (two in the block, the final one): an fp32 copy each (4 B) -> the bf16
    # input (2 B).
    assert lean_mlp - lean_norm == 3 * hidden * (4 - 2)
    # K and V expanded from 2 to 8 heads (head dim 8) in bf16 with a mask; the mask itself.
    assert lean_norm - no_mask >= 2 * (8 - 2) * 8 * 2
    dsb.main(["--hidden", "64", "--intermediate", "160", "--heads", "8", "--kv-heads", "2",
              "--tokens", "32"])
    assert "no padding mask" in capsys.readouterr().out
