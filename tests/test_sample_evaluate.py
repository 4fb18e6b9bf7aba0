"""The demo's sample evaluation judges colours and backgrounds the way a person would."""
import json
import random

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from preprocess.demo import draw_scene
from sample.evaluate import evaluate, judge, main
from shared.demo_grammar import BACKGROUNDS, COLORS, SHAPES, caption_for, parse_caption


def test_judge_recovers_drawn_scenes():
    rng = random.Random(0)
    for color in COLORS:
        for background in BACKGROUNDS:
            for shape in SHAPES:
                seen = judge(np.asarray(draw_scene(rng, 64, color, shape, background)))
                assert (seen["color"], seen["background"]) == (color, background)


def test_judge_on_noise_and_blank():
    assert judge(np.zeros((32, 32, 3), np.uint8))["color"] is None
    assert judge(np.full((32, 32, 3), 255, np.uint8))["background"] == "white"


def test_parse_caption():
    assert parse_caption("a red circle on a white background") == ("red", "circle", "white")
    assert parse_caption("a purple circle on a white background") is None
    assert parse_caption("a photo of a cat") is None


def _save(path, image, prompt, seed=0):
    info = PngInfo()
    info.add_text("prompt", prompt)
    info.add_text("seed", str(seed))
    image.save(path, pnginfo=info)


def test_evaluate_counts_right_and_wrong(tmp_path):
    rng = random.Random(1)
    _save(tmp_path / "a.png", draw_scene(rng, 48, "red", "square", "black"), caption_for("red", "square", "black"))
    _save(tmp_path / "b.png", draw_scene(rng, 48, "blue", "circle", "white"), caption_for("green", "circle", "white"))
    _save(tmp_path / "c.png", draw_scene(rng, 48, "blue", "circle", "white"), "not the grammar")
    report = evaluate(tmp_path)
    assert report["samples"] == 2
    assert report["color_accuracy"] == 0.5 and report["background_accuracy"] == 1.0
    assert main([str(tmp_path), "--report", str(tmp_path / "r.json"), "--grid", str(tmp_path / "g.png")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["samples"] == 2
    assert Image.open(tmp_path / "g.png").size[1] >= 2 * 96


def test_evaluate_refuses_empty_folder(tmp_path, capsys):
    assert main([str(tmp_path), "--report", str(tmp_path / "r.json")]) == 2
    assert "no PNG" in capsys.readouterr().err and not (tmp_path / "r.json").exists()
