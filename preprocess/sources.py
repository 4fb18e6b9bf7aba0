"""Input specs and raw samples: webdataset tar shards or a folder of captioned images.

An input spec names tar shards (a path, a glob, a brace pattern like
`cc12m-{00000..02175}.tar`, several joined by `::`; local or any fsspec URL) or a folder
of images with sidecar captions. The unit of work (and of resume) is an `InputShard`: one
tar, or a fixed run of files of a folder. Iterating a shard yields `RawSample`s and
`Skip`s; nothing in here raises on bad data, so one bad shard never stops a run.

A shard's identity comes from the shard alone, never from the rest of the spec or from how
its path was typed: a tar is `{its folder's name}/{its name}` (so two img2dataset folders'
`00000.tar` are two shards), and its rows' keys carry that prefix, so two tars holding the
same sample keys never write a key twice. Its fingerprint (size and mtime, or an object
store's etag) tells a resumed run whether the file was replaced since it was encoded.
"""
from __future__ import annotations

import hashlib
import json
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
from braceexpand import braceexpand
from webdataset.handlers import ignore_and_continue
from webdataset.tariterators import group_by_keys, tar_file_iterator

from .captions import json_captions, split_lines

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
# A sample's caption: the first of these it has (.caption is kohya's; .json's `caption` field is img2dataset's).
CAPTION_EXTS = ("txt", "caption", "json")
TEXT_CAPTION_EXTS = ("txt", "caption")
TAR_EXTS = (".tar", ".tar.gz", ".tgz")
# A folder's files are cut into input shards of this many samples (the resume unit).
FOLDER_SHARD_SAMPLES = 1000

# Skip reasons, as counted in the manifest.
SKIP_BAD_IMAGE = "bad_image"                # truncated, corrupt or random bytes
SKIP_EMPTY_FILE = "empty_file"
SKIP_NO_CAPTION = "no_caption"              # an image without a caption
SKIP_NO_IMAGE = "no_image"                  # a caption without an image
SKIP_BAD_CAPTION = "bad_caption_encoding"   # not UTF-8, or a .json without a caption string
SKIP_TOO_SMALL = "too_small"
SKIP_BOMB = "decompression_bomb"
SKIP_TRUNCATED_TAR = "truncated_tar"        # the sample being read where a tar was cut off
SKIP_BAD_SHARD = "unreadable_shard"         # not a tar at all
SKIP_EMPTY_SHARD = "empty_shard"            # a readable tar without a single member
SKIP_DUPLICATE_KEY = "duplicate_key"
SKIP_SAME_STEM = "same_stem"                # two images of one name (img001.png, img001.jpg): which is meant?
# Skipped samples named per reason (in an input shard's done-record, and in the manifest): enough for a
# user to find the files, bounded for a web-scale input where a reason may count millions.
SKIP_EXAMPLES = 20


@dataclass(frozen=True)
class InputShard:
    id: str                  # stable, unique, file-name safe: names the done-record and output shards
    url: str                 # tar path/URL, or the folder
    files: tuple = ()        # folder shards: the sample keys (relative paths without extension)
    namespace: str = ""      # tar shards: `folder/name`, the prefix of their rows' keys
    # What a replaced file changes: size and mtime (or an object store's etag); see _fingerprint.
    fingerprint: dict = field(default_factory=dict, compare=False, hash=False)

    def content(self) -> str | None:
        """A folder shard's sample list, for its done-record: its id is a position in the sorted
        file list, so the same id can come to mean other files if the folder changes."""
        if not self.files:
            return None
        return "files-sha256:" + hashlib.sha256("\n".join(self.files).encode()).hexdigest()

    def row_key(self, key: str) -> str:
        """The cache key of one of this shard's samples (unique in the cache)."""
        return f"{self.namespace}/{key}" if self.namespace else key


@dataclass
class RawSample:
    key: str
    files: dict = field(default_factory=dict)   # extension (lower case) -> bytes


@dataclass(frozen=True)
class Skip:
    key: str
    reason: str


class InputError(Exception):
    """An input spec that names nothing usable."""


def _expand_braces(spec: str) -> list[str]:
    """Shell-style braces (`x-{00000..00009}.tar`, `{a,b}`, nested), as webdataset expands shard lists;
    a spec whose braces do not pair is a literal name."""
    try:
        return list(braceexpand(spec))
    except ValueError:   # unbalanced braces
        return [spec]


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "shard"


_TAR_SUFFIX = re.compile(r"\.(tar|tar\.gz|tgz)$")
# fsspec info fields that change when an object is replaced, most specific first.
_VERSION_FIELDS = ("ETag", "etag", "md5Hash", "md5", "crc32c", "generation", "mtime", "LastModified",
                   "last_modified", "updated", "created")


def _fingerprint(info: dict) -> dict:
    """Size and the first version field fsspec reports (local files: mtime), JSON-ready."""
    out = {"size": info.get("size")}
    for name in _VERSION_FIELDS:
        if info.get(name) is not None:
            value = info[name]
            out[name] = value if isinstance(value, (int, float, str)) else str(value)
            break
    return out


def _tar_shard(url: str, fs_path: str, info: dict) -> InputShard:
    """A tar's shard, named by its folder and file name: the same file however its path is typed
    (fs_path is absolute for local files), and two folders' same-named tars are two shards."""
    folder, _, name = fs_path.rstrip("/").rpartition("/")
    parent = folder.rpartition("/")[2]
    stem = _TAR_SUFFIX.sub("", name)
    namespace = f"{parent}/{stem}" if parent else stem
    return InputShard(id=_safe_id(namespace), url=url, namespace=namespace, fingerprint=_fingerprint(info))


def _check_unique(shards: list[InputShard], spec: str) -> None:
    seen: dict[str, InputShard] = {}
    for s in shards:
        if s.id in seen and seen[s.id].url == s.url:
            raise InputError(f"{spec}: names {s.url} twice")
        if s.id in seen:
            raise InputError(f"{spec}: {seen[s.id].url} and {s.url} would be the same input shard {s.id!r} "
                             "(same folder and file name); rename one of the folders")
        seen[s.id] = s


def resolve_inputs(spec: str, folder_shard_samples: int = FOLDER_SHARD_SAMPLES,
                   references: int = 0) -> list[InputShard]:
    """The input shards an input spec names, in a stable order (sorted as given).

    A folder holding .tar files means those shards; any other folder is read as images with
    sidecar captions (with `references`, its reference folders hold no samples: references.py)."""
    parts = [p for p in spec.split("::") if p]
    if not parts:
        raise InputError("empty input spec")
    if len(parts) == 1 and "://" not in parts[0] and Path(parts[0]).is_dir():
        folder = Path(parts[0])
        if not any(folder.glob("*.tar")):
            return _folder_shards(folder, folder_shard_samples, references)
        parts = [str(folder / "*.tar")]   # a folder of tar shards (what `flux-prep demo-data` writes)
    shards: list[InputShard] = []
    for part in parts:
        for pattern in _expand_braces(part):
            shards += _tar_shards(pattern)
    _check_unique(shards, spec)
    return shards


def _tar_shards(pattern: str) -> list[InputShard]:
    """The tar shards one pattern names (a path or a glob; local or a URL)."""
    fs, path = fsspec.core.url_to_fs(pattern)
    if any(c in path for c in "*?["):
        found = fs.glob(path, detail=True)
        if not found:
            raise InputError(f"{pattern}: matches no files")
        return [_tar_shard(fs.unstrip_protocol(p) if "://" in pattern else p, p, found[p]) for p in sorted(found)]
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise InputError(f"{pattern}: no such file") from None
    return [_tar_shard(pattern, path, info)]


# kohya's sd-scripts read `train_data_dir/10_dog/` as the images of "dog", repeated 10 times an epoch.
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


def repeat_folder_warning(spec: str) -> str | None:
    """A warning naming the folders of a folder input that are named as kohya's repeat folders: their
    repeat counts are not honoured (a repeat is a sampling weight, not data to encode again)."""
    folder = Path(spec)
    if "::" in spec or "://" in spec or not folder.is_dir() or any(folder.glob("*.tar")):
        return None
    named = [p for p in [folder, *sorted(folder.iterdir())] if p.is_dir() and _REPEAT_FOLDER.match(p.name)]
    if not named:
        return None
    listed = ", ".join(f"{p} ({_REPEAT_FOLDER.match(p.name).group(1)} repeats)" for p in named)
    return (f"{listed}: named as kohya repeat folders (N_name); their repeat counts are ignored: each image is one "
            "row, and the trainer samples every row alike (copy a folder's images to give them more weight)")


MASKS_FOLDER = "masks"   # a folder's loss masks (encode --masks): `masks/STEM.png` beside the images


def _folder_shards(folder: Path, per_shard: int, references: int = 0) -> list[InputShard]:
    from .references import is_reference_folder
    by_key: dict[str, list[tuple[str, int, int]]] = {}   # key -> (file name, size, mtime) of its files
    side: dict[str, list[tuple[str, int, int]]] = {}     # an image's key -> its mask's and references' files
    for p in folder.rglob("*"):
        rel = p.relative_to(folder).with_suffix("")
        in_refs = references and any(is_reference_folder(part) for part in rel.parts[:-1])
        if p.suffix[1:].lower() in IMAGE_EXTS + CAPTION_EXTS and not p.name.startswith(".") and p.is_file():
            st = p.stat()
            # a mask or reference: no sample of its own; a changed one changes its sample's fingerprint
            if rel.parent.name == MASKS_FOLDER or (in_refs and is_reference_folder(rel.parent.name)):
                side.setdefault(str(rel.parent.parent / rel.name), []).append(
                    (f"{rel.parent.name}/{p.name}", st.st_size, st.st_mtime_ns))
            elif not in_refs:
                by_key.setdefault(str(rel), []).append((p.name, st.st_size, st.st_mtime_ns))
    for key in side.keys() & by_key.keys():
        by_key[key] += side[key]
    keys = sorted(by_key)
    if not keys:
        raise InputError(f"{folder}: no images or captions in this folder")
    base = _safe_id(folder.resolve().name)
    shards = []
    for i in range(0, len(keys), per_shard):
        run = keys[i:i + per_shard]
        stats = hashlib.sha256(json.dumps([sorted(by_key[k]) for k in run]).encode()).hexdigest()
        shards.append(InputShard(id=f"{base}-{i // per_shard:05d}", url=str(folder), files=tuple(run),
                                 fingerprint={"files_stat_sha256": stats}))
    return shards


def skipped_name(shard: InputShard, key: str, files=()) -> str:
    """A skipped sample as a user finds it: its key as the cache would have it (a tar's carries the tar's
    prefix) and its files' extensions, `sub/img001 (jpg, txt)`; a whole unreadable tar by its URL."""
    if key == shard.url:
        return key
    name = shard.row_key(key)
    return f"{name} ({', '.join(sorted(files))})" if files else name


def add_example(examples: dict[str, list[str]], reason: str, name: str) -> None:
    """Keep `name` among the first SKIP_EXAMPLES of its reason."""
    kept = examples.setdefault(reason, [])
    if len(kept) < SKIP_EXAMPLES:
        kept.append(name)


def named_skips(count: int, names: list[str]) -> str:
    """What follows a skip reason's count: `: a (jpg, txt), b (png)`, saying so where not all are named."""
    if not names:
        return ""
    return (f" (the first {len(names)} named)" if len(names) < count else "") + ": " + ", ".join(names)


def split_key(name: str) -> tuple[str, str]:
    """webdataset's convention: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def iter_shard(shard: InputShard, references: int = 0):
    """Yield RawSample and Skip items of one input shard, never raising on bad data. With `references`, a
    folder's samples carry their reference folders' files (a tar's carry their `.ref` members anyway)."""
    if shard.files:
        yield from _iter_folder(shard, references)
    else:
        yield from _iter_tar(shard.url)


def _iter_folder(shard: InputShard, references: int = 0):
    """A folder's samples: a file's key is its path without its last suffix, as _folder_shards lists
    them (`photo.v2.jpg` is `photo.v2`; webdataset's first-dot rule is for tar members)."""
    from .masks import add_folder_mask
    from .references import add_folder_references
    folder = Path(shard.url)
    listings: dict[Path, dict[str, list[Path]]] = {}   # each sub-folder listed once per shard
    ref_dirs: dict[Path, list[Path]] = {}              # and its reference folders (references.py)
    for key in shard.files:
        parent = (folder / key).parent
        if parent not in listings:
            by_stem: dict[str, list[Path]] = {}
            for p in parent.iterdir():
                if p.is_file():
                    by_stem.setdefault(p.stem, []).append(p)
            listings[parent] = by_stem
        sample = RawSample(key=key)
        for p in listings[parent].get(Path(key).name, []):
            try:
                sample.files[p.suffix[1:].lower()] = p.read_bytes()
            except OSError:
                continue    # vanished or unreadable: counted below as a missing part
        add_folder_mask(sample.files, parent / MASKS_FOLDER / Path(key).name)
        if references:
            add_folder_references(sample.files, parent, Path(key).name, ref_dirs)
        yield sample


# What damaged data raises while a tar is read (anything else, an OSError above all, is not the data's fault).
_DAMAGED = (tarfile.TarError, EOFError, zlib.error)


class _TarReading:
    """The handler of one tar's webdataset iteration: damaged data ends the shard and is kept, to be
    counted as one skip; any other error (a missing file, a network failure) propagates, so the shard
    is not marked done and a rerun tries it again. It also notes the key of the member being read."""

    def __init__(self):
        self.error: BaseException | None = None
        self.member_key: str | None = None   # the key of the last member started

    def __call__(self, exn: BaseException) -> bool:
        if not isinstance(exn, _DAMAGED):
            raise exn
        self.error = exn
        return False                          # stop reading this tar

    def select(self, name: str) -> bool:
        """Every member is read; webdataset asks before reading one, which names the sample being read."""
        self.member_key = split_key(name)[0]
        return True


def _iter_tar(url: str):
    """The tar's samples (webdataset's member iteration and grouping by key). A tar cut off mid-way
    ends the shard: the samples read completely before the cut count, the one being read is skipped
    as truncated."""
    reading, seen = _TarReading(), set()
    try:
        with fsspec.open(url, "rb") as raw:
            files = tar_file_iterator(raw, skip_meta=None, handler=reading, select_files=reading.select)
            for group in group_by_keys(({**f, "__url__": url} for f in files), keys=split_key,
                                       handler=ignore_and_continue):
                sample = RawSample(key=group["__key__"],
                                   files={k: v for k, v in group.items() if not k.startswith("__")})
                if reading.error is not None and sample.key == reading.member_key:
                    break                     # the sample being read at the cut: skipped below
                yield _dedupe(sample, seen)
    except _DAMAGED as e:                     # raised between members (a header), or opening a non-tar
        reading.error = e
    if reading.error is not None:
        if reading.member_key is None:
            yield Skip(key=url, reason=_shard_error_reason(reading.error))
        else:
            yield Skip(key=reading.member_key, reason=SKIP_TRUNCATED_TAR)
    elif reading.member_key is None:
        yield Skip(key=url, reason=SKIP_EMPTY_SHARD)   # counted, so the shard is named as yielding nothing


def _shard_error_reason(e: BaseException) -> str:
    msg = str(e).lower()
    return SKIP_TRUNCATED_TAR if ("unexpected end" in msg or isinstance(e, EOFError)) else SKIP_BAD_SHARD


def _dedupe(sample: RawSample, seen: set[str]):
    if sample.key in seen:
        return Skip(key=sample.key, reason=SKIP_DUPLICATE_KEY)
    seen.add(sample.key)
    return sample


def read_captions(files: dict) -> tuple[list[str] | None, str | None]:
    """(captions, None) or (None, skip reason): from .txt, else .caption (a caption a non-empty line), else the
    `caption` field of .json, a string or a list (CAPTION_EXTS; captions.py); a UTF-8 byte-order mark
    (Windows Notepad writes one) is not part of it."""
    for ext in TEXT_CAPTION_EXTS:
        if ext in files:
            captions, why = split_lines(files[ext])
            return captions, {"bad": SKIP_BAD_CAPTION, "empty": SKIP_EMPTY_FILE, None: None}[why]
    if "json" in files:
        captions, why = json_captions(files["json"])
        return captions, {"bad": SKIP_BAD_CAPTION, "none": SKIP_NO_CAPTION, None: None}[why]
    return None, SKIP_NO_CAPTION


def read_caption(files: dict) -> tuple[str | None, str | None]:
    """The first of read_captions' captions (the one a single-caption cache stores), or a skip reason."""
    captions, why = read_captions(files)
    return (captions[0] if captions else None), why


def image_bytes(files: dict) -> tuple[bytes | None, str | None]:
    """The sample's image bytes, or a skip reason. Two images of one name are skipped (same_stem), both:
    one caption cannot say which it describes, and keeping either would silently drop the other."""
    found = [ext for ext in IMAGE_EXTS if ext in files]
    if len(found) > 1:
        return None, SKIP_SAME_STEM
    if not found:
        return None, SKIP_NO_IMAGE
    data = files[found[0]]
    return (data, None) if data else (None, SKIP_EMPTY_FILE)
