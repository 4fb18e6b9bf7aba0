"""Paths given relative to where a command runs: a failure says where it looked, and an offline hub says so."""
import pytest

from shared.cache import CacheError, CacheReader
from shared.family.flux1_text import load_t5_tokenizer
from shared.models import ModelLoadError


def test_a_hub_id_while_offline_says_offline_and_where_the_folder_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=rf"models/tiny: no such folder here \({tmp_path};.*hub is offline"):
        load_t5_tokenizer("models/tiny")


def test_a_relative_cache_path_names_the_folder_it_was_read_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CacheError, match=rf"data/cache \(from {tmp_path}\): no manifest.json"):
        CacheReader("data/cache")


def test_a_hub_id_not_downloaded_without_a_network_is_refused_at_once(tmp_path):
    """No HF_HUB_OFFLINE, and a hub that cannot be reached (a port nothing listens on): huggingface_hub
    would retry for about 25 s a file and the loader then say 'does not appear to have a file named
    config.json'; the model is refused at once, saying why."""
    import os
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]   # closed again: connections are refused
    code = ("import time; from transformers import AutoTokenizer; import huggingface_hub  # imported: not timed\n"
            "from shared.family.flux1_text import load_t5_tokenizer\nfrom shared.models import ModelLoadError, part_config\n"
            "for load in (lambda: load_t5_tokenizer('some-org/some-flux'), "
            "lambda: part_config('some-org/some-flux', 'transformer')):\n"
            "    t = time.perf_counter()\n"
            "    try:\n"
            "        load()\n"
            "    except ModelLoadError as e:\n"
            "        print(f'{time.perf_counter() - t:.1f}', e)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "hf"))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                         cwd=tmp_path)
    lines = run.stdout.splitlines()
    assert len(lines) == 2, run.stdout + run.stderr[-3000:]
    for line, part in zip(lines, ("tokenizer_2", "transformer")):
        seconds, message = line.split(" ", 1)
        assert float(seconds) < 5, line   # the retries alone took 23 s
        assert f"some-org/some-flux: no such folder here ({tmp_path};" in message, message
        assert f"its {part} is not downloaded, and the network is unreachable or HF_HUB_OFFLINE is set" in message
