"""Does the demo follow its prompts? Score sample PNGs against the demo grammar.

For each image whose prompt (from its PNG text chunk) is `a {color} {shape} on a {background}
background`: the background is the demo background nearest to the image's border pixels; the
colour is the demo colour nearest to the median of the pixels that differ clearly from that
background. Writes a JSON report and a labelled grid (prompt beside its samples).

    python -m sample.evaluate SAMPLES_DIR --report metrics/demo_samples.json --grid docs/demo_samples.png
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from PIL import Image, ImageDraw

from shared.cache.files import atomic_write
from shared.demo_grammar import BACKGROUNDS, COLORS, parse_caption
from shared.params import run_command


FOREGROUND_DISTANCE = 100.0   # RGB distance from the background that counts as foreground


def _nearest(rgb: np.ndarray, palette: dict) -> str:
    return min(palette, key=lambda name: float(np.linalg.norm(rgb - np.array(palette[name], dtype=float))))


def judge(image: np.ndarray) -> dict:
    """Background and dominant foreground colour of an RGB uint8 image, by the demo's palettes."""
    px = image.astype(float)
    border = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])
    background = _nearest(np.median(border, axis=0), BACKGROUNDS)
    flat = px.reshape(-1, 3)
    far = np.linalg.norm(flat - np.array(BACKGROUNDS[background], dtype=float), axis=1) > FOREGROUND_DISTANCE
    colour = _nearest(np.median(flat[far], axis=0), COLORS) if far.any() else None
    return {"background": background, "color": colour, "foreground_share": float(far.mean())}


def evaluate(samples_dir) -> dict:
    rows = []
    for path in sorted(Path(samples_dir).glob("*.png")):
        with Image.open(path) as img:
            prompt = img.text.get("prompt", "") if hasattr(img, "text") else ""
            pixels = np.asarray(img.convert("RGB"))
        parsed = parse_caption(prompt)
        if parsed is None:
            continue
        color, _, background = parsed
        seen = judge(pixels)
        rows.append({"file": path.name, "prompt": prompt, "seed": img.text.get("seed"), **{f"seen_{k}": v for k, v in
                    seen.items()}, "color_ok": seen["color"] == color, "background_ok": seen["background"] == background})
    n = len(rows)
    return {
        "samples": n,
        "color_accuracy": sum(r["color_ok"] for r in rows) / n if n else 0.0,
        "background_accuracy": sum(r["background_ok"] for r in rows) / n if n else 0.0,
        "chance_color": 1 / len(COLORS), "chance_background": 1 / len(BACKGROUNDS),
        "images": rows,
    }


def labelled_grid(samples_dir, report: dict, cell: int = 96) -> Image.Image:
    """One row per prompt: the prompt's text, then its samples, each marked by whether it was judged right."""
    by_prompt: dict[str, list[dict]] = {}
    for row in report["images"]:
        by_prompt.setdefault(row["prompt"], []).append(row)
    cols = max((len(v) for v in by_prompt.values()), default=1)
    text_w = 230
    grid = Image.new("RGB", (text_w + cols * (cell + 4), max(1, len(by_prompt)) * (cell + 4)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (prompt, rows) in enumerate(by_prompt.items()):
        y = r * (cell + 4)
        draw.text((6, y + cell // 2 - 6), prompt, fill="black")
        for c, row in enumerate(rows):
            with Image.open(Path(samples_dir) / row["file"]) as img:
                tile = img.convert("RGB").resize((cell, cell), Image.NEAREST)
            x = text_w + c * (cell + 4)
            grid.paste(tile, (x, y))
            ok = row["color_ok"] and row["background_ok"]
            draw.rectangle((x, y + cell - 6, x + cell - 1, y + cell - 1), fill=(40, 170, 60) if ok else (200, 40, 40))
    return grid


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                   rich_markup_mode=None)   # plain help: typer's rich panels show flags as taking a <bool>


@app.command()
def evaluate_samples(
    samples_dir: Path = typer.Argument(..., help="folder of flux-sample PNGs"),
    report_path: Path = typer.Option(..., "--report", help="JSON report to write"),
    grid_path: Optional[Path] = typer.Option(None, "--grid", help="labelled grid PNG to write"),
) -> None:
    """Judge the demo's samples: the share with the prompt's colour and background (and a labelled grid)."""
    if not samples_dir.is_dir():
        print(f"error: {samples_dir}: no such folder", file=sys.stderr)
        raise typer.Exit(2)
    report = evaluate(samples_dir)
    if report["samples"] == 0:
        print(f"error: {samples_dir}: no PNG with a demo-grammar prompt", file=sys.stderr)
        raise typer.Exit(2)
    atomic_write(report_path, lambda fh: fh.write((json.dumps(report, indent=2) + "\n").encode()))
    if grid_path:
        grid = labelled_grid(samples_dir, report)
        atomic_write(grid_path, lambda fh: grid.save(fh, format="PNG"))
    print(f"{report['samples']} samples: colour {report['color_accuracy']:.0%} (chance {report['chance_color']:.0%}), "
          f"background {report['background_accuracy']:.0%} (chance {report['chance_background']:.0%})")


def main(argv: list[str] | None = None) -> int:
    return run_command(app, argv, "python -m sample.evaluate")


if __name__ == "__main__":
    sys.exit(main())
