"""The trainer's command line: `--config FILE.yaml` plus `--section.key value` overrides (see --help)."""
from __future__ import annotations

import os
import re
import sys


def main(argv: list[str] | None = None) -> None:
    from .config import ConfigError, help_text, load_config, parse_overrides
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or "-h" in argv or "--help" in argv:
        print("usage: accelerate launch train --config CONFIG.yaml [--section.key value ...]\n")
        print(help_text())
        raise SystemExit(0 if argv else 2)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config_path = None
    try:
        pairs = parse_overrides(argv)
        rest = []
        for name, value in pairs:
            if name == "config":
                config_path = value
            else:
                rest.append((name, value))
        cfg = load_config(config_path, rest)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)

    from shared.cache import CacheError
    from shared.models import ModelLoadError

    from .checkpoint import CheckpointWriteError
    from .launch import TrainingInterrupted
    from .loop import train
    try:
        summary = train(cfg)
    except (CacheError, ModelLoadError, FileNotFoundError, ValueError) as e:
        # what was given cannot be used (a cache, a model, a setting): 2, as flux-prep and flux-sample
        print(f"error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(2)
    except CheckpointWriteError as e:   # a failure while running (a full disk): 1
        print(f"error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(1)
    except TrainingInterrupted as e:
        print(f"{e}\n{resume_hint(argv)}", file=sys.stderr)
        raise SystemExit(SIGINT_EXIT)
    except KeyboardInterrupt:   # Ctrl-C twice, or before the loop began
        print(f"{stopped_at_once(cfg.run.output_dir)}\n{resume_hint(argv)}", file=sys.stderr)
        raise SystemExit(SIGINT_EXIT)
    if summary.get("final"):
        print(f"wrote {summary['final']}")


SIGINT_EXIT = 130   # 128 + SIGINT, as a shell reports a process ended by Ctrl-C


def stopped_at_once(output_dir) -> str:
    from .checkpoint import checkpoint_dirs
    found = checkpoint_dirs(output_dir)
    latest = f"the latest checkpoint is {found[-1]}" if found else "there is no checkpoint (a rerun starts at step 0)"
    return f"interrupted: stopped at once, saving nothing; {latest}"


def resume_hint(argv: list[str]) -> str:
    """The command that resumes this run: its own arguments with --run.resume auto."""
    import shlex
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--run.resume", "--resume"):
            skip = True
        elif not arg.startswith(("--run.resume=", "--resume=")):
            kept.append(arg)
    return (f"resume with: python -m train {shlex.join(kept + ['--run.resume', 'auto'])}   (or the same arguments "
            "after accelerate launch train)")


def one_line(e: Exception) -> str:
    """An error as one line; a DataLoader worker's error carries its traceback: keep the final message."""
    text = str(e)
    if "Original Traceback" in text:
        found = re.findall(r"^\S*(?:Error|Exception): (.*)$", text, flags=re.M)
        if found:
            text = found[-1]
    return " ".join(text.split()) or type(e).__name__


if __name__ == "__main__":
    main()
