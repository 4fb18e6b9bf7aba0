"""`flux-prep inspect`: what a cache holds (`verify`, in verify.py, says whether it is intact)."""
from __future__ import annotations

import pyarrow as pa

from shared.cache import CacheError, read_manifest
from shared.cache.references import columns, reference_count
from shared.cache.store import Store, open_store
from shared.family import family_of_manifest

from .sources import named_skips
from .verify import listed_shard_problems



def _quantiles(series) -> str:
    if series.len() == 0:
        return "n/a"
    q = [series.quantile(p, interpolation="nearest") for p in (0.5, 0.9)]
    return f"min {series.min():g}  mean {series.mean():.1f}  p50 {q[0]:g}  p90 {q[1]:g}  max {series.max():g}"


def inspect_cache(cache_dir, storage_options: dict | None = None) -> str:
    """A summary of the cache (a folder or a URL). A missing or damaged cache raises CacheError with
    verify's messages (one per line), from the manifest and the shards' footers (no full read)."""
    store = open_store(cache_dir, storage_options)
    manifest = read_manifest(store)
    problems = listed_shard_problems(store, manifest, checksum=False)
    if problems:
        raise CacheError("\n".join(problems))
    shards = [s["path"] for s in manifest["shards"]]
    rows = sum(s["rows"] for s in manifest["shards"])
    family = family_of_manifest(manifest)
    text = family.text.settings(manifest)
    lines = [f"cache      {store.url}",
             f"family     {family.name}",
             f"rows       {rows}",
             f"shards     {len(shards)}  ({sum(s['bytes'] for s in manifest['shards']) / 2**20:.1f} MiB)",
             f"{family.text.states:<10} {text['mode']}, max length {text['max_length']}{_precision(manifest)}",
             f"dtypes     {', '.join(f'{k}={v}' for k, v in manifest['dtypes'].items())}",
             _captions(manifest, rows)]
    if reference_count(manifest):
        lines.append(f"references {reference_count(manifest)} a row (reference resolution: "
                     f"{manifest['image'].get('reference_resolution') or 'the family rule'})")
    if rows == 0:
        lines.append("(no rows)")
    else:
        lines += _bytes_per_sample(store, shards, rows) + _distributions(store, shards, family.text.length,
                                                                         reference_count(manifest))
    lines += _masks(store, shards, manifest)
    return "\n".join(lines + _skips(manifest))


def _precision(manifest: dict) -> str:
    """The text encoder's matmul precision, where not bf16 (encode --text-precision)."""
    from shared.text_float8 import recorded_precision
    precision = recorded_precision(manifest)
    return "" if precision == "bf16" else f", text encoder matmuls in {precision}"


def _masks(store: Store, shards: list[str], manifest: dict) -> list[str]:
    """Whether the rows have loss masks (encode --masks), and how many leave part of their image out."""
    if "mask" not in manifest["dtypes"]:
        return ["masks          none (encode --masks stores them)"]
    import numpy as np
    from shared.cache.schema import numpy_dtype
    dtype, partial, rows = numpy_dtype(manifest["dtypes"]["mask"]), 0, 0
    for name in shards:
        column = store.open_parquet(name, page_checksum_verification=True).read(columns=["mask"]).column("mask")
        for value in column.to_pylist():
            rows += 1
            partial += bool((np.frombuffer(value, dtype=dtype) < 1).any())
    return [f"masks          every row: {partial} of {rows} leave part of the image out, the others are full"]


def _captions(manifest: dict, rows: int) -> str:
    """Captions per row (the trainer picks one a step), with the prefix and variants encode put on them."""
    c = manifest.get("captions") or {}
    line = (f"captions   up to {c.get('max', 1)} a row ({c.get('rows_with_several', 0)} rows with several, "
            f"{c.get('total', rows)} in all)" if c.get("max", 1) > 1 else "captions   1 a row")
    if c.get("prefix"):
        line += f"; prefix {c['prefix']!r}"
    if c.get("variants"):
        line += f"; {c['variants']} tag-shuffled variants of each"
    return line


def _bytes_per_sample(store: Store, shards: list[str], rows: int) -> list[str]:
    """Bytes on disk per sample, by column, from the Parquet footers (no data read)."""
    col_bytes: dict[str, int] = {}
    for meta in store.map(lambda name: store.open_parquet(name).metadata, shards):
        for rg in range(meta.num_row_groups):
            group = meta.row_group(rg)
            for c in range(group.num_columns):
                col = group.column(c)
                name = col.path_in_schema.split(".")[0]   # a list column's `t5_alt.list.element`: t5_alt
                col_bytes[name] = col_bytes.get(name, 0) + col.total_compressed_size
    lines = ["bytes/sample by column:"]
    for name, total in sorted(col_bytes.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {name:<14} {total / rows:>12,.0f}")
    lines.append(f"  {'total':<14} {sum(col_bytes.values()) / rows:>12,.0f}")
    return lines


def _small_columns(store: Store, name: str, length: str, refs: int = 0) -> pa.Table:
    sizes = [columns(i)[side] for i in range(refs) for side in ("h", "w")]
    try:
        return store.open_parquet(name, page_checksum_verification=True).read(
            columns=["caption", length, "latent_h", "latent_w", *sizes])
    except Exception as e:  # pyarrow raises several types for damaged pages
        raise CacheError(f"{store.url_of(name)}: unreadable ({e}); flux-prep verify checks every shard") from None


def _distributions(store: Store, shards: list[str], length: str, refs: int = 0) -> list[str]:
    """Caption, text-length (`length`: the family's column), latent size and each reference's latent size
    distributions, from the small columns only (pages checked)."""
    import polars as pl   # here, not at the top: `verify` needs no polars (the GPU image lacks it)
    tables = store.map(lambda name: _small_columns(store, name, length, refs), shards)
    table = pa.concat_tables(tables)
    df = pl.from_arrow(table).select(
        pl.col("caption").str.len_chars().alias("caption_chars"),
        pl.col("caption").str.split(" ").list.len().alias("caption_words"),
        pl.col(length).cast(pl.Int32), pl.col("latent_h"), pl.col("latent_w"),
    )
    sizes = df.group_by("latent_h", "latent_w").len().sort("len", descending=True)
    return [f"caption chars  {_quantiles(df['caption_chars'])}",
            f"caption words  {_quantiles(df['caption_words'])}",
            f"{length:<15}{_quantiles(df[length])}",
            "latent sizes   " + ", ".join(f"{h}x{w}: {n}" for h, w, n in sizes.iter_rows())] \
        + [_reference_sizes(pl.from_arrow(table), i) for i in range(refs)]


def _reference_sizes(df, i: int) -> str:
    """Reference i's latent sizes and how many rows have each."""
    c = columns(i)
    sizes = df.group_by(c["h"], c["w"]).len().sort("len", descending=True)
    return f"ref{i} latent sizes " + ", ".join(f"{h}x{w}: {n}" for h, w, n in sizes.iter_rows())


def _skips(manifest: dict) -> list[str]:
    """Samples skipped by reason, and the input shards that yielded no row, at any row count."""
    skipped, examples = manifest.get("skipped", {}), manifest.get("skipped_examples", {})
    lines = [f"skipped        {sum(skipped.values())}"] + [f"  {k:<22} {v}{named_skips(v, examples.get(k, []))}"
                                                          for k, v in sorted(skipped.items())]
    empty = manifest.get("inputs_without_rows", [])
    if empty:
        lines.append(f"inputs without rows  {len(empty)}")
        for item in empty:
            why = ", ".join(f"{k} {v}" for k, v in sorted(item["skipped"].items())) or "no sample"
            lines.append(f"  {item['id']} ({item['url']}): {why}")
    return lines
