"""The Parquet cache contract (docs/DESIGN.md, version 1): schema, writer, reader, manifest."""
from .files import atomic_write_json, sha256_file
from .manifest import CacheError, cache_manifest, check_text_mode, read_manifest, write_manifest
from .reader import CacheReader, decode_table
from .schema import EMPTY_PROMPT_NAME, MANIFEST_NAME, SCHEMA_VERSION
from .store import open_store
from .writer import CacheWriter, ShardInfo

__all__ = ["CacheError", "CacheReader", "CacheWriter", "ShardInfo", "SCHEMA_VERSION", "MANIFEST_NAME",
           "EMPTY_PROMPT_NAME", "atomic_write_json", "cache_manifest", "check_text_mode", "decode_table",
           "open_store", "read_manifest", "sha256_file", "write_manifest"]
