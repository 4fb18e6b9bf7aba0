"""`flux-prep encode`: the command line of stage 1's encoder (registered in cli.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import typer


def encode_command(
    model: str = typer.Option(..., help="FLUX model: a folder in diffusers' layout or a hub id."),
    input: str = typer.Option(..., "--input", help="Tar shards (path, glob, brace pattern x-{00000..00009}.tar, "
                                                  "fsspec URL; several joined by '::') or a folder of images "
                                                  "with .txt captions."),
    output: Path = typer.Option(..., help="Cache folder (Parquet shards + manifest.json)."),
    resolution: int = typer.Option(256, help="Target side in pixels (short side resized to it, center crop)."),
    buckets: bool = typer.Option(False, help="Aspect-ratio buckets of about resolution^2 pixels instead of "
                                             "square crops."),
    min_size: int = typer.Option(0, help="Skip images whose short side is smaller (256 = torchtitan's filter "
                                         "at 256px)."),
    t5_mode: str = typer.Option("padded", help="padded (FLUX-exact, all max_length rows) or trimmed (real "
                                               "tokens only)."),
    t5_max_length: int = typer.Option(0, help="T5 tokens (512 for FLUX.1-dev, 256 for schnell); 0: the "
                                              "tokenizer's model_max_length."),
    batch_size: int = typer.Option(64, help="Images per encoder batch."),
    num_workers: int = typer.Option(4, help="DataLoader worker processes decoding images."),
    store_logvar: bool = typer.Option(False, help="Also store the VAE posterior log-variance."),
    dtype: str = typer.Option("bf16", help="Storage dtype of the tensors: bf16, fp16 or fp32."),
    compute_dtype: str = typer.Option("", help="Encoder weights' dtype; default: --dtype on CUDA, fp32 on CPU."),
    compile: bool = typer.Option(False, help="torch.compile the T5 and VAE encoders (GPU)."),
    t5_fp32_wo: bool = typer.Option(False, help="Keep T5's FF down-projections (wo) in fp32 as transformers "
                                                "loads them (bit-closer to diffusers' FluxPipeline, slower); "
                                                "default: all of T5 in the compute dtype."),
    channels_last: bool = typer.Option(False, help="NHWC VAE input on CUDA (measured slower on an H100)."),
    t5_impl: str = typer.Option("fused", help="fused: the project's T5 forward (fused projections, one SDPA call "
                                             "per layer; same function, faster); transformers: the library's."),
    jpeg_draft: bool = typer.Option(True, help="Let libjpeg decode large JPEGs at a reduced scale (faster)."),
    rows_per_shard: int = typer.Option(1000, help="Rows per output Parquet shard at most."),
    writer_threads: int = typer.Option(2, min=1, help="Threads writing output shards (each input shard's rows "
                                                      "by one thread); more help on slow or network storage."),
    device: str = typer.Option("auto", help="auto, cuda, cuda:N or cpu (with several processes, cuda means "
                                            "cuda:LOCAL_RANK)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
):
    """Encode captioned images once (FLUX VAE, T5, CLIP) into a Parquet cache; rerun to resume."""
    from .decode import PrepOptions
    from .encode import EncodeOptions
    from .encode_run import run_encode
    from .progress import SettingsMismatch
    from .sources import InputError
    from shared.cache import CacheError
    from shared.models import ModelLoadError

    if t5_mode not in ("padded", "trimmed"):
        raise typer.BadParameter("--t5-mode must be padded or trimmed")
    prep = PrepOptions(resolution=resolution, buckets=buckets, min_size=min_size, jpeg_draft=jpeg_draft)
    opts = EncodeOptions(t5_mode=t5_mode, t5_max_length=t5_max_length or None, store_logvar=store_logvar,
                         dtype=dtype, compute_dtype=compute_dtype or None, compile=compile,
                         t5_fp32_wo=t5_fp32_wo, channels_last=channels_last, t5_impl=t5_impl)
    try:
        stats = run_encode(model, input, output, prep=prep, opts=opts, batch_size=batch_size,
                           num_workers=num_workers, rows_per_shard=rows_per_shard, device=device,
                           writer_threads=writer_threads,
                           command=" ".join(["flux-prep", *sys.argv[1:]]), progress=progress)
    except (SettingsMismatch, InputError, ModelLoadError, CacheError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    _report(stats, output)


def _report(stats: dict, output: Path) -> None:
    """This rank's summary; exit 1 when the cache holds no row at all (naming the inputs that gave none)."""
    rate = stats["rows"] / stats["seconds"] if stats["seconds"] > 0 else 0.0
    typer.echo(f"rank {stats['rank']}/{stats['world']}: {stats['rows']} rows, {stats['skipped']} skipped, "
               f"{stats['shards_done']} input shards encoded ({stats['shards_skipped_done']} were done, "
               f"{stats['shards_reencoded']} changed and encoded again), {rate:.1f} img/s")
    if stats["rank"] == 0:   # rank 0 writes it, once every rank is done
        typer.echo(f"rank 0/{stats['world']}: manifest written: {output / 'manifest.json'} "
                   f"({stats['cache_rows']} rows)")
    if stats["cache_rows"] == 0:
        named = "; ".join(f"{i['id']} ({i['url']}): {_skips(i['skipped'])}" for i in stats["inputs_without_rows"][:10])
        typer.echo(f"error: {output} holds no rows: no input shard yielded a sample ({named})", err=True)
        raise typer.Exit(1)


def _skips(skipped: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "no sample"
