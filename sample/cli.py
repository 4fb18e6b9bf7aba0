"""The `flux-sample` command line: prompts in, PNGs out."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, Optional

import typer

from shared.devices import DEVICE_METAVAR
from shared.params import config_option
from shared.precision import DTYPE_ALIASES

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                   rich_markup_mode=None)   # plain help: typer's rich panels show flags as taking a <bool>


@app.command()
def sample(
    config: Optional[Path] = config_option("sample"),
    model: str = typer.Option(..., "--model", help="FLUX folder (diffusers' layout) or hub id: VAE, text encoders, "
                                                   "tokenizers, and the transformer unless --transformer is given."),
    output_dir: Path = typer.Option(..., "--output", help="Folder for the PNGs (created)."),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", help="A prompt; repeat for several."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts-file", help="One prompt per line."),
    transformer: Optional[str] = typer.Option(None, help="A trainer's final/ or checkpoints/step-N/ folder, a "
                                                         "diffusers transformer folder, or one .safetensors file in "
                                                         "Black Forest Labs' layout."),
    lora: Optional[str] = typer.Option(None, help="A LoRA adapter: a LoRA run's final/ or checkpoints/step-N/, "
                                                  "diffusers' or peft's adapter folder or file."),
    image: Optional[list[Path]] = typer.Option(None, "--image", help="A reference image for an edit model (FLUX.1 "
                                               "Kontext: one; FLUX.2: repeat for several), VAE-encoded and placed "
                                               "beside the image being made."),
    reference_size: Optional[str] = typer.Option(None, "--reference-size", help="WIDTHxHEIGHT every --image is "
                                                 "resized to (default: as encode --references prepares them: "
                                                 "Kontext's preferred resolutions; FLUX.2 about 2024^2 pixels for "
                                                 "one, 1024^2 each for several)."),
    reference_resolution: Optional[int] = typer.Option(None, "--reference-resolution", min=1, metavar="PIXELS",
                                                       help="Cap every --image at about PIXELS^2 pixels (aspect "
                                                            "kept, sides multiples of 16), as encode "
                                                            "--reference-resolution: give the value the LoRA's "
                                                            "cache was encoded with."),
    seed: Optional[list[int]] = typer.Option(None, help="Seed; repeat for several images per prompt."),
    num_seeds: Optional[int] = typer.Option(None, help="Seeds 0..N-1 (instead of --seed)."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps (default: the model's)."),
    width: Optional[int] = typer.Option(None, help="Pixels, a multiple of 16 (default: the model's resolution)."),
    height: Optional[int] = typer.Option(None, help="Pixels, a multiple of 16 (default: the model's resolution)."),
    guidance: Optional[float] = typer.Option(None, help="Guidance embedding value (guidance-distilled models; "
                                                        "default: the family's, 3.5; Kontext 2.5)."),
    cfg_scale: Optional[float] = typer.Option(None, help="True classifier-free guidance against the empty prompt; "
                                                         "1 = off (default: on for models trained with guidance "
                                                         "dropout)."),
    batch_size: int = typer.Option(1, help="Images per forward pass."),
    grid: bool = typer.Option(False, help="Also write grid.png (rows: prompts, columns: seeds)."),
    device: str = typer.Option("auto", metavar=DEVICE_METAVAR, help="auto: cuda where there is one."),
    dtype: Literal[("auto", *DTYPE_ALIASES)] = typer.Option("auto", help="auto: bfloat16 on a GPU, float32 on the "
                                                                         "CPU."),
    text_mode: Optional[Literal["padded", "trimmed"]] = typer.Option(
        None, "--text-mode", "--t5-mode", help="Default: the model's saved convention (FLUX.2: padded only)."),
    text_max_length: Optional[int] = typer.Option(None, "--text-max-length", "--t5-max-length",
                                                  help="Text tokens (default: the model's, else 512)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile each transformer block (GPU)."),
    attention_backend: str = typer.Option("default", help="diffusers attention backend: native, _native_flash, "
                                                          "_native_cudnn, flash, _flash_3, ..."),
    cudnn_sdpa: bool = typer.Option(True, help="Allow cuDNN's SDPA kernel (--no-cudnn-sdpa turns it off)."),
    fuse_qkv: bool = typer.Option(False, "--fuse-qkv", help="Fuse each attention's q/k/v into one matmul."),
    precision: Literal["bf16", "fp8"] = typer.Option(
        "bf16", help="fp8: the transformer's token-wise linear layers (blocks' projections and MLPs) computed in "
                     "float8 (weights e4m3 with one scale each, inputs scaled per call; torchao, pip install -e "
                     "'.[fp8]'), the modulation layers stored in float8; the first and last layers stay in --dtype. "
                     "Meant for H100-class GPUs (compute capability 8.9+; refused on older ones; a CPU runs it "
                     "slowly). A --lora is merged first. Images close to bf16's, not identical. bf16: --dtype "
                     "throughout."),
    progress: bool = typer.Option(True, help="Progress bars (--no-progress: none, the libraries' "
                                             "weight-loading bars included)."),
    check_base: bool = typer.Option(True, help="Warn when the LoRA's flux_prep.json names another base (source "
                                               "and transformer hash) than the transformer it is applied to "
                                               "(--no-check-base: no check)."),
):
    """Make images from prompts with a FLUX transformer (trained or published); one PNG per prompt and seed,
    settings recorded in the PNG's text chunks."""
    from shared.models import ModelLoadError

    from .resolve import SampleError
    from .run import SampleOptions, run

    if not progress:
        from shared.quiet import silence_progress_bars
        silence_progress_bars()
    try:
        if seed and num_seeds is not None:
            raise SampleError("give --seed or --num-seeds, not both")
        if num_seeds is not None and num_seeds < 1:
            raise SampleError(f"--num-seeds must be at least 1, got {num_seeds}")
        seeds = list(seed) if seed else list(range(num_seeds or 1))
        opts = SampleOptions(
            model=model, output=output_dir, prompts=prompt, prompts_file=prompts_file, transformer=transformer,
            lora=lora, seeds=seeds, steps=steps, width=width, height=height, guidance=guidance,
            cfg_scale=cfg_scale, batch_size=batch_size, grid=grid, device=device, dtype=dtype, text_mode=text_mode,
            text_max_length=text_max_length, compile=compile, attention_backend=attention_backend,
            cudnn_sdpa=cudnn_sdpa, fuse_qkv=fuse_qkv, precision=precision, progress=progress, check_base=check_base,
            images=list(image or []), reference_size=reference_size,
            reference_resolution=reference_resolution)
        written = run(opts)
    except (SampleError, ModelLoadError) as e:
        typer.echo(f"flux-sample: error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(f"wrote {len(written)} image(s) to {output_dir}")


def main() -> None:
    app(args=sys.argv[1:], prog_name="flux-sample")


if __name__ == "__main__":
    main()
