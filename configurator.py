"""
A typed dataclass config from the command line (as nanoGPT's configurator.py, without exec):
    python dpo.py --config=config/toy_dpo.py --beta=0.2   # the file, then --key=value on top
A config file is `key = value` lines of python literals; it is parsed, never executed. A typo lists
the valid keys, a wrong type names the key and its type; --help lists the fields and their comments.
"""
import ast
import dataclasses
import difflib
import inspect
import math
import os
import re
import sys


def _convert(key, text, typ):
    if typ is bool:
        if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise ValueError(f"--{key}={text}: expected a bool (true/false/1/0)")
        return text.lower() in ("1", "true", "yes")
    try:
        value = typ(text)
    except ValueError:
        raise ValueError(f"--{key}={text}: expected {typ.__name__}") from None
    if typ is float and not math.isfinite(value):  # nan passes every < and > check after
        raise ValueError(f"--{key}={value}: expected a finite number")
    return value


def _check_key(key, types, where):
    if key in types:
        return
    close = difflib.get_close_matches(key, types, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    if key == "mode":  # the old dpo.py --mode=sample|compare|demo
        hint = " (sampling, compare and the demo moved: python sample.py --mode=sample|compare|demo, same options)"
    raise ValueError(f"{where}: unknown config key '{key}'{hint}. valid keys: {', '.join(types)}")


def read_config_file(path, types):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} not found")
    try:
        tree = ast.parse(open(path).read(), filename=path)
    except SyntaxError as e:
        where = f"{path}:{e.lineno}"
        raise ValueError(f"{where}: syntax error ({e.msg}); expected `key = value` lines") from None
    out = {}
    for node in tree.body:
        where = f"{path}:{node.lineno}"
        names = node.targets if isinstance(node, ast.Assign) else []
        if len(names) != 1 or not isinstance(names[0], ast.Name):
            raise ValueError(f"{where}: expected `key = value`")
        key = names[0].id
        _check_key(key, types, where)
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            raise ValueError(f"{where}: the value of {key} must be a literal (number, string, bool)") from None
        if types[key] is float and type(value) is int:
            value = float(value)
        if type(value) is not types[key]:
            got = f"{type(value).__name__} {value!r}"
            raise ValueError(f"{where}: {key} expects {types[key].__name__}, got {got}")
        if type(value) is float and not math.isfinite(value):  # 1e999 is a literal: inf
            raise ValueError(f"{where}: {key} expects a finite number, got {value!r}")
        out[key] = value
    return out


# a field line of a config dataclass (`    name: type = default  # comment`) or a section comment
FIELD = re.compile(r"^    (\w+): \w+ = (.+?)(?:  # (.*))?$|^    # (.*)$", re.M)


def help_text(cls):
    """the fields with their defaults and comments, read from the dataclass source"""
    lines = [f"usage: python {os.path.basename(sys.argv[0])} [--config=FILE] [--key=value ...]"]
    if not cls.__doc__.startswith(f"{cls.__name__}("):  # written, not the dataclass's signature
        lines.append(cls.__doc__.strip())
    listed = set()  # an option a subclass overrides: once, with the subclass's default and comment
    for c in cls.__mro__:  # a subclass's own options first
        if not dataclasses.is_dataclass(c):
            continue
        for name, default, comment, section in FIELD.findall(inspect.getsource(c)):
            if name in listed:
                continue
            if name:
                listed.add(name)
                value = default.strip('"')
                lines.append(f"  --{name}={value}".ljust(36) + comment)
            else:
                lines.append(f"{section}:")
    return "\n".join(lines)


def parse(argv, cls, defaults=None):
    """--config=FILE first, then --key=value overrides on top -> an instance of the dataclass cls.
    defaults: a dict that replaces the dataclass's own defaults, e.g. a saved run's config"""
    if "-h" in argv or "--help" in argv:
        print(help_text(cls))
        sys.exit(0)
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    cfg = cls(**{k: v for k, v in (defaults or {}).items() if k in types})
    pairs = []
    for arg in argv:
        key, eq, value = arg[2:].partition("=")
        if not arg.startswith("--") or not eq:
            raise ValueError(f"expected --key=value, got '{arg}' (--help lists the options)")
        pairs.append((key, value))
    # the --config file first, so the command line's own --key=value wins
    for key, value in sorted(pairs, key=lambda kv: kv[0] != "config"):
        if key == "config":
            for k, v in read_config_file(value, types).items():
                setattr(cfg, k, v)
        else:
            _check_key(key, types, "command line")
            setattr(cfg, key, _convert(key, value, types[key]))
    return cfg
