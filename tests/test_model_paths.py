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
