"""`flux-prep lora merge|extract`: a LoRA adapter folded into its base, or made from a full fine-tune."""
from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="LoRA tools: merge an adapter into its base's weights; extract an adapter from a "
                       "full-weight fine-tune and its base (truncated SVD).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)

BASE_HELP = ("The base transformer: a model folder in diffusers' layout (its transformer/), a transformer folder, "
             "or one .safetensors file in Black Forest Labs' layout (FLUX.1 or FLUX.2).")


@app.command("merge")
def merge_command(
    base: Path = typer.Argument(..., help=BASE_HELP),
    adapter: Path = typer.Argument(..., help="The LoRA adapter: a LoRA run's final/ or checkpoints/step-N/, peft's "
                                             "or diffusers' adapter folder or file, or a kohya-named file "
                                             "(flux-prep export --format comfyui)."),
    out: Path = typer.Option(..., "--out", help="A folder (a folder base: the merged transformer folder, sampled by "
                                                "flux-sample --model BASE --transformer OUT, exported by flux-prep "
                                                "export) or a .safetensors file (a BFL-file base: the same layout)."),
    scale: float = typer.Option(1.0, "--scale", help="Multiplies the adapter's change (diffusers' lora_scale)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
):
    """Fold a LoRA adapter into its base's weights (peft's merge_and_unload, diffusers' fuse_lora), written in
    the base's layout and dtype; the adapter's flux_prep.json (how it is sampled) goes with it."""
    from .export import ExportError
    from .lora_merge import merge
    try:
        typer.echo(merge(base, adapter, out, scale, overwrite))
    except ExportError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)


@app.command("extract")
def extract_command(
    base: Path = typer.Argument(..., help=BASE_HELP),
    tuned: Path = typer.Argument(..., help="The full-weight fine-tune of BASE (a full run's final/, or as BASE)."),
    rank: int = typer.Option(..., "--rank", help="The adapter's rank R (alpha R); a layer narrower than R keeps "
                                                 "all of its change."),
    out: Path = typer.Option(..., "--out", help="The adapter folder to write (diffusers' layout: what a LoRA run's "
                                                "final/ holds; flux-sample --lora loads it)."),
    device: str = typer.Option("cpu", "--device", help="Where the SVDs run (cuda: much faster on a full-size "
                                                       "model)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
):
    """Extract a rank-R LoRA from a fine-tune: the truncated SVD of each of the family's default LoRA layers'
    change (TUNED - BASE); prints the relative error ||dW - BA|| / ||dW||, overall and the worst layer, and
    names changes the adapter cannot hold (norms, embedders, other layers)."""
    from .export import ExportError
    from .lora_extract import extract
    try:
        for line in extract(base, tuned, rank, out, overwrite, device):
            typer.echo(line)
    except ExportError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
