"""A byte flipped in a shard's data pages stops a reader at that row group, naming the shard and the
row group (Parquet page CRCs, written by CacheWriter, checked by CacheReader), with no full pass first."""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from train_caches import write_cache

from shared.cache import CacheError, CacheReader


def flip_in_data_pages(shard: Path, row_group: int, column: str = "latent") -> None:
    """Flip one bit in the middle of a column chunk's pages (past the page header)."""
    meta = pq.ParquetFile(shard).metadata.row_group(row_group)
    chunk = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema == column)
    offset = chunk.data_page_offset + chunk.total_compressed_size // 2
    data = bytearray(shard.read_bytes())
    data[offset] ^= 0x01
    shard.write_bytes(bytes(data))


def test_reader_names_the_shard_and_row_group_of_a_flipped_byte(tmp_path):
    cache = write_cache(tmp_path / "c", 16, rows_per_shard=8, row_group_rows=4)
    reader = CacheReader(cache)
    shard = reader.shards[1]
    flip_in_data_pages(cache / shard, row_group=1)
    assert len(list(reader.iter_shard(reader.shards[0]))) == 2      # the other shard reads
    groups = reader.iter_shard(shard)
    next(groups)                                                    # row group 0 is intact
    with pytest.raises(CacheError, match=rf"{shard}: row group 1 unreadable \(.*CRC"):
        next(groups)


def test_train_cli_stops_on_a_flipped_byte_naming_shard_and_row_group(tmp_path, capsys):
    from train.cli import main
    cache = write_cache(tmp_path / "c", 16, rows_per_shard=8, row_group_rows=4)
    shard = sorted(cache.glob("*.parquet"))[1]
    flip_in_data_pages(shard, row_group=1)
    with pytest.raises(SystemExit) as e:   # 4 steps of 4 read every row group once
        main(["--data.train_cache", str(cache), "--model.name", "tiny", "--run.max_steps", "4",
              "--data.batch_size", "4", "--run.output_dir", str(tmp_path / "run"), "--run.precision", "no",
              "--data.num_workers", "0", "--run.tensorboard", "false", "--run.progress", "false"])
    assert e.value.code == 2   # a cache that cannot be used (README: exit status)
    err = capsys.readouterr().err
    assert f"{shard.name}: row group 1 unreadable" in err and "CRC" in err
