"""Where encoded batches go: a CacheWriter per input shard being written, its done-record once its
last batch is written, and the run's counts. `write` runs in the writer threads (row_writer.py),
every batch of one input shard in the same thread, in order."""
from __future__ import annotations

import sys
import threading
import time

from shared.cache import CacheWriter
from shared.cache.alt_captions import alt_name
from shared.cache.references import latent_column
from shared.cache.store import Store

from .ledger import write_done
from .masks import latent_mask
from .sources import InputShard


class _ShardState:
    def __init__(self, writer: CacheWriter):
        self.writer, self.rows, self.skipped, self.skipped_examples = writer, 0, {}, {}
        self.captions = {"max": 1, "rows_with_several": 0, "total": 0}   # the rows' captions, counted


class ShardOutputs:
    def __init__(self, out_dir: Store, todo: list[InputShard], dtypes: dict, *, rows_per_shard: int, text,
                 text_mode: str, bar=None, rank: int = 0, references: int = 0):
        self.out_dir, self.dtypes, self.rows_per_shard = out_dir, dtypes, rows_per_shard
        self.references = references        # reference images per row
        self.text, self.text_mode = text, text_mode    # the family's TextSpec, padded or trimmed
        self.shards = {s.id: s for s in todo}
        self.bar, self.rank = bar, rank
        self.states: dict[str, _ShardState] = {}
        self.stats = {"rows": 0, "skipped": 0, "shards_done": 0, "decode_s": 0.0}
        self.t_start = time.perf_counter()
        self._lock = threading.Lock()       # over states, stats and the bar: several writer threads update them

    def _state(self, shard_id: str) -> _ShardState:
        if shard_id not in self.states:
            writer = CacheWriter(self.out_dir, shard_id, self.dtypes, text=self.text,
                                 rows_per_shard=self.rows_per_shard, row_group_rows=min(256, self.rows_per_shard),
                                 references=self.references)
            self.states[shard_id] = _ShardState(writer)
        return self.states[shard_id]

    def write(self, item: dict, host) -> None:
        """One batch (its device outputs copying into `host`, or None: only skips) of one input shard."""
        with self._lock:
            st = self._state(item["shard"])
            for reason, n in item["skips"].items():
                st.skipped[reason] = st.skipped.get(reason, 0) + n
                self.stats["skipped"] += n
            st.skipped_examples.update(item.get("skip_examples", {}))
        if host is not None:
            _write_rows(st.writer, item, host.wait(), self.text, self.text_mode)
            st.rows += len(item["keys"])
            _count_captions(st.captions, item.get("alt_captions") or [[]] * len(item["keys"]))
            with self._lock:
                self.stats["rows"] += len(item["keys"])
                if "first_batch_s" not in self.stats:   # model warm-up (compilation, cuDNN autotuning) ends here
                    self.stats["first_batch_s"] = time.perf_counter() - self.t_start
                    self.stats["first_batch_rows"] = self.stats["rows"]
        if item["end"]:
            self._finish_shard(item["shard"], st)
        if self.bar is not None:   # an EncodeBar (encode_bar.py)
            with self._lock:
                samples = len(item["keys"]) + sum(item["skips"].values())
                self.bar.advance(item["shard"], samples, item["end"], skipped=self.stats["skipped"],
                                 shards=f"{self.stats['shards_done']}/{len(self.shards)}")

    def _finish_shard(self, shard_id: str, st: _ShardState) -> None:
        shard = self.shards[shard_id]
        outputs = [s.to_dict() for s in st.writer.close()]
        record = {"outputs": outputs, "rows": st.rows, "skipped": st.skipped, "skipped_examples": st.skipped_examples}
        if st.captions["max"] > 1:   # recorded only where a row has several (a cache of one is as before)
            record["captions"] = st.captions
        write_done(self.out_dir, shard, record)
        if st.rows == 0:
            skips = ", ".join(f"{k} {v}" for k, v in sorted(st.skipped.items())) or "nothing in it"
            print(f"rank {self.rank}: warning: input shard {shard_id} ({shard.url}) yielded no row ({skips}); "
                  "it is read again once the file changes", file=sys.stderr, flush=True)
        with self._lock:
            del self.states[shard_id]
            self.stats["shards_done"] += 1

    def abort(self) -> None:
        """After an error: drop the open output shards' temp files (finished ones become orphans)."""
        for st in self.states.values():
            st.writer.abort()


def _write_rows(writer: CacheWriter, item: dict, out: dict, spec, mode: str) -> None:
    """One batch's rows; trimmed text keeps each caption's real tokens only."""
    lengths = out[spec.length].tolist()
    text = {c: out[c] for c in spec.tensor_columns}
    if mode == "trimmed":
        text[spec.states] = [out[spec.states][i, :n] for i, n in enumerate(lengths)]
    sizes = item["sizes"].tolist()
    # encode --masks: each latent cell's share of its pixels in the mask
    mask = latent_mask(item["masks"], *out["latent"].shape[-2:]) if "masks" in item else None
    refs = []
    for i, ref in enumerate(item.get("refs", ())):
        ref_sizes = ref["sizes"].tolist()
        refs.append({"latent": out[latent_column(i)], "width": [s[0] for s in ref_sizes],
                     "height": [s[1] for s in ref_sizes]})
    writer.add_batch(keys=item["keys"], captions=item["captions"], latent=out["latent"], widths=[s[0] for s in sizes],
                     heights=[s[1] for s in sizes], latent_logvar=out.get("latent_logvar"), copy=False, mask=mask,
                     refs=refs if writer.references else None, **text, **{spec.length: lengths},
                     **_alt_rows(item, spec, mode))   # `out`: this batch's own copy


def _alt_rows(item: dict, spec, mode: str) -> dict:
    """The rows' other captions and their text columns as CacheWriter.add_batch takes them (per-row
    lists); nothing where no row has one."""
    hosts = [h.wait() for h in item.get("alt_hosts") or []]
    if not hosts:
        return {}
    lengths = [int(x) for h in hosts for x in h[spec.length].tolist()]
    flat = {c: [t for h in hosts for t in h[c]] for c in spec.tensor_columns}
    if mode == "trimmed":
        flat[spec.states] = [t[:n] for t, n in zip(flat[spec.states], lengths)]
    flat[spec.length] = lengths
    rows, pos = {alt_name(c): [] for c in flat}, 0
    for captions in item["alt_captions"]:
        for c, values in flat.items():
            rows[alt_name(c)].append(values[pos:pos + len(captions)])
        pos += len(captions)
    return {"alt_captions": item["alt_captions"], **rows}


def _count_captions(counts: dict, alt_captions: list[list[str]]) -> None:
    for other in alt_captions:
        counts["max"] = max(counts["max"], 1 + len(other))
        counts["rows_with_several"] += bool(other)
        counts["total"] += 1 + len(other)
