"""The trainer's caption pick over a cache of several captions a row (train/data.py pick_captions): one per
sample and step, uniform over the row's captions, and a resumed run draws what an uninterrupted one drew."""
from __future__ import annotations

import math
import shutil

import torch
from train_caches import CHANNELS, CLIP_DIM, MAX_LEN, T5_DIM, finish_cache, read_metrics, tiny_config

from shared.cache import CacheWriter
from shared.family.flux1 import FLUX1
from train.data import CacheStream
from train.loop import train

ROWS = 12


def _captions(i: int) -> int:
    return 1 + i % 3          # rows of 1, 2 and 3 captions


def write_multi_caption_cache(out_dir, t5_mode: str = "trimmed"):
    """ROWS rows; caption j of row i has text states filled with 100 * i + j (and a random part), so a
    batch's text says which caption each sample got."""
    g = torch.Generator().manual_seed(0)
    dtypes = {"latent": "float32", "t5": "float32", "clip": "float32"}

    def caption(i, j):
        n = MAX_LEN if t5_mode == "padded" else 4 + (i + j) % 5
        t5 = 0.01 * torch.randn(n, T5_DIM, generator=g)
        t5[:, 0] = 100 * i + j
        return t5, n, torch.randn(CLIP_DIM, generator=g)

    with CacheWriter(out_dir, "train", dtypes, text=FLUX1.text, rows_per_shard=8, row_group_rows=4) as w:
        for i in range(ROWS):
            caps = [caption(i, j) for j in range(_captions(i))]
            w.add_batch(keys=[f"row-{i:02d}"], captions=[f"caption {i}.0"], latent=torch.randn(1, CHANNELS, 8, 8,
                                                                                             generator=g),
                        widths=[64], heights=[64], t5=[caps[0][0]], t5_len=[caps[0][1]], clip=[caps[0][2]],
                        alt_captions=[[f"caption {i}.{j}" for j in range(1, len(caps))]],
                        t5_alt=[[c[0] for c in caps[1:]]], t5_len_alt=[[c[1] for c in caps[1:]]],
                        clip_alt=[[c[2] for c in caps[1:]]])
        shards = w.close()
    return finish_cache(out_dir, shards, dtypes, t5_mode,
                        captions={"max": 3, "rows_with_several": 8, "total": sum(_captions(i) for i in range(ROWS))})


def test_each_step_picks_one_of_the_rows_captions_uniformly(tmp_path):
    cache = write_multi_caption_cache(tmp_path / "c")
    stream = iter(CacheStream(cache, batch_size=4, seed=3, shuffle_buffer=8))
    counts: dict = {}
    batches = 300
    for _ in range(batches):
        batch = next(stream)
        for b, key in enumerate(batch.key):
            i = int(key.split("-")[1])
            j = int(batch.text[b, 0, 0].round()) - 100 * i
            assert 0 <= j < _captions(i), (key, j)        # the row's own caption, its states whole
            assert int(batch.text_len[b]) == 4 + (i + j) % 5
            counts[(i, j)] = counts.get((i, j), 0) + 1
    assert set(counts) == {(i, j) for i in range(ROWS) for j in range(_captions(i))}
    # Pooled over the rows of k captions, each caption's share is 1/k within 5 standard errors.
    for k in (2, 3):
        rows = [i for i in range(ROWS) if _captions(i) == k]
        n = sum(counts[(i, j)] for i in rows for j in range(k))
        for j in range(k):
            share = sum(counts[(i, j)] for i in rows) / n
            assert abs(share - 1 / k) < 5 * math.sqrt((1 / k) * (1 - 1 / k) / n), (k, j, share, n)


def test_a_resumed_run_draws_the_captions_an_uninterrupted_one_drew(tmp_path):
    cache = write_multi_caption_cache(tmp_path / "c", t5_mode="trimmed")
    settings = {"run.max_steps": 5, "run.checkpoint_every": 2, "data.batch_size": 3, "run.deterministic": True}
    texts_full, resumed = [], []
    train(tiny_config(tmp_path / "a", cache, **settings), on_batch=lambda b: texts_full.append(b.text.clone()))
    # The run resumed from the uninterrupted run's checkpoint of step 2, in a folder of its own.
    shutil.copytree(tmp_path / "a/run/checkpoints/step-2", tmp_path / "b/run/checkpoints/step-2")
    train(tiny_config(tmp_path / "b", cache, **settings, **{"run.resume": "auto"}),
          on_batch=lambda b: resumed.append(b.text.clone()))
    assert len(resumed) == 3 and all(torch.equal(x, y) for x, y in zip(resumed, texts_full[2:], strict=True))
    picked = {int(v) % 100 for t in texts_full for v in t[:, 0, 0].round()}
    assert picked > {0}                                   # other captions than the first were trained on
    losses = lambda d: [(m["step"], m["loss"]) for m in read_metrics(d / "run") if "loss" in m]  # noqa: E731
    assert losses(tmp_path / "b") == losses(tmp_path / "a")[2:] and len(losses(tmp_path / "a")) == 5
