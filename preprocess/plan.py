"""`flux-prep plan`: how big a cache an encode would write, and how long it would take, before it runs.

A few input shards are read (captions, and each image's size from its header: no decoding), the
captions tokenized with the model family's text tokenizer, and the rows of those samples written with the
real CacheWriter with empty tensors: the bytes that are not tensors (keys, captions, the small
columns, Parquet's own) are measured, the tensors' bytes counted from their shapes. The sample's
share of rows and of skips, scaled to every input shard, gives the cache's: tars scale by their bytes
(a short last tar sampled beside full ones stands for its own size, not for a full one's), a folder's
shards by their files.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace

import torch

from shared.cache import CacheWriter
from shared.cache.alt_captions import alt_name
from shared.cache.schema import torch_dtype
from shared.family import Family, family_of_model
from shared.models import part_config
from shared.precision import canonical_dtype

from .captions import CaptionOptions, row_captions
from .decode import PrepOptions
from .images import ImageSkip, check_min_size, open_image, oriented_size, target_size
from .masks import MASK_DTYPE
from .sources import (SKIP_TOO_SMALL, InputShard, Skip, add_example, image_bytes, iter_shard, named_skips,
                      read_captions, resolve_inputs, skipped_name)

# Encode rates measured in docs/BENCHMARKS.md (stage 1), img/s: family -> GPU kind -> text setting -> rate.
MEASURED_RATES = {
    "flux1": {"1x H100 80GB": {"padded-256": 216.1, "trimmed": 614.0, "padded-512": 113.3}},
}
RATE_NOTES = {"padded-512": "VAE+T5+CLIP without I/O (run E): an upper bound"}


@dataclass
class SampleRow:
    key: str
    captions: list[str]         # as encode stores them (captions.py): the first, then the row's others
    width: int
    height: int
    latent_hw: tuple[int, int]
    text_lens: list[int]
    refs: list = None        # each reference's ((width, height) in pixels, its latent's (h, w))


def sample_shards(shards: list[InputShard], count: int) -> list[InputShard]:
    """`count` input shards spread over the list (first, last and evenly between)."""
    if count >= len(shards):
        return list(shards)
    step = (len(shards) - 1) / max(1, count - 1)
    return [shards[round(i * step)] for i in range(count)]


def read_sample(shards: list[InputShard], prep: PrepOptions, factor: int = 8,
                captions: CaptionOptions = CaptionOptions()) -> tuple[list, dict, int, dict]:
    """(rows the sample would give, skips by reason, samples read, skipped samples named by reason),
    from headers and captions only; `factor`: the VAE's downsampling."""
    rows, skips, seen, examples = [], {}, 0, {}
    buckets = prep.bucket_list()
    for shard in shards:
        for item in iter_shard(shard, prep.references):
            seen += 1
            why, row = _sample_row(shard, item, prep, buckets, factor, captions)
            if why is not None:
                skips[why] = skips.get(why, 0) + 1
                add_example(examples, why, skipped_name(shard, item.key, getattr(item, "files", ())))
            else:
                rows.append(row)
    return rows, skips, seen, examples


def _sample_row(shard: InputShard, item, prep: PrepOptions, buckets, factor: int, captions: CaptionOptions):
    if isinstance(item, Skip):
        return item.reason, None
    caption, why = read_captions(item.files)
    data, why_img = image_bytes(item.files)
    if why_img is not None or why is not None:
        return why_img or why, None
    try:
        w, h = oriented_size(open_image(data))
        check_min_size(w, h, prep.min_size)   # encode's rule (prepare_image), on the header's size
    except ImageSkip as e:
        return e.reason, None
    tw, th = target_size(w, h, prep.resolution, buckets)
    refs = _sample_refs(item.files, prep, factor) if prep.references else []
    if isinstance(refs, str):
        return refs, None
    key = shard.row_key(item.key)
    return None, SampleRow(key, row_captions(caption, key, captions), w, h, (th // factor, tw // factor), [], refs)


def _sample_refs(files: dict, prep: PrepOptions, factor: int):
    """Each reference's (pixels, latent size) from its header, as encode sizes it; or a skip reason."""
    from shared.family import get_family
    from .references import SKIP_BAD_REFERENCE, reference_bytes, reference_target
    data, why = reference_bytes(files, prep.references)
    if why is not None:
        return why
    out = []
    try:
        for d in data:
            w, h = oriented_size(open_image(d))
            _, (cw, ch) = reference_target(w, h, get_family(prep.family), prep.references, prep.reference_resolution)
            out.append(((w, h), (ch // factor, cw // factor)))
    except ImageSkip:
        return SKIP_BAD_REFERENCE
    return out


def other_bytes_per_row(rows: list[SampleRow], dtypes: dict, rows_per_shard: int, family: Family) -> float:
    """What a row costs beyond its tensors' bytes: the sample's rows written with empty tensors."""
    spec = family.text
    refs = len(rows[0].refs or ())
    with tempfile.TemporaryDirectory() as tmp, CacheWriter(tmp, "plan", dtypes, text=spec,
                                                           rows_per_shard=rows_per_shard,
                                                           row_group_rows=min(256, rows_per_shard),
                                                           references=refs) as w:
        for r in rows:
            empty = {spec.states: [torch.zeros(0, 1)], spec.length: r.text_lens[:1],
                     **({spec.pooled: [torch.zeros(0)]} if spec.pooled else {})}
            alt = {alt_name(spec.states): [[torch.zeros(0, 1)] * (len(r.captions) - 1)],
                   alt_name(spec.length): [r.text_lens[1:]],
                   **({alt_name(spec.pooled): [[torch.zeros(0)] * (len(r.captions) - 1)]} if spec.pooled else {})}
            # the references' sizes as written: their h and w columns compress as the real ones do
            ref_rows = [{"latent": [torch.zeros(0, hw[0], hw[1])], "width": [wh[0]], "height": [wh[1]]}
                        for wh, hw in r.refs or ()]
            w.add_batch(keys=[r.key], captions=r.captions[:1], latent=[torch.zeros(16, 0, 0)], widths=[r.width],
                        heights=[r.height], alt_captions=[r.captions[1:]], refs=ref_rows or None, **empty, **alt)
        shards = w.close()
        return sum(s.bytes for s in shards) / len(rows)


def tensor_bytes(row: SampleRow, mode: str, max_length: int, dims: dict, itemsize: int, logvar: bool,
                 family: Family) -> int:
    """A row's tensor bytes: latent (and its log-variance), each caption's text states (max_length or real
    tokens) and pooled vector where the family has one, the reference latents."""
    spec = family.text
    latent = dims["latent_channels"] * row.latent_hw[0] * row.latent_hw[1]
    refs = sum(dims["latent_channels"] * h * w for _, (h, w) in row.refs or ())
    tokens = max_length * len(row.text_lens) if mode == "padded" else sum(row.text_lens)
    states = tokens * dims[spec.dim_keys()[spec.states]]
    pooled = dims[spec.dim_keys()[spec.pooled]] * len(row.text_lens) if spec.pooled else 0
    return itemsize * (latent * (2 if logvar else 1) + states + pooled + refs)


def mask_bytes(row: SampleRow) -> int:
    """A row's loss mask (encode --masks): one value per latent cell, in the mask column's dtype."""
    return torch_dtype(MASK_DTYPE).itemsize * row.latent_hw[0] * row.latent_hw[1]


def model_dims(model: str, family: Family) -> dict:
    vae = part_config(model, "vae")
    return {"latent_channels": int(vae["latent_channels"]), **family.text_dims(model),
            "vae_factor": 2 ** (len(vae["block_out_channels"]) - 1)}


def plan(model: str, input_spec: str, prep: PrepOptions, *, text_mode: str, text_max_length: int | None,
         dtype: str, store_logvar: bool, rows_per_shard: int, sample: int = 3,
         captions: CaptionOptions = CaptionOptions(), text_precision: str = "bf16") -> dict:
    """The estimate (see the module docstring); JSON-ready. `text_precision` changes the values, not the bytes."""
    shards = resolve_inputs(input_spec, references=prep.references)
    family = family_of_model(model)
    family.check_references(prep.references, "--references")
    prep = replace(prep, family=family.name)   # whose reference sizes
    if text_mode not in family.text.modes:
        raise ValueError(f"{model}: {family.name} text takes mode {' or '.join(family.text.modes)}, not {text_mode!r}")
    dims = model_dims(model, family)
    picked = sample_shards(shards, sample)
    rows, skips, seen, examples = read_sample(picked, prep, dims["vae_factor"], captions)
    lengths, max_length = family.text_lengths(model, [c for r in rows for c in r.captions], text_max_length)
    at = 0
    for r in rows:
        r.text_lens, at = [int(n) for n in lengths[at:at + len(r.captions)]], at + len(r.captions)
    itemsize = torch_dtype(canonical_dtype(dtype)).itemsize
    store = canonical_dtype(dtype)
    dtypes = {"latent": store, **{c: store for c in family.text.tensor_columns},
              **({"latent_logvar": store} if store_logvar else {})}
    scale = _folder_scale(shards, picked) if picked[0].files else _tar_scale(shards, picked)
    expected_rows = round(len(rows) * scale)
    other = other_bytes_per_row(rows, dtypes, rows_per_shard, family) if rows else 0.0
    modes = {}
    for mode in family.text.modes:
        per_row = (sum(tensor_bytes(r, mode, max_length, dims, itemsize, store_logvar, family)
                       + (mask_bytes(r) if prep.masks else 0) for r in rows) / len(rows) + other) if rows else 0.0
        name = f"padded-{max_length}" if mode == "padded" else "trimmed"
        modes[name] = {"text_mode": mode, "bytes_per_sample": per_row, "total_bytes": per_row * expected_rows,
                       "encode_hours": _hours(family, name, expected_rows)}
    chosen = modes[f"padded-{max_length}" if text_mode == "padded" else "trimmed"]
    return {"rows": expected_rows, "bytes_per_sample": chosen["bytes_per_sample"], "total_bytes": chosen["total_bytes"],
            "family": family.name, "text_mode": text_mode, "text_max_length": max_length, "modes": modes,
            "text_precision": text_precision,
            "input_shards": len(shards), "input_bytes": _input_bytes(shards), "sampled_shards": len(picked),
            "sampled_bytes": _input_bytes(picked), "sampled_samples": seen, "sampled_rows": len(rows),
            "skipped": dict(sorted(skips.items())), "skipped_examples": dict(sorted(examples.items())),
            "below_min_size": skips.get(SKIP_TOO_SMALL, 0) / max(1, seen),
            "min_size": prep.min_size, "rate_notes": RATE_NOTES,
            "captions_per_row": sum(len(r.captions) for r in rows) / len(rows) if rows else 0.0}


def _folder_scale(shards: list[InputShard], picked: list[InputShard]) -> float:
    """A folder's shards list their files: scale by files, not by shards (the last one is short)."""
    return sum(len(s.files) for s in shards) / max(1, sum(len(s.files) for s in picked))


def _input_bytes(shards: list[InputShard]) -> int | None:
    """The tars' bytes (their fingerprints' sizes); None for a folder, or where a store gave no size."""
    sizes = [s.fingerprint.get("size") for s in shards]
    return sum(sizes) if sizes and all(isinstance(n, int) for n in sizes) else None


def _tar_scale(shards: list[InputShard], picked: list[InputShard]) -> float:
    """Tars scale by bytes: 3 sampled of 8 tars of 128 samples and one of 4, the short one among them,
    scaled by count predicted 693 rows for 900. By count only where sizes are unknown."""
    total, sampled = _input_bytes(shards), _input_bytes(picked)
    return total / sampled if total and sampled else len(shards) / len(picked)


def _hours(family: Family, setting: str, rows: int) -> dict:
    rates = MEASURED_RATES.get(family.name, {})
    return {kind: rows / by[setting] / 3600 for kind, by in rates.items() if setting in by}


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_plan(p: dict) -> str:
    in_bytes = f" ({_size(p['input_bytes'])})" if p.get("input_bytes") else ""
    sampled_bytes = f", {_size(p['sampled_bytes'])}" if p.get("sampled_bytes") else ""
    lines = [f"input          {p['input_shards']} input shards{in_bytes}; sampled {p['sampled_shards']} "
             f"({p['sampled_samples']} samples, {p['sampled_rows']} would be rows{sampled_bytes})",
             f"rows           {p['rows']:,} expected",
             f"below --min-size {p['min_size']}: {100 * p['below_min_size']:.1f}% of the sampled images"]
    if p.get("captions_per_row", 1) > 1:   # the encode hours below count one caption a row
        lines.append(f"captions       {p['captions_per_row']:.2f} a row in the sample (each encoded once)")
    if p["skipped"]:
        lines.append(f"skipped        {sum(p['skipped'].values())} in the sample:")
        examples = p.get("skipped_examples", {})
        lines += [f"  {k} {v}{named_skips(v, examples.get(k, []))}" for k, v in p["skipped"].items()]
    lines.append(f"{'text setting':<16}{'bytes/sample':>14}{'total':>12}   encode time (GPU kinds measured in "
                 "docs/BENCHMARKS.md)")
    chosen = f"padded-{p['text_max_length']}" if p["text_mode"] == "padded" else "trimmed"
    for name, m in p["modes"].items():
        hours = ", ".join(f"{kind}: {h:.2f} h" for kind, h in m["encode_hours"].items()) or "not measured"
        note = f" ({RATE_NOTES[name]})" if name in RATE_NOTES and m["encode_hours"] else ""
        mark = " *" if name == chosen else ""
        lines.append(f"{name + mark:<16}{_size(m['bytes_per_sample']):>14}{_size(m['total_bytes']):>12}   {hours}{note}")
    lines.append(f"* the chosen text mode ({p['family']})")
    if p.get("text_precision", "bf16") != "bf16":   # the rates above were measured with the bf16 text encoder
        lines.append(f"text precision {p['text_precision']} (encode times measured in bf16)")
    return "\n".join(lines)
