"""`flux-prep encode`: the command line of stage 1's encoder (registered in cli.py)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal, Optional

import typer

from shared.devices import DEVICE_METAVAR
from shared.params import config_flags, config_option
from shared.precision import DTYPE_ALIASES

TextMode = Literal["padded", "trimmed"]
Dtype = Literal[tuple(DTYPE_ALIASES)]   # bf16, fp16, fp32 or the full names: --help lists them

# Decoding workers when --num-workers is not given: one per CPU this process may use, at most this
# many (more than the CPUs drew torch's over-subscription warning and ran no faster).
MAX_DEFAULT_WORKERS = 4
DEPRECATED_CHANNELS_LAST = ("warning: --channels-last is deprecated and does nothing (the VAE's NHWC input ran "
                            "slower); it will be removed")


def encode_command(
    ctx: typer.Context,
    config: Optional[Path] = config_option("encode"),
    model: str = typer.Option(..., help="FLUX model: a folder in diffusers' layout or a hub id."),
    input: Optional[str] = typer.Option(None, "--input", help="Tar shards (path, glob, brace pattern "
                                                              "x-{00000..00009}.tar, fsspec URL; several joined by "
                                                              "'::') or a folder of images (jpg, jpeg, png, webp, "
                                                              "bmp, tif, tiff, gif; sub-folders too), each captioned "
                                                              "by the file of its name ending .txt, else .caption, "
                                                              "else .json's caption field (several captions: one a "
                                                              "line, or a .json list; the trainer picks one a "
                                                              "step). Two images of one name "
                                                              "are skipped (same_stem). Required unless "
                                                              "--sample-prompts runs alone."),
    output: str = typer.Option(..., help="Cache folder (Parquet shards + manifest.json): a path, or a URL "
                                         "of any fsspec file system (s3://bucket/prefix, gs://..., az://...)."),
    storage_options: str = typer.Option("", help="fsspec options for --output's file system, as JSON "
                                                 "('{\"client_kwargs\": {\"endpoint_url\": \"http://...\"}}'); "
                                                 "credentials may come from the environment instead "
                                                 "(AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...). Never recorded."),
    resolution: int = typer.Option(256, help="Target side in pixels (short side resized to it, center crop)."),
    buckets: bool = typer.Option(False, help="Aspect-ratio buckets of about resolution^2 pixels instead of "
                                             "square crops."),
    min_size: str = typer.Option("auto", metavar="auto|PIXELS",
                                 help="Skip images whose short side is under this many pixels, counted as "
                                      "too_small (upscaling them would blur the target): auto, the default, is "
                                      "half of --resolution (32 at 64); 0 keeps every image; 256 = "
                                      "torchtitan's filter at 256px."),
    text_mode: Optional[TextMode] = typer.Option(
        None, "--text-mode", "--t5-mode",
        help="padded (the model's exact convention, all max_length positions; the default) or trimmed (real tokens "
             "only, FLUX.1's T5; FLUX.2 attends every position and takes padded only)."),
    text_max_length: int = typer.Option(
        0, "--text-max-length", "--t5-max-length",
        help="Text tokens: FLUX.1's T5 512 for dev, 256 for schnell; 0: the family's default (T5's "
             "model_max_length; 512 for FLUX.2)."),
    batch_size: int = typer.Option(64, help="Images per encoder batch."),
    num_workers: int = typer.Option(None, help="DataLoader worker processes decoding images (default: the "
                                               f"CPUs this process may use, at most {MAX_DEFAULT_WORKERS})."),
    store_logvar: bool = typer.Option(False, help="Also store the VAE posterior log-variance."),
    masks: bool = typer.Option(False, help="Also store each image's loss mask (the trainer's flow.masked_loss), at "
                                           "latent resolution: a tar's KEY.mask.png, a folder's masks/STEM.png, "
                                           "else the image's alpha channel, else the whole image; a mask of "
                                           "another size than its image skips it (mask_size_mismatch)."),
    dtype: Dtype = typer.Option("bf16", help="Storage dtype of the tensors."),
    compute_dtype: Optional[Dtype] = typer.Option(None, help="Encoder weights' dtype; default: --dtype on CUDA, "
                                                             "fp32 on CPU."),
    compile: bool = typer.Option(False, help="torch.compile the text and VAE encoders (GPU)."),
    t5_fp32_wo: bool = typer.Option(False, help="Keep T5's FF down-projections (wo) in fp32 as transformers "
                                                "loads them (bit-closer to diffusers' FluxPipeline, slower); "
                                                "default: all of T5 in the compute dtype."),
    channels_last: bool = typer.Option(False, help="Deprecated; does nothing (NHWC VAE input ran slower, "
                                                   "docs/BENCHMARKS.md)."),
    t5_impl: Optional[Literal["fused", "transformers"]] = typer.Option(
        None, help="FLUX.1: fused (the default): the project's T5 forward (fused projections, one SDPA call per "
                   "layer; same function, faster); transformers: the library's."),
    text_precision: Literal["bf16", "fp8"] = typer.Option(
        "bf16", help="The text encoder's large matmuls (FLUX.1's T5 but its FF output layer; FLUX.2's Qwen3 / "
                     "Mistral projections and MLPs): bf16, or fp8 (float8 e4m3, scaled per tensor: faster on "
                     "GPUs of compute capability 8.9+; the embeddings differ slightly from bf16's). Recorded in "
                     "the cache's settings; needs torchao."),
    jpeg_draft: bool = typer.Option(True, help="Let libjpeg decode large JPEGs at a reduced scale (faster)."),
    rows_per_shard: int = typer.Option(1000, help="Rows per output Parquet shard at most."),
    writer_threads: int = typer.Option(2, min=1, help="Threads writing output shards (each input shard's rows "
                                                      "by one thread); more help on slow or network storage."),
    device: str = typer.Option("auto", metavar=DEVICE_METAVAR, help="cuda means cuda:LOCAL_RANK with several "
                                                                    "processes; auto: cuda where there is one."),
    progress: bool = typer.Option(True, help="Show a progress bar (--no-progress: no bars at all, the "
                                             "libraries' weight-loading bars included)."),
    caption_prefix: str = typer.Option("", help="Put before every caption, joined by ', ' (a trigger word: "
                                                "'ohwx'); recorded in the cache's settings and manifest."),
    caption_variants: int = typer.Option(0, min=0, help="Tag-style captions ('a, b, c'): this many more captions "
                                                        "each, the tags shuffled (all after the prefix; without "
                                                        "one, all after the first), seeded by the sample's key; "
                                                        "each encoded once, as a row's other captions are (one "
                                                        "per non-empty line of a .txt, or a .json caption list)."),
    references: int = typer.Option(0, min=0, help="Reference images per sample (paired data for edit training): "
                                                  "a tar's KEY.ref.jpg or KEY.ref0.jpg, KEY.ref1.jpg, ...; a "
                                                  "folder's control/ or reference/ (control0/, control1/, ...) "
                                                  "beside the images, same file stem. A sample missing one is "
                                                  "skipped (missing_reference, bad_reference). 0: plain data."),
    reference_resolution: int = typer.Option(0, min=0, metavar="PIXELS",
                                             help="Cap each reference image at about PIXELS^2 pixels (aspect "
                                                  "kept, sides multiples of 16); 0: the family's rule (FLUX.1: "
                                                  "Kontext's preferred resolutions; FLUX.2: 2024^2 for one "
                                                  "reference, 1024^2 each for several)."),
    sample_prompts: Optional[Path] = typer.Option(None, help="Prompts the trainer renders samples of (one a "
                                                             "line; run.sample_every): encoded into the cache with "
                                                             "its text mode and length, after the images, or alone "
                                                             "on an existing cache when --input is left out."),
):
    """Encode captioned images once (the model family's VAE and text encoders: FLUX.1's T5 and CLIP, FLUX.2's
    Qwen3 or Mistral 3) into a Parquet cache; rerun to resume."""
    from .captions import CaptionOptions
    from .decode import PrepOptions
    from .encode import EncodeOptions
    from .encode_run import run_encode
    from .ledger import SettingsMismatch
    from .sources import InputError
    from shared.cache import CacheError
    from shared.cache.store import parse_storage_options
    from shared.models import ModelLoadError

    if channels_last:
        typer.echo(DEPRECATED_CHANNELS_LAST, err=True)
    min_size_px = min_size_option(min_size)
    if not progress:
        from shared.quiet import silence_progress_bars
        silence_progress_bars()
    try:
        options = parse_storage_options(storage_options)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if input is None:
        if sample_prompts is None:
            raise typer.BadParameter("--input is required (or --sample-prompts alone, on an existing cache)")
        _encode_sample_prompts(model, output, sample_prompts, text_mode, text_max_length, device, options)
        return
    if reference_resolution and not references:
        raise typer.BadParameter("--reference-resolution sizes reference images: give --references N too")
    prep = PrepOptions(resolution=resolution, buckets=buckets, min_size=min_size_px, jpeg_draft=jpeg_draft,
                       masks=masks, references=references, reference_resolution=reference_resolution or None)
    # FLUX.1's own text-encoder options, passed on where given (another family refuses them by name)
    text_options = {k: v for k, v in (("t5_impl", t5_impl), ("t5_fp32_wo", t5_fp32_wo)) if v}
    opts = EncodeOptions(text_mode=text_mode or "padded", text_max_length=text_max_length or None,
                         store_logvar=store_logvar, dtype=dtype, compute_dtype=compute_dtype or None, compile=compile,
                         text_options=text_options, text_precision=text_precision)
    command = recorded_command(sys.argv, config_flags(ctx))
    warn_repeat_folders(input, references)
    try:
        stats = run_encode(model, input, output, prep=prep, opts=opts, batch_size=batch_size,
                           num_workers=default_workers() if num_workers is None else num_workers,
                           rows_per_shard=rows_per_shard, device=device, writer_threads=writer_threads,
                           command=command, progress=progress, storage_options=options,
                           captions=CaptionOptions(prefix=caption_prefix, variants=caption_variants))
    except (SettingsMismatch, InputError, ModelLoadError, CacheError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    except OSError as e:   # a store that cannot be reached, a missing bucket, refused credentials
        typer.echo(f"error: {output}: {type(e).__name__}: {e}", err=True)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        typer.echo(interrupted_message(input, output, options, references), err=True)
        raise typer.Exit(130) from None
    _report(stats, output)
    if sample_prompts is not None and stats["rank"] == 0:
        _encode_sample_prompts(model, output, sample_prompts, None, None, device, options)


def _encode_sample_prompts(model: str, output: str, prompts_file: Path, text_mode, text_max_length, device,
                           options: dict) -> None:
    from .output_lock import OutputLock
    from .sample_prompts import encode_sample_prompts
    from shared.cache import CacheError
    from shared.cache.store import open_store
    from shared.models import ModelLoadError
    try:
        with OutputLock.acquire(open_store(output, options), "encode --sample-prompts"):   # it rewrites the manifest
            n = encode_sample_prompts(model, output, prompts_file, text_mode=text_mode,
                                      text_max_length=text_max_length or None, device=device,
                                      storage_options=options)
    except (CacheError, ModelLoadError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(f"sample prompts: {n} encoded into {output}")


def warn_repeat_folders(input_spec: str, references: int = 0) -> None:
    """Say that kohya's `10_name/` repeat counts are ignored, and that reference folders are read as images
    without --references (once: rank 0 of a launch)."""
    from .references import reference_folder_warning
    from .sources import repeat_folder_warning
    warnings = [repeat_folder_warning(input_spec), None if references else reference_folder_warning(input_spec)]
    for warning in warnings:
        if warning and os.environ.get("RANK", "0") == "0":
            typer.echo(f"warning: {warning}", err=True)


def min_size_option(text: str) -> int | None:
    """--min-size as PrepOptions takes it (None: auto); a bad value stops the command naming the option."""
    from .images import parse_min_size
    try:
        return parse_min_size(text)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def default_workers() -> int:
    """Decoding workers for the CPUs this process may use (one is left to the main process)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_DEFAULT_WORKERS, cpus))


def recorded_command(argv: list[str], file_flags: tuple[str, ...] | list[str] = ()) -> str:
    """The command line as the manifest records it: `--config FILE` written out as `file_flags`, the
    flags it gave (so the manifest holds the settings, not the name of a file that may change), and
    the storage options' values left out: they may hold credentials."""
    args = []
    rest = iter(argv[1:])
    for arg in rest:
        if arg == "--config":
            next(rest, None)
            args += file_flags
        elif arg.startswith("--config="):
            args += file_flags
        else:
            args.append(arg)
    out, hide = ["flux-prep"], False
    for arg in args:
        if hide:
            out.append("<not recorded>")
            hide = False
        elif arg.startswith("--storage-options="):
            out.append("--storage-options=<not recorded>")
        else:
            out.append(arg)
            hide = arg == "--storage-options"
    return " ".join(out)


def interrupted_message(input_spec: str, output: str, storage_options: dict, references: int = 0) -> str:
    """After Ctrl-C: what the cache keeps (its done input shards) and how to go on. The shards being
    encoded have no done-record, so a rerun encodes them again (ledger.py)."""
    from .ledger import kept_progress
    from .ranks import Ranks
    from .sources import resolve_inputs
    from shared.cache.store import open_store
    ranks = Ranks()
    who = f"rank {ranks.rank}/{ranks.world}: " if ranks.world > 1 else ""
    rerun = "rerun the same command to resume (a done input shard is never encoded again)"
    try:
        kept = kept_progress(open_store(output, storage_options), resolve_inputs(input_spec, references=references))
    except Exception as e:  # noqa: BLE001 - the summary must not hide the interrupt behind a traceback
        return f"{who}interrupted; {output} could not be read back ({type(e).__name__}: {e}); {rerun}"
    if kept["done"] == 0:
        return f"{who}interrupted before any input shard was done: nothing in {output} is kept; {rerun}"
    if kept["done"] == kept["total"]:
        return (f"{who}interrupted: all {kept['total']} input shards are done in {output} ({kept['rows']} rows in "
                f"{kept['outputs']} output shards); rerun the same command to write the manifest")
    return (f"{who}interrupted: kept {kept['done']} of {kept['total']} input shards done in {output} "
            f"({kept['rows']} rows in {kept['outputs']} output shards); the other {kept['total'] - kept['done']} "
            f"(those being encoded included) are not done; {rerun}")


def _report(stats: dict, output: str) -> None:
    """This rank's summary (rank 0: the cache's skips, named); exit 1 when the cache holds no row at all
    (naming the inputs that gave none)."""
    from .sources import named_skips
    rate = stats["rows"] / stats["seconds"] if stats["seconds"] > 0 else 0.0
    typer.echo(f"rank {stats['rank']}/{stats['world']}: {stats['rows']} rows, {stats['skipped']} skipped, "
               f"{stats['shards_done']} input shards encoded ({stats['shards_skipped_done']} were done, "
               f"{stats['shards_reencoded']} changed or damaged and encoded again), {rate:.1f} img/s")
    if stats["rank"] == 0:   # rank 0 writes it, once every rank is done
        typer.echo(f"rank 0/{stats['world']}: manifest written: {stats['manifest_url']} "
                   f"({stats['cache_rows']} rows)")
        skipped, examples = stats["cache_skipped"], stats["skipped_examples"]
        if skipped:
            typer.echo(f"rank 0/{stats['world']}: the cache's skipped samples, by reason:")
        for reason, n in sorted(skipped.items()):
            typer.echo(f"  {reason} {n}{named_skips(n, examples.get(reason, []))}")
    if stats["cache_rows"] == 0:
        named = "; ".join(f"{i['id']} ({i['url']}): {_skips(i['skipped'])}" for i in stats["inputs_without_rows"][:10])
        typer.echo(f"error: {output} holds no rows: no input shard yielded a sample ({named})", err=True)
        raise typer.Exit(1)


def _skips(skipped: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "no sample"
