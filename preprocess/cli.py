"""The `flux-prep` command line: encode, inspect, verify, export, and the embedded-default builders."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import typer

app = typer.Typer(
    help="flux-prep: encode captioned images once (the model family's VAE and text encoders) into a Parquet cache that "
         "training streams, and build the tiny model and demo data of the embedded default.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    rich_markup_mode=None,   # plain help: typer's rich panels show flags as taking a <bool>
)


from preprocess.encode_cli import encode_command  # noqa: E402
from preprocess.export_cli import export_command  # noqa: E402
from preprocess.lora_cli import app as lora_app  # noqa: E402
from preprocess.plan_cli import plan_command  # noqa: E402

app.command("encode")(encode_command)
app.command("plan")(plan_command)
app.command("export")(export_command)
app.add_typer(lora_app, name="lora")


@app.command("tiny-model")
def tiny_model(
    out_dir: Path = typer.Argument(..., help="Folder to write (diffusers' FLUX layout)."),
    family: Literal["flux1", "flux1-kontext", "flux2-klein", "flux2-klein-distilled", "flux2-dev"] = typer.Option(
        "flux1", help="flux1: FluxPipeline (T5 + CLIP); flux1-kontext: FluxKontextPipeline (FLUX.1 with a guidance "
                      "embedding, sampled with a reference image); flux2-klein: Flux2KleinPipeline base (Qwen3, "
                      "sampled with CFG); flux2-klein-distilled: its step-distilled kind (is_distilled); flux2-dev: "
                      "Flux2Pipeline (Mistral 3, a guidance embedding)."),
    seed: int = typer.Option(0, help="Seed of the random weights; the same seed writes the same files."),
    guidance_embeds: bool = typer.Option(False, help="FLUX.1: give the transformer FLUX.1-dev's guidance embedding."),
    vae: Literal["pooling", "random"] = typer.Option(
        "pooling", help="'pooling': hand-set VAE that keeps each 8x8 block's colour, so samples decode to "
                        "pictures; 'random': random init."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing folder that is not empty "
                                                              "(all of it: none of its files is kept)."),
):
    """Write a tiny FLUX model folder: the real classes at toy sizes, loadable by the family's diffusers
    pipeline (FluxPipeline, FluxKontextPipeline, Flux2KleinPipeline, Flux2Pipeline), made offline."""
    from preprocess.export import replace_folder
    from shared.quiet import silence_progress_bars
    from shared.tiny import write_tiny_kontext, write_tiny_model
    from shared.tiny_flux2 import write_tiny_flux2_dev, write_tiny_flux2_klein
    if guidance_embeds and family != "flux1":
        raise typer.BadParameter(f"--guidance-embeds is FLUX.1's; {family} decides it itself")
    writers = {"flux1": lambda tmp: write_tiny_model(tmp, seed=seed, guidance_embeds=guidance_embeds, vae=vae),
               "flux1-kontext": lambda tmp: write_tiny_kontext(tmp, seed=seed, vae=vae),
               "flux2-klein": lambda tmp: write_tiny_flux2_klein(tmp, seed=seed, vae=vae),
               "flux2-klein-distilled": lambda tmp: write_tiny_flux2_klein(tmp, seed=seed, distilled=True, vae=vae),
               "flux2-dev": lambda tmp: write_tiny_flux2_dev(tmp, seed=seed, vae=vae)}
    if out_dir.exists() and not overwrite and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        # a trained model or anything else there would be lost (as export, only when asked)
        typer.echo(f"error: {out_dir}: exists and is not empty; pass --overwrite to replace it", err=True)
        raise typer.Exit(2)
    silence_progress_bars()   # a toy model writes in moments: its bars would only be noise
    replace_folder(out_dir, writers[family])
    typer.echo(f"wrote tiny {family} model to {out_dir}")


@app.command("demo-data")
def demo_data(
    out_dir: Path = typer.Argument(..., help="Folder for the webdataset tar shards."),
    num_samples: int = typer.Option(256, help="How many captioned images."),
    size: int = typer.Option(64, help="Image side in pixels."),
    samples_per_shard: int = typer.Option(128, help="Samples per tar shard."),
    seed: int = typer.Option(0, help="The same seed writes the same shards."),
):
    """Write demo images 'a {color} {shape} on a {background} background' as CC12M-style tar shards."""
    from preprocess.demo import write_demo_shards
    shards = write_demo_shards(out_dir, num_samples=num_samples, size=size,
                               samples_per_shard=samples_per_shard, seed=seed)
    typer.echo(f"wrote {num_samples} samples in {len(shards)} shards to {out_dir}")


CACHE_HELP = "Cache folder (shards + manifest.json), or its URL (s3://bucket/prefix, gs://..., az://...)."
STORAGE_HELP = "fsspec options for the cache's file system, as JSON (or from the environment: AWS_ENDPOINT_URL, ...)."


def _storage_options(text: str) -> dict:
    from shared.cache.store import parse_storage_options
    try:
        return parse_storage_options(text)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


@app.command("inspect")
def inspect(cache: str = typer.Argument(..., help=CACHE_HELP),
            storage_options: str = typer.Option("", help=STORAGE_HELP)):
    """Summarise a cache: family, rows, shards, bytes per sample by column, caption and text lengths, skips."""
    from preprocess.inspect_cache import inspect_cache
    from shared.cache import CacheError
    try:
        typer.echo(inspect_cache(cache, _storage_options(storage_options)))
    except CacheError as e:   # a missing or damaged cache: verify's messages, one a line
        for line in str(e).splitlines():
            typer.echo(f"FAIL {line}", err=True)
        raise typer.Exit(1)


@app.command("verify")
def verify(cache: str = typer.Argument(..., help=CACHE_HELP),
           storage_options: str = typer.Option("", help=STORAGE_HELP),
           repair: bool = typer.Option(False, "--repair", help="Un-mark the input shards whose output shards are "
                                       "damaged or missing (removing the manifest and those shards), then exit 1 "
                                       "with the encode command to rerun: it encodes them again.")):
    """Check schema, row counts, checksums and unique keys of every shard; exit 1 naming each bad shard."""
    from preprocess.verify import cache_warnings, verify_cache
    options = _storage_options(storage_options)
    if repair:
        _repair(cache, options)
    problems = verify_cache(cache, options)
    for p in problems:
        typer.echo(f"FAIL {p}", err=True)
    if problems:
        raise typer.Exit(1)
    for w in cache_warnings(cache, options):
        typer.echo(f"WARN {w}", err=True)
    typer.echo(f"{cache}: OK")


def _repair(cache: str, options: dict) -> None:
    """verify --repair: name each input shard un-marked and why, and the command that re-encodes them;
    exit 1 when one was (the cache is whole again only after that rerun), else go on verifying."""
    from preprocess.verify import repair_cache
    from shared.cache import CacheError
    try:
        result = repair_cache(cache, options)
    except CacheError as e:
        typer.echo(f"FAIL {e}", err=True)
        raise typer.Exit(1)
    for d in result["dropped"]:
        typer.echo(f"REPAIR input shard {d['id']} ({d['url']}): un-marked, its output shards removed: "
                   + "; ".join(d["problems"]), err=True)
    for name in result["unreadable"]:
        typer.echo(f"REPAIR {name}: unreadable done-record removed (its input shard is not done)", err=True)
    if result["dropped"] or result["unreadable"]:
        again = f": {result['command']}" if result["command"] else " (the command that wrote this cache)"
        typer.echo(f"{cache}: repaired the ledger; rerun the encode to encode those inputs again{again}", err=True)
        raise typer.Exit(1)


def main():
    app()


if __name__ == "__main__":
    main()
