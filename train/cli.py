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

    from .loop import train
    try:
        summary = train(cfg)
    except (CacheError, ModelLoadError, FileNotFoundError, ValueError) as e:
        # what was given cannot be used (a cache, a model, a setting): 2, as flux-prep and flux-sample
        print(f"error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(2)
    if summary.get("final"):
        print(f"wrote {summary['final']}")


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
