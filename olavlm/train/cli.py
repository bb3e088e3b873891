# `olavlm train` and `python -m olavlm.train` (also under torchrun).
"""``olavlm train [--recipe NAME] [--config FILE] [--resume auto|none|PATH] [key=value ...]``

With no arguments it runs the ``demo`` recipe (CPU, about a minute). Exit status: 0 done (or
stopped by SIGTERM/SIGINT after writing a checkpoint), 1 stopped by non-finite losses, bad data,
a checkpoint the run cannot end without (final or stop) failing, or another rank gone,
2 bad configuration (reported before any work starts), 130 a second Ctrl-C (no stop checkpoint).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

__all__ = ["add_train_arguments", "main", "run_train", "take_late_overrides"]


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default=None,
                   help="a recipe name (default: demo, or the config file's 'recipe')")
    p.add_argument("--config", default=None, help="a YAML or JSON config file")
    p.add_argument("--resume", default=None,
                   help="auto (the latest valid checkpoint), none, or a checkpoint path "
                        "(same as checkpoint.resume=...)")
    p.add_argument("--list-recipes", action="store_true", help="print the recipes and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. optim.lr=2e-5 train.max_steps=50")


def take_late_overrides(parser: argparse.ArgumentParser, args, extras: list[str]) -> None:
    """argparse's ``key=value ...`` positional takes only the overrides before the first option
    that follows them (``a=1 --resume auto b=2`` leaves ``b=2`` unrecognized): append the later
    ones, in order, and reject anything else as argparse would."""
    unknown = [e for e in extras if e.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = list(args.overrides) + list(extras)


def quiet_third_party() -> None:
    """Keep the console to the run's own log and progress bar: torch's pytree deprecation
    notices that importing torchao triggers (harmless), and transformers' progress bars for
    every model save/load (the log says what is loaded)."""
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


def run_train(args) -> int:
    from olavlm.config import resolve_config
    if args.list_recipes:
        from olavlm.recipes import recipe_table

        given = [*(["--recipe"] if args.recipe else []), *(["--config"] if args.config else []),
                 *(["--resume"] if args.resume else []), *args.overrides]
        if given:  # refused, not ignored: a listing does not show what overrides would change
            print(f"olavlm train: --list-recipes takes no other arguments (got "
                  f"{' '.join(given)})", file=sys.stderr)
            return 2
        print(recipe_table())
        return 0
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    try:
        cfg = resolve_config(args.recipe, args.config, overrides)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"olavlm train: {exc}", file=sys.stderr)
        return 2
    quiet_third_party()
    from olavlm.data.bad_data import BadSampleError

    from .checkpoint import CheckpointError
    from .trainer import NoDataError, NonFiniteLossError, Trainer, how_to_resume

    try:
        trainer = Trainer(cfg)
    except (ValueError, FileNotFoundError, CheckpointError) as exc:
        print(f"olavlm train: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # a peer gone while the ranks set up together (as below)
        if not (int(os.environ.get("WORLD_SIZE", "1")) > 1 and peer_failure(exc)):
            raise
        print(f"olavlm train: rank {os.environ.get('RANK', '?')}: another rank stopped while "
              "the ranks were starting (its error, if it printed one, is above; torchrun's "
              f"summary names a killed rank's exit code): {_first_line(exc)}", file=sys.stderr)
        return 1
    try:
        result = trainer.train()
    except (NonFiniteLossError, NoDataError, BadSampleError, CheckpointError) as exc:
        trainer.metrics.close()
        print(f"olavlm train: {_last_line(exc)}", file=sys.stderr)
        # The non-finite stop and a failed final checkpoint are agreed by all ranks; a
        # NoDataError or a bad sample under data.on_bad_sample=raise may be this rank's alone.
        trainer.close(barrier=isinstance(exc, (NonFiniteLossError, CheckpointError)))
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, without the stop checkpoint
        trainer.metrics.close()
        latest = trainer.checkpointer.latest()
        where = f"the last checkpoint is {latest}" if latest is not None else \
            "there is no checkpoint yet"
        print(f"olavlm train: stopped at once by a second Ctrl-C during step "
              f"{trainer.step + 1}; {where}: {how_to_resume(cfg, trainer.run_dir)} to resume "
              "from it",
              file=sys.stderr)
        trainer.close(barrier=False)
        return 130
    except RuntimeError as exc:
        if not (trainer.dist.distributed and peer_failure(exc)):
            raise
        # Another rank stopped on its own error (printed by that rank) while this one waited
        # in a collective: one line here, not a second traceback that hides the cause.
        trainer.metrics.close()
        print(f"olavlm train: rank {trainer.dist.rank}: another rank stopped (its error, if "
              "it printed one, is above; a rank killed by a signal -- out of memory, a lost "
              "node -- prints none: torchrun's summary names its exit code; the last "
              f"checkpoint is kept): {_first_line(exc)}", file=sys.stderr)
        trainer.close(barrier=False)
        return 1
    if result.summary:
        print(result.summary)
    if result.stopped:
        print(f"stopped by {result.stopped} at step {result.steps}; "
              f"{how_to_resume(cfg, trainer.run_dir)} to resume")
    trainer.close()
    return 0


# What gloo and NCCL report in a rank whose peer process exited during a collective.
_PEER_FAILURES = ("closed by peer", "reset by peer", "remote worker", "broken pipe",
                  "communicator was aborted", "nccl error", "connection refused")


def peer_failure(exc: BaseException) -> bool:
    """The collective failed because another rank's process went away."""
    text = str(exc).lower()
    return any(marker in text for marker in _PEER_FAILURES)


def _first_line(exc: BaseException) -> str:
    line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return line if len(line) <= 200 else line[:200] + "..."


def _last_line(exc: BaseException) -> str:
    """The error's own message: a DataLoader worker's re-raise prefixes it with the worker's
    traceback ("Caught BadSampleError in DataLoader worker process 0. Original Traceback...")."""
    text = str(exc).strip()
    if "Original Traceback" in text:  # its last line: "[module.]BadSampleError: message"
        text = text.splitlines()[-1].split(f"{type(exc).__name__}: ", 1)[-1]
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="olavlm train", description=__doc__.splitlines()[0])
    add_train_arguments(parser)
    args, extras = parser.parse_known_args(argv)
    take_late_overrides(parser, args, extras)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_train(args)
