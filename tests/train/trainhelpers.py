# Shared by the launcher tests: the demo recipe's overrides for a small, quiet run.
from __future__ import annotations


def demo_overrides(tmp_path, synth_dir, *extra) -> list[str]:
    """A demo run under ``tmp_path/runs`` on 16 synthetic samples in ``synth_dir``, without
    progress bar or plot; ``extra`` overrides last."""
    return [f"train.output_dir={tmp_path / 'runs'}", f"data.synthetic_dir={synth_dir}",
            "data.synthetic_num=16", "logging.progress=false", "logging.plot=false", *extra]
