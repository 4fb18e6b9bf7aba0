"""Every stage's settings, one way: each stage reads its own section of a YAML file (params.yaml's
`train`, `encode`, `sample`) through load_section. The trainer's is a tree of dataclasses, filled from
it and `--section.key value` overrides, checked by pydantic (types, `Literal` choices, unknown keys)
before anything is built; encode's and sample's are their commands' options (config_option).

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
from typing import Optional

import pydantic
import typer
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


# ctx.meta key: what --config gave, for config_flags.
_FROM_FILE = "shared.params.from_file"


def config_option(section: str):
    """A typer command's `--config FILE` option: FILE's `section` (or the whole file, where it has
    none) gives the command's options, each key an option's long name with _ for - (`batch_size: 8`
    is `--batch-size 8`). Flags given on the command line win; each value goes through its option's
    own type; an unknown key is refused. Click's default_map does the filling, so the command's
    parameters stay the one list of what it takes. (Recent typer runs its own copy of click, whose
    classes are not click's: they are duck-typed here.)"""
    def fill(ctx: typer.Context, param: typer.CallbackParam, value: Optional[Path]):
        if value is not None:
            try:
                fill_options_from_file(ctx, value, section)
            except ConfigError as e:
                raise typer.BadParameter(str(e), ctx=ctx, param=param) from None
        return value

    return typer.Option(None, "--config", is_eager=True, callback=fill, metavar="FILE",
                        help=f"YAML file whose {section} section (or the whole file, where it has none) gives "
                             "this command's options: each key an option's name with _ for - (batch_size: 8 "
                             "= --batch-size 8; a list for a repeatable one; null: the option's default). "
                             "Flags given here override it; dvc.yaml passes params.yaml.")


def option_keys(command) -> dict[str, tuple[object, str]]:
    """Each config key a command takes: its options' long names with _ for - (aliases too), with the
    option and the name the key stands for; --config itself is no key."""
    keys = {}
    for param in command.params:
        if param.param_type_name == "option" and param.name != "config":
            for opt in param.opts:
                if opt.startswith("--"):
                    keys[opt[2:].replace("-", "_")] = (param, opt)
    return keys


def fill_options_from_file(ctx: typer.Context, path, section: str) -> None:
    """Make file `path`'s `section` the defaults of ctx's options (ctx.default_map), each value
    checked by its option's type here so that an error names the file and the key."""
    tree = load_section(path, section)
    keys = option_keys(ctx.command)
    defaults, given, from_file = {}, {}, []
    for key, value in tree.items():
        if key not in keys:
            raise ConfigError(f"{path}: unknown key {key!r} in the {section} section; "
                              f"{ctx.info_name} takes {', '.join(sorted(keys))}")
        param, opt = keys[key]
        if param.name in given:
            raise ConfigError(f"{path}: {section}.{given[param.name]} and {section}.{key} are one option ({opt})")
        given[param.name] = key
        if value is None:            # the option's own default
            continue
        texts = _option_text(ctx, param, value, f"{path}: {section}.{key}")
        defaults[param.name] = texts
        from_file.append((param, opt, texts))
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    ctx.meta[_FROM_FILE] = from_file


def _option_text(ctx: typer.Context, param, value, where: str):
    """`value` as the command line would give it (a string, or a list of them for a repeatable
    option: one value is a list of one), refused unless the option takes it as it would the flag's
    (its process_value: type, range, choices). A number goes as its text, so that 1.5 is no integer."""
    values = value if isinstance(value, list) and param.multiple else [value]
    if isinstance(value, list) and not param.multiple:
        raise ConfigError(f"{where}: one value, not a list (got {value!r})")
    if any(isinstance(v, (list, dict)) for v in values):
        raise ConfigError(f"{where}: not a single value (got {value!r})")
    texts = [("true" if v else "false") if isinstance(v, bool) else str(v) for v in values]
    given = texts if param.multiple else texts[0]
    try:
        param.process_value(ctx, given)
    except typer.BadParameter as e:
        raise ConfigError(f"{where}: {e.message} (got {value!r})") from None
    return given


def config_flags(ctx: typer.Context) -> list[str]:
    """The flags that --config's file gave and the command line did not override, in the file's
    order: what it added to the command line."""
    flags = []
    for param, opt, given in ctx.meta.get(_FROM_FILE, []):
        source = ctx.get_parameter_source(param.name)
        if source is None or source.name != "DEFAULT_MAP":
            continue
        if param.is_flag and param.is_bool_flag:
            flags += [opt] if param.process_value(ctx, given) else param.secondary_opts[:1]
        else:
            for text in (given if param.multiple else [given]):
                flags += [opt, text]
    return flags
