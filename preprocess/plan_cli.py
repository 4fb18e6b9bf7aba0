"""`flux-prep plan`: encode's command line (every option of it is accepted, so a planned command runs
as it is with `encode`), answered with an estimate instead of a cache (plan.py)."""
from __future__ import annotations

import copy
import inspect
import json
import typing

import typer

from .encode_cli import warn_repeat_folders, encode_command, min_size_option

# Encode's options that change what the cache holds; the others (batch size, workers, device, ...) only
# how fast it is written, and a plan accepts and ignores them.
USED = ("model", "input", "resolution", "buckets", "min_size", "text_mode", "text_max_length", "store_logvar",
        "dtype", "rows_per_shard", "masks", "caption_prefix", "caption_variants", "references",
        "reference_resolution", "text_precision")


def plan_command(**options):
    """Estimate a cache before encoding it: rows, bytes per sample and in all for each text mode, the
    share of images below --min-size, and encode hours on the GPU kinds measured (no GPU work).
    Encode's other options (--output, --batch-size, --device, ...) are accepted, so that a planned command
    runs as it is with encode, and ignored."""
    from shared.models import ModelLoadError

    from .captions import CaptionOptions
    from .decode import PrepOptions
    from .plan import format_plan, plan
    from .sources import InputError
    o = {k: options[k] for k in USED}
    o["text_mode"] = o["text_mode"] or "padded"
    if not o["input"]:
        raise typer.BadParameter("--input is required: the shards to estimate")
    prep = PrepOptions(resolution=o["resolution"], buckets=o["buckets"], min_size=min_size_option(o["min_size"]),
                       masks=o["masks"], references=o["references"],
                       reference_resolution=o["reference_resolution"] or None)
    warn_repeat_folders(o["input"], o["references"])
    try:
        result = plan(o["model"], o["input"], prep, text_mode=o["text_mode"],
                      text_max_length=o["text_max_length"] or None,
                      dtype=o["dtype"], store_logvar=o["store_logvar"], rows_per_shard=o["rows_per_shard"],
                      sample=options["sample_shards"], text_precision=o["text_precision"],
                      captions=CaptionOptions(prefix=o["caption_prefix"], variants=o["caption_variants"]))
    except (InputError, ModelLoadError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(json.dumps(result, indent=2) if options["json"] else format_plan(result))


def _signature() -> inspect.Signature:
    """encode's parameters (--output optional), those the plan ignores hidden from its --help, then the
    plan's own."""
    hints = typing.get_type_hints(encode_command)
    params = []
    for p in inspect.signature(encode_command).parameters.values():
        if p.name == "output":
            p = p.replace(default=typer.Option("", help="Accepted as encode takes it; a plan writes nothing."))
        if p.name not in USED and isinstance(p.default, typer.models.OptionInfo) and p.name != "config":
            p = p.replace(default=copy.copy(p.default))
            p.default.hidden = True
        params.append(p.replace(annotation=hints[p.name]))
    kw = inspect.Parameter.KEYWORD_ONLY
    params += [inspect.Parameter("json", kw, annotation=bool, default=typer.Option(
                   False, "--json", help="Print the estimate as JSON (rows, bytes_per_sample, total_bytes, modes, ...).")),
               inspect.Parameter("sample_shards", kw, annotation=int, default=typer.Option(
                   3, min=1, help="Input shards read for the estimate (spread over the input)."))]
    return inspect.Signature(params)


plan_command.__signature__ = _signature()
plan_command.__annotations__ = {p.name: p.annotation for p in plan_command.__signature__.parameters.values()}
