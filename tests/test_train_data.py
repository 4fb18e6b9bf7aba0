"""The cache stream: every sample once per epoch across ranks and workers, buckets, exact resume, bad caches."""
import dataclasses
import itertools

import pytest
import torch
from train_caches import set_manifest, write_cache

from shared.cache import CacheError
from shared.text_batch import TEXT_PAD_MULTIPLE
from train.batch import Sample, TrainBatch, collate
from train.data import CacheStream, StreamPosition, train_loader, validation_batches


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("c") / "cache", 45, sizes=((8, 8), (8, 12)), rows_per_shard=10,
                       row_group_rows=3)


def all_keys(cache_dir):
    return {f"train-{i:05d}" for i in range(45)}


def distinct_keys(items) -> list[str]:
    return list(dict.fromkeys(it.sample.key for it in items))


def test_epoch_covers_each_sample_once_across_ranks_and_workers(cache):
    seen, per_slot = [], []
    for rank in range(2):
        stream = CacheStream(cache, batch_size=4, seed=3, rank=rank, world_size=2, shuffle_buffer=5)
        for slot in (rank * 2, rank * 2 + 1):   # two workers per rank
            keys = []
            for _, items in stream.epoch_batches(0, slot, 4):
                sizes = {it.sample.latent.shape for it in items}
                assert len(sizes) == 1, "a batch mixes latent sizes"
                assert len(items) == 4   # a size's last batch is filled with its own samples again
                keys += distinct_keys(items)
            per_slot.append(set(keys))
            seen += keys
    assert sorted(seen) == sorted(all_keys(cache))
    assert all(a.isdisjoint(b) for a, b in itertools.combinations(per_slot, 2))


def test_epochs_are_shuffled_differently_and_reproducibly(cache):
    stream = CacheStream(cache, batch_size=4, seed=3, shuffle_buffer=5)
    order = [[k for _, b in stream.epoch_batches(e, 0, 1) for k in distinct_keys(b)] for e in (0, 1, 0)]
    assert order[0] == order[2]
    assert order[0] != order[1] and sorted(order[0]) == sorted(order[1])


def take(loader_iter, n, position, log):
    for _ in range(n):
        batch = next(loader_iter)
        position.consumed(batch)
        log.append((tuple(batch.pos.tolist()), batch.key))


def test_resume_continues_exactly_with_workers(cache):
    def run(position=None):
        stream = CacheStream(cache, batch_size=4, seed=1, shuffle_buffer=6, position=position)
        return iter(train_loader(stream, num_workers=2, pin_memory=False))

    full_pos, full = StreamPosition(2, 1), []
    take(run(), 20, full_pos, full)

    pos, first = StreamPosition(2, 1), []
    take(run(), 7, pos, first)
    state = pos.state_dict()
    resumed_pos, second = StreamPosition(2, 1), []
    resumed_pos.load_state_dict(state)
    take(run(resumed_pos.state_dict()), 13, resumed_pos, second)
    assert first + second == full
    epoch0 = [k for (_, e, _), keys in first + second if e == 0 for k in dict.fromkeys(keys)]
    assert len(epoch0) == len(set(epoch0))     # no sample in two batches of the epoch


def test_trimmed_batches_pad_text_and_mask_it():
    items = [Sample(key=str(n), latent=torch.zeros(16, 4, 4), text=torch.ones(n, 8), pooled=torch.zeros(8), text_len=n)
             for n in (2, 5)]
    batch = collate(items, "trimmed")
    width = TEXT_PAD_MULTIPLE   # the longest caption (5) rounded up
    assert batch.text.shape == (2, width, 8)
    assert batch.text_mask.tolist() == [[True] * 2 + [False] * (width - 2), [True] * 5 + [False] * (width - 5)]
    assert batch.text[0, 2:].abs().sum() == 0 and batch.text[1, 5:].abs().sum() == 0
    assert batch.text[1, :5].eq(1).all()
    longer = collate([dataclasses.replace(items[0], text=torch.ones(width + 1, 8), text_len=width + 1)], "trimmed")
    assert longer.text.shape[1] == 2 * width


def test_worker_batches_are_built_in_shared_memory_with_the_same_values(cache, monkeypatch):
    import train.batch as batch_module
    # A DataLoader worker hands its batches over through shared memory: collate builds them there.
    items = [it.sample for _, b in itertools.islice(CacheStream(cache, batch_size=4).epoch_batches(0, 0, 1), 2)
             for it in b]
    here = collate(items[:4], "trimmed")
    monkeypatch.setattr(batch_module, "get_worker_info", lambda: object())
    in_worker = collate(items[:4], "trimmed")
    assert in_worker.text.is_shared() and in_worker.latent.is_shared() and not here.text.is_shared()
    assert here.tensors().keys() == in_worker.tensors().keys()
    assert all(torch.equal(t, in_worker.tensors()[k]) for k, t in here.tensors().items())
    assert in_worker.text[~in_worker.text_mask].abs().sum() == 0   # the padding is zero, not stale memory
    monkeypatch.undo()
    # And through a real worker the trainer gets the very batches the main process would build.
    def first(num_workers, n=8):
        stream = CacheStream(cache, batch_size=4, seed=2, shuffle_buffer=5)
        return list(itertools.islice(train_loader(stream, num_workers=num_workers, pin_memory=False), n))
    for a, b in zip(first(0), first(1), strict=True):
        assert type(a) is type(b) is TrainBatch   # pickled across the worker boundary whole
        assert a.key == b.key and a.tensors().keys() == b.tensors().keys()
        assert all(torch.equal(t, b.tensors()[k]) for k, t in a.tensors().items())


def first_loader_batch(cache, num_workers, pin_memory=False):
    stream = CacheStream(cache, batch_size=4, seed=2, shuffle_buffer=5)
    return next(iter(train_loader(stream, num_workers=num_workers, pin_memory=pin_memory)))


def test_loader_yields_train_batches_and_to_leaves_the_position_on_the_host(cache):
    """From the main process and through a worker (pickled across the process boundary), the loader
    yields TrainBatch whole; `to` moves every tensor but `pos`, which the host reads."""
    for num_workers in (0, 1):
        batch = first_loader_batch(cache, num_workers)
        assert type(batch) is TrainBatch and batch.pos.tolist() == [0, 0, 0] and len(batch.key) == 4
        assert callable(batch.pin_memory)   # what the DataLoader's pin-memory thread calls
    moved = batch.to("meta")   # a device that the CPU has: the copies are real
    assert type(moved) is TrainBatch and moved.key == batch.key and moved.pos is batch.pos
    fields = {"latent", "text", "pooled", "text_len", "text_mask", "pos"}
    assert moved.tensors().keys() == batch.tensors().keys() == fields
    assert all(t.device.type == "meta" for k, t in moved.tensors().items() if k != "pos")
    assert batch.latent.device.type == "cpu"   # a copy: the host batch is unchanged


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning host memory needs CUDA")
def test_pin_memory_pins_every_tensor_of_the_batch(cache):
    plain = first_loader_batch(cache, 1)
    pinned = first_loader_batch(cache, 1, pin_memory=True)   # through the DataLoader's pin-memory thread
    assert type(pinned) is TrainBatch and pinned.key == plain.key
    assert pinned.tensors().keys() == plain.tensors().keys()
    assert all(t.is_pinned() and torch.equal(t, plain.tensors()[k]) for k, t in pinned.tensors().items())
    assert not plain.latent.is_pinned()


def test_corrupt_shard_error_names_it(tmp_path):
    cache = write_cache(tmp_path / "c", 20, rows_per_shard=10)
    shard = sorted(cache.glob("*.parquet"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    stream = CacheStream(cache, batch_size=4)
    with pytest.raises(CacheError, match=shard.name):
        stream.row_groups()


def test_other_schema_version_or_t5_mode_refused(tmp_path):
    cache = write_cache(tmp_path / "c", 8, t5_mode="padded")
    with pytest.raises(CacheError, match="T5 mode 'padded'"):
        CacheStream(cache, batch_size=4, expected_text_mode="trimmed")
    set_manifest(cache, schema_version=99)
    with pytest.raises(CacheError, match="schema version"):
        CacheStream(cache, batch_size=4)


def test_validation_batches_split_by_rank_in_fixed_order(cache):
    from shared.cache import CacheReader
    reader = CacheReader(cache)
    one = [k for b in validation_batches(reader, 4) for k in b.key]
    two = [[k for b in validation_batches(reader, 4, r, 2) for k in b.key] for r in range(2)]
    assert sorted(one) == sorted(two[0] + two[1]) and not set(two[0]) & set(two[1])
    assert one == [k for b in validation_batches(reader, 4) for k in b.key]


def test_val_max_samples_reads_nothing_after_them(tmp_path):
    from shared.cache import CacheReader
    cache = write_cache(tmp_path / "v", 16, rows_per_shard=8, row_group_rows=4, prefix="val")
    second = sorted(cache.glob("*.parquet"))[1]
    second.write_bytes(second.read_bytes()[: second.stat().st_size // 2])   # never read below its first 8 rows
    reader = CacheReader(cache)
    for cap in (8, 6):
        keys = [k for b in validation_batches(reader, 4, max_samples=cap) for k in b.key]
        assert keys == [f"val-{i:05d}" for i in range(cap)]
    with pytest.raises(CacheError, match=second.name):   # what reading one more sample would meet
        list(validation_batches(reader, 4, max_samples=9))


def test_batches_carry_the_posterior_logvar_when_asked(tmp_path):
    from shared.cache import CacheReader
    cache = write_cache(tmp_path / "lv", 8, logvar=True)
    stored = {}
    reader = CacheReader(cache)
    for shard in reader.shards:
        for rg in reader.iter_shard(shard):
            stored.update({k: (rg["latent"][i], rg["latent_logvar"][i]) for i, k in enumerate(rg["key"])})
    batches = [b for _, b in zip(range(2), iter(CacheStream(cache, batch_size=4, latent_logvar=True)))]
    for b in batches:
        assert b.latent_logvar.shape == b.latent.shape
        for i, k in enumerate(b.key):
            assert torch.equal(b.latent[i], stored[k][0]) and torch.equal(b.latent_logvar[i], stored[k][1])
    assert next(iter(CacheStream(cache, batch_size=4))).latent_logvar is None   # not read unless asked


def test_a_cache_without_logvar_is_refused_for_posterior_samples(tmp_path):
    cache = write_cache(tmp_path / "c", 8)
    with pytest.raises(CacheError, match="no latent_logvar column.*--store-logvar"):
        CacheStream(cache, batch_size=4, latent_logvar=True)
    # A manifest that claims the column over shards without it: refused at the row group, naming it.
    set_manifest(cache, dtypes={"latent": "float32", "t5": "float32", "clip": "float32", "latent_logvar": "float32"})
    shard = sorted(cache.glob("*.parquet"))[0]
    with pytest.raises(CacheError, match=f"{shard.name}.*row group 0 has no latent_logvar"):
        next(iter(CacheStream(cache, batch_size=4, latent_logvar=True)))


@pytest.mark.parametrize("change, named", [
    ({"vae": {"scaling_factor": 1.0, "shift_factor": 0.0}}, "vae"),
    ({"dims": {"latent_channels": 16, "t5_dim": 32, "clip_dim": 64}}, "dims"),
    ({"t5": {"mode": "trimmed", "max_length": 77}}, "T5 max_length"),
    ({"encoders": {"t5": {"source": "other", "sha256": "ab"}}}, "encoders"),
])
def test_validation_cache_encoded_otherwise_is_refused(tmp_path, change, named):
    from train.data import open_cache, open_validation_cache
    train = open_cache(write_cache(tmp_path / "t", 8))
    val = write_cache(tmp_path / "v", 8, prefix="val")
    assert open_validation_cache(val, train).num_rows == 8
    set_manifest(val, **change)
    with pytest.raises(CacheError, match=f"validation cache .* encoded otherwise .*{named}"):
        open_validation_cache(val, train)


def test_encoders_compare_by_weights_not_by_path(tmp_path):
    from train.data import open_cache, open_validation_cache
    train_dir, val = write_cache(tmp_path / "t", 8), write_cache(tmp_path / "v", 8, prefix="val")
    set_manifest(train_dir, encoders={"vae": {"source": "/a/flux", "sha256": "12"}})
    set_manifest(val, encoders={"vae": {"source": "/moved/flux", "sha256": "12"}})
    assert open_validation_cache(val, open_cache(train_dir)).num_rows == 8


def test_no_default_vae_factors(tmp_path):
    from train.data import open_cache, open_validation_cache, vae_facts
    cache = write_cache(tmp_path / "c", 8)
    assert vae_facts(open_cache(cache), "here") == {"scaling_factor": 0.3611, "shift_factor": 0.1159}
    val = write_cache(tmp_path / "v", 8, prefix="val")
    set_manifest(val, vae={"scaling_factor": 0.3611})
    with pytest.raises(CacheError, match="v: the manifest has no vae.shift_factor"):
        open_validation_cache(val, open_cache(cache))
    set_manifest(cache, vae=None)
    with pytest.raises(CacheError, match="here: the manifest has no vae.shift_factor"):
        vae_facts(open_cache(cache), "here")


def test_too_few_row_groups_name_the_encode_option_and_an_empty_cache_says_it_is_empty(tmp_path):
    small = write_cache(tmp_path / "small", 8, rows_per_shard=8, row_group_rows=4)   # 2 row groups
    with pytest.raises(CacheError, match="2 row groups cannot feed 3 readers .* smaller --rows-per-shard"):
        CacheStream(small, batch_size=2).units(0, 0, 3)
    empty = write_cache(tmp_path / "empty", 0)
    with pytest.raises(CacheError, match="the cache holds no rows"):
        CacheStream(empty, batch_size=2).units(0, 0, 1)


def test_a_small_cache_of_many_buckets_keeps_every_batch_full(tmp_path):
    """21 samples in 9 latent sizes, 6 of them alone (a LoRA user's folder with --buckets): at batch 4 each
    size's last batch is filled with its own samples again, so every batch holds 4 while each sample is in
    exactly one batch of the epoch; without the fill they held 21 / 12 = 1.75."""
    sizes = [(8, 8)] * 5 + [(8, 12)] * 5 + [(12, 8)] * 5 + [(4, 16), (16, 4), (8, 4), (4, 8), (12, 4), (4, 12)]
    cache = write_cache(tmp_path / "c", 21, sizes=sizes, rows_per_shard=21, row_group_rows=21)
    stream = CacheStream(cache, batch_size=4, seed=0, shuffle_buffer=8)
    batches = [items for _, items in stream.epoch_batches(0, 0, 1)]
    assert [len(b) for b in batches] == [4] * 12
    assert all(len({it.size for it in b}) == 1 for b in batches)
    keys = [k for b in batches for k in distinct_keys(b)]
    assert sorted(keys) == sorted(f"train-{i:05d}" for i in range(21))   # each sample in one batch
    assert len(keys) / len(batches) == 1.75
