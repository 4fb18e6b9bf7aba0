"""Every stage's settings, one way: a tree of dataclasses, filled from YAML and `--section.key value`
overrides, checked by pydantic (types, `Literal` choices, unknown keys) before anything is built.

YAML is read as YAML 1.2 (the version DVC writes params.yaml in): only true/false are booleans, so
`precision: no` is the string "no", and a bool field still takes yes/no/on/off (pydantic reads them).
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import os
import re
import tokenize
import typing
from pathlib import Path

import pydantic
import yaml


class ConfigError(ValueError):
    """A config value or key that is not understood; the message names it."""


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans (true/false), not 1.1's yes/no/on/off."""


Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))


def read_yaml(text: str):
    return yaml.load(text, Loader=Yaml12Loader)


def load_section(path, section: str, bare_ok: bool = True) -> dict:
    """The mapping in YAML file `path`: its `section` (a pipeline's params.yaml, whose other sections
    belong to other stages) or, where it has none and `bare_ok`, the whole file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        tree = read_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not YAML ({' '.join(str(e).split())})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a config is a mapping of sections")
    if section in tree:
        tree = tree[section] or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: its {section} section is not a mapping")
    elif not bare_ok:
        raise ConfigError(f"{path}: no {section} section")
    return tree


def set_dotted(tree: dict, dotted: str, value) -> None:
    """tree['a']['b'] = value for 'a.b' (paths given as Path objects become strings)."""
    *parents, key = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part!r} is a value, not a section")
        node = child
    node[key] = os.fspath(value) if isinstance(value, os.PathLike) else value


_CHECKED: set[type] = set()


def _forbid_unknown_keys(cls: type) -> None:
    """Mark `cls` and its nested dataclasses for pydantic: an unknown key is an error."""
    if cls in _CHECKED:
        return
    cls.__pydantic_config__ = pydantic.ConfigDict(extra="forbid", coerce_numbers_to_str=True)
    _CHECKED.add(cls)
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            _forbid_unknown_keys(tp)


def build(cls: type, tree: dict, where: str = ""):
    """An instance of dataclass `cls` from `tree` (nested mappings), every value checked against its
    field's type; a ConfigError naming each bad key otherwise."""
    _forbid_unknown_keys(cls)
    try:
        return pydantic.TypeAdapter(cls).validate_python(tree)
    except pydantic.ValidationError as e:
        problems = [_describe(cls, err) for err in e.errors()]
        raise ConfigError((f"{where}: " if where else "") + "; ".join(problems)) from None


def _describe(cls: type, err: dict) -> str:
    dotted = ".".join(str(p) for p in err["loc"])
    if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        owner = _owner(cls, err["loc"][:-1])
        if owner is None:
            return f"unknown config key {dotted!r}"
        kind = "section" if owner is cls else "key"
        known = ", ".join(f.name for f in dataclasses.fields(owner))
        return f"unknown config {kind} {dotted!r}; {'.'.join(map(str, err['loc'][:-1])) or 'the config'} has {known}"
    return f"{dotted}: {err['msg']} (got {err['input']!r})"


def _owner(cls: type, loc: tuple):
    for part in loc:
        hints = typing.get_type_hints(cls)
        cls = hints.get(part) if isinstance(part, str) else None
        if cls is None or not dataclasses.is_dataclass(cls):
            return None
    return cls


def choices(tp) -> tuple | None:
    """The values of a `Literal[...]` type (None for other types)."""
    return typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None


def field_help(cls: type) -> dict[str, str]:
    """Each field's help text: the comments on its line, above it, and the aligned continuation
    lines (`#   ...`) below it, as the dataclasses are written."""
    lines, start = inspect.getsourcelines(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    helps: dict[str, list[str]] = {}
    pending: list[str] = []
    current = None
    for tok in tokenize.generate_tokens(io.StringIO("".join(lines)).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.string in fields:
            current = tok.string
            helps[current] = pending
            pending = []
        elif tok.type == tokenize.COMMENT:
            text = tok.string[1:]
            own_line = not tok.line[:tok.start[1]].strip()
            if not own_line and current:
                helps[current].append(text.strip())
            elif text.startswith("  ") and current:      # an aligned continuation of the field above
                helps[current].append(text.strip())
            else:
                pending.append(text.strip())
    return {name: " ".join(parts) for name, parts in helps.items()}


def run_command(app, argv: list[str] | None, prog_name: str) -> int:
    """Run a typer app as a function: its exit status (2 for a usage error, which it prints as on the
    command line) instead of sys.exit, so that `main(argv) == 0` can be tested."""
    try:
        app(args=argv, prog_name=prog_name)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0
