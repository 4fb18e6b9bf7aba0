"""`flux-prep inspect` and `flux-prep verify`: what a cache holds, and whether it is intact."""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from shared.cache import CacheError, read_manifest, sha256_file
from shared.cache.schema import ARROW_SCHEMA, EMPTY_PROMPT_NAME, SCHEMA_VERSION, SHARD_SUFFIX


def _quantiles(series) -> str:
    if series.len() == 0:
        return "n/a"
    q = [series.quantile(p, interpolation="nearest") for p in (0.5, 0.9)]
    return f"min {series.min():g}  mean {series.mean():.1f}  p50 {q[0]:g}  p90 {q[1]:g}  max {series.max():g}"


def inspect_cache(cache_dir) -> str:
    import polars as pl   # here, not at the top: `verify` needs no polars (the GPU image lacks it)
    cache = Path(cache_dir)
    manifest = read_manifest(cache)
    shards = [cache / s["path"] for s in manifest["shards"]]
    rows = sum(s["rows"] for s in manifest["shards"])
    lines = [f"cache      {cache}",
             f"rows       {rows}",
             f"shards     {len(shards)}  ({sum(s['bytes'] for s in manifest['shards']) / 2**20:.1f} MiB)",
             f"t5         {manifest['t5']['mode']}, max length {manifest['t5']['max_length']}",
             f"dtypes     {', '.join(f'{k}={v}' for k, v in manifest['dtypes'].items())}"]
    if rows == 0:
        return "\n".join(lines + ["(no rows)"])
    # Bytes on disk per sample, by column, from the Parquet footers (no data read).
    col_bytes: dict[str, int] = {}
    for path in shards:
        meta = pq.ParquetFile(path).metadata
        for rg in range(meta.num_row_groups):
            group = meta.row_group(rg)
            for c in range(group.num_columns):
                col = group.column(c)
                col_bytes[col.path_in_schema] = col_bytes.get(col.path_in_schema, 0) + col.total_compressed_size
    lines.append("bytes/sample by column:")
    for name, total in sorted(col_bytes.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {name:<14} {total / rows:>12,.0f}")
    lines.append(f"  {'total':<14} {sum(col_bytes.values()) / rows:>12,.0f}")
    # Distributions, with polars over the small columns only.
    df = pl.scan_parquet([str(p) for p in shards]).select(
        pl.col("caption").str.len_chars().alias("caption_chars"),
        pl.col("caption").str.split(" ").list.len().alias("caption_words"),
        pl.col("t5_len").cast(pl.Int32), pl.col("latent_h"), pl.col("latent_w"),
    ).collect()
    lines.append(f"caption chars  {_quantiles(df['caption_chars'])}")
    lines.append(f"caption words  {_quantiles(df['caption_words'])}")
    lines.append(f"t5_len         {_quantiles(df['t5_len'])}")
    sizes = df.group_by("latent_h", "latent_w").len().sort("len", descending=True)
    lines.append("latent sizes   " + ", ".join(f"{h}x{w}: {n}" for h, w, n in sizes.iter_rows()))
    skipped = manifest.get("skipped", {})
    lines.append(f"skipped        {sum(skipped.values())}" + "".join(f"\n  {k:<22} {v}" for k, v in
                                                                   sorted(skipped.items())))
    return "\n".join(lines)


def verify_cache(cache_dir) -> list[str]:
    """Every problem found, each naming the shard; an empty list means the cache is intact."""
    cache = Path(cache_dir)
    try:
        manifest = read_manifest(cache)
    except CacheError as e:
        return [str(e)]
    problems = []
    listed = set()
    total = 0
    for entry in manifest["shards"]:
        path = cache / entry["path"]
        listed.add(path.name)
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        if path.stat().st_size != entry["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {entry['bytes']} (truncated or altered)")
            continue
        if sha256_file(path) != entry["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest (altered)")
            continue
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:
            problems.append(f"{path}: not readable as Parquet ({e})")
            continue
        if not pf.schema_arrow.remove_metadata().equals(ARROW_SCHEMA):
            problems.append(f"{path}: columns differ from schema version {SCHEMA_VERSION}")
        version = (pf.schema_arrow.metadata or {}).get(b"flux_prep_schema_version", b"?").decode()
        if version != str(SCHEMA_VERSION):
            problems.append(f"{path}: schema version {version}, expected {SCHEMA_VERSION}")
        if pf.metadata.num_rows != entry["rows"]:
            problems.append(f"{path}: {pf.metadata.num_rows} rows, manifest says {entry['rows']}")
        total += pf.metadata.num_rows
    if "rows" in manifest and total != manifest["rows"] and not problems:
        problems.append(f"{cache}: shards hold {total} rows, manifest says {manifest['rows']}")
    for path in sorted(cache.glob(f"*{SHARD_SUFFIX}")):
        if path.name not in listed:
            problems.append(f"{path}: shard not listed in the manifest")
    empty = cache / manifest.get("empty_prompt", EMPTY_PROMPT_NAME)
    if not empty.is_file():
        problems.append(f"{empty}: empty-prompt encodings missing")
    return problems
