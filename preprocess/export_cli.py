"""`flux-prep export`: a trainer's final/ for diffusers, ComfyUI and Forge."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def export_command(
    final: Path = typer.Argument(..., help="A trainer's final/ (or final/ema/): LoRA adapter or full weights."),
    format: str = typer.Option(..., "--format", help="comfyui or bfl: one .safetensors file in Black Forest Labs' "
                                                     "layout (a LoRA in kohya's names, what ComfyUI and Forge load; "
                                                     "LoKr and LoHa in LyCORIS's names; DoRA: diffusers only); "
                                                     "diffusers: a folder FluxPipeline loads."),
    output: Path = typer.Option(..., "--output", help="The file (comfyui, bfl) or folder (diffusers) to write."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16, or fp8 (float8 e4m3, full weights only); "
                                                              "default: as trained."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
):
    """Write a trained model in the layout diffusers, ComfyUI or Forge loads."""
    from preprocess.export import ExportError, export, read_final
    from shared.render_tools import other_tools_warning
    try:
        written = export(final, format, output, dtype, overwrite)
    except ExportError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(f"wrote {written}")
    warning = other_tools_warning(read_final(final).info)
    if warning:   # written all the same: the file is right, the tools it is for cannot prompt it
        typer.echo(f"{written}: {warning}", err=True)
