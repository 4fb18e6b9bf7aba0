import hashlib
import io
import json
import re
import tarfile

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from preprocess.cli import app
from shared.demo_grammar import BACKGROUNDS, COLORS, SHAPES

GRAMMAR = re.compile(r"^a (\w+) (\w+) on a (\w+) background$")


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_demo_shards_in_cc12m_layout(tmp_path):
    result = CliRunner().invoke(app, ["demo-data", str(tmp_path / "d"), "--num-samples", "50", "--size", "48",
                                      "--samples-per-shard", "20", "--seed", "1"])
    assert result.exit_code == 0, result.output
    shards = sorted((tmp_path / "d").glob("*.tar"))
    assert [s.name for s in shards] == ["demo-00000.tar", "demo-00001.tar", "demo-00002.tar"]
    seen = set()
    for shard in shards:
        files = _members(shard)
        keys = {name.split(".")[0] for name in files}
        for key in keys:
            assert {f"{key}.jpg", f"{key}.txt", f"{key}.json"} <= files.keys()
            caption = files[f"{key}.txt"].decode()
            color, shape, background = GRAMMAR.match(caption).groups()
            assert color in COLORS and shape in SHAPES and background in BACKGROUNDS
            meta = json.loads(files[f"{key}.json"])
            assert meta["caption"] == caption and meta["key"] == key
            img = np.asarray(Image.open(io.BytesIO(files[f"{key}.jpg"])).convert("RGB")).astype(int)
            assert img.shape == (48, 48, 3)
            # The corner is the named background; somewhere is the named colour.
            assert np.abs(img[0, 0] - BACKGROUNDS[background]).max() < 40
            dist = np.abs(img - np.array(COLORS[color])).max(-1)
            assert (dist < 50).mean() > 0.05
            seen.add((color, shape, background))
        assert len(keys) == (10 if shard.name.endswith("2.tar") else 20)
    assert len({c for c, _, _ in seen}) == 4 and len({b for _, _, b in seen}) == 2


def test_demo_data_is_deterministic(tmp_path):
    from preprocess.demo import write_demo_shards
    digest = lambda paths: [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]  # noqa: E731
    a = digest(write_demo_shards(tmp_path / "a", num_samples=12, size=32, seed=5))
    b = digest(write_demo_shards(tmp_path / "b", num_samples=12, size=32, seed=5))
    c = digest(write_demo_shards(tmp_path / "c", num_samples=12, size=32, seed=6))
    assert a == b and a != c
