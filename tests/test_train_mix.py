"""Mixed datasets (data.train_cache as a list): each cache's share of the batches within sampling error of its
weight, one cache per batch, exact resume through DataLoader workers, caches encoded otherwise refused, the
config checked, and a trainer run over a mix with a source's loss weighted."""
import math

import pytest
from train_caches import write_cache

from shared.cache import CacheError
from shared.params import ConfigError
from train.config import load_config
from train.data import CacheStream, train_loader
from train.mix import MixedPosition, MixedStream, Source, check_alike, parse_sources

WEIGHTS = (0.7, 0.3)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    return (write_cache(root / "a", 24, prefix="a", sizes=((8, 8), (8, 12)), rows_per_shard=8, row_group_rows=4),
            write_cache(root / "b", 10, prefix="b", rows_per_shard=8, row_group_rows=2, seed=1))


def mixed(caches, position=None, weights=WEIGHTS):
    streams = [CacheStream(c, batch_size=3, seed=5, shuffle_buffer=4) for c in caches]
    return MixedStream(streams, list(weights), position)


def take(it, n, position, log):
    for _ in range(n):
        batch = next(it)
        position.consumed(batch)
        log.append((tuple(batch.pos.tolist()), tuple(batch.key)))


def test_each_caches_share_is_its_weight_within_sampling_error(caches):
    n = 800
    it = iter(mixed(caches))
    counts = [0, 0]
    for _ in range(n):
        batch = next(it)
        source = int(batch.pos[3])
        assert {k[0] for k in batch.key} == {"ab"[source]}   # a batch comes whole from one cache
        counts[source] += 1
    for count, w in zip(counts, WEIGHTS):   # binomial: 4 standard errors
        assert abs(count / n - w) < 4 * math.sqrt(w * (1 - w) / n)


def test_resume_continues_the_mix_exactly_with_workers(caches):
    def run(position=None):
        return iter(train_loader(mixed(caches, position), num_workers=2, pin_memory=False))

    full_pos, full = MixedPosition(2, 1, 2), []
    take(run(), 24, full_pos, full)
    pos, first = MixedPosition(2, 1, 2), []
    take(run(), 9, pos, first)
    resumed, second = MixedPosition(2, 1, 2), []
    resumed.load_state_dict(pos.state_dict())
    take(run(resumed.state_dict()), 15, resumed, second)
    assert first + second == full
    assert {p[3] for p, _ in full} == {0, 1}
    with pytest.raises(CacheError, match="same list"):
        MixedPosition(2, 1, 3).load_state_dict(pos.state_dict())


def test_caches_encoded_otherwise_are_refused_naming_both(caches, tmp_path):
    padded = write_cache(tmp_path / "padded", 6, t5_mode="padded", prefix="p")
    from train.data import open_cache
    readers = [open_cache(c) for c in (caches[0], padded)]
    sources = [Source(str(caches[0])), Source(str(padded))]
    with pytest.raises(CacheError, match=r"padded.*encoded otherwise.*T5 mode: 'padded'"):
        check_alike(readers, sources)


@pytest.mark.parametrize("value,message", [
    ([], "empty list"), ([{"weight": 1}], "cache: FOLDER_OR_URL"), ([{"cache": "a", "wieght": 1}], "'wieght'"),
    ([{"cache": "a", "weight": 0}], "above 0")])
def test_bad_sources_are_refused_naming_the_key(value, message):
    with pytest.raises(ConfigError, match=message):
        parse_sources(value)


def test_config_takes_a_list_and_refuses_epochs_with_it(caches):
    sources = [{"cache": str(caches[0]), "weight": 0.7}, {"cache": str(caches[1]), "weight": 0.3, "loss_weight": 2}]
    cfg = load_config(overrides={"data.train_cache": sources, "run.max_steps": 1})
    assert parse_sources(cfg.data.train_cache)[1] == Source(str(caches[1]), 0.3, 2.0)
    assert parse_sources(str(caches[0])) == [Source(str(caches[0]))]   # a string: one cache, as always
    with pytest.raises(ConfigError, match="run.epochs"):
        load_config(overrides={"data.train_cache": sources, "run.epochs": 1})


def test_trainer_runs_a_mix_and_weights_a_sources_loss(caches, tmp_path):
    """A few steps over a mix; a source of loss_weight 0 contributes nothing (its steps' loss is 0)."""
    from train.loop import Trainer
    sources = [{"cache": str(caches[0]), "weight": 0.5, "loss_weight": 0.0},
               {"cache": str(caches[1]), "weight": 0.5}]
    cfg = load_config(overrides={"data.train_cache": sources, "run.max_steps": 4, "data.batch_size": 2,
                                 "data.num_workers": 0, "run.output_dir": str(tmp_path / "run"),
                                 "run.progress": False, "run.tensorboard": False, "run.record_keys": True})
    trainer = Trainer(cfg)
    losses = []
    real = trainer.forward_backward_step

    def record(batch, last):
        loss = real(batch, last)
        losses.append((int(batch.pos[3]), float(loss.detach())))
        return loss
    trainer.forward_backward_step = record
    trainer.train()
    assert {s for s, _ in losses} == {0, 1}
    assert all((loss == 0.0) == (s == 0) for s, loss in losses)
