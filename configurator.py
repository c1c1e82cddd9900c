"""
A typed dataclass config from the command line (as nanoGPT's configurator.py, without exec):
    python dpo.py --config=config/toy_dpo.py --beta=0.2     # the file first, then --key=value on top
A config file is `key = value` lines of python literals; it is parsed, never executed. A typo lists the valid
keys, a wrong type names the key and its type, --help lists the fields with their comments.
"""
import ast
import dataclasses
import difflib
import inspect
import os
import re
import sys


def _convert(key, text, typ):
    if typ is bool:
        if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise ValueError(f"--{key}={text}: expected a bool (true/false/1/0)")
        return text.lower() in ("1", "true", "yes")
    try:
        return typ(text)
    except ValueError:
        raise ValueError(f"--{key}={text}: expected {typ.__name__}") from None


def _check_key(key, types, where):
    if key not in types:
        close = difflib.get_close_matches(key, types, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        if key == "mode" and "mode" not in types:  # the old dpo.py --mode=sample|compare|demo
            hint = " (sampling, compare and the demo moved: python sample.py --mode=sample|compare|demo, same options)"
        raise ValueError(f"{where}: unknown config key '{key}'{hint}. valid keys: {', '.join(types)}")


def read_config_file(path, types):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} not found")
    try:
        tree = ast.parse(open(path).read(), filename=path)
    except SyntaxError as e:
        raise ValueError(f"{path}:{e.lineno}: syntax error ({e.msg}); expected `key = value` lines") from None
    out = {}
    for node in tree.body:
        where = f"{path}:{node.lineno}"
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise ValueError(f"{where}: expected `key = value`")
        key = node.targets[0].id
        _check_key(key, types, where)
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            raise ValueError(f"{where}: the value of {key} must be a literal (number, string, bool)") from None
        if types[key] is float and type(value) is int:
            value = float(value)
        if type(value) is not types[key]:
            raise ValueError(f"{where}: {key} expects {types[key].__name__}, got {type(value).__name__} {value!r}")
        out[key] = value
    return out


def help_text(cls):
    """the fields with their defaults and comments, read from the dataclass source"""
    lines = [f"usage: python {os.path.basename(sys.argv[0])} [--config=FILE] [--key=value ...]"]
    if not cls.__doc__.startswith(f"{cls.__name__}("):  # a written docstring, not the dataclass's signature
        lines.append(cls.__doc__.strip())
    for c in cls.__mro__:  # a subclass's own options first
        if dataclasses.is_dataclass(c):
            for m in re.finditer(r"^    (\w+): \w+ = (.+?)(?:  # (.*))?$|^    # (.*)$", inspect.getsource(c), re.M):
                lines.append(f"  --{m[1]}={m[2].strip(chr(34))}".ljust(36) + (m[3] or "") if m[1] else f"{m[4]}:")
    return "\n".join(lines)


def parse(argv, cls, defaults=None):
    """--config=FILE first, then --key=value overrides on top -> an instance of the dataclass cls. defaults: values
    (a dict) that replace the dataclass's own defaults, e.g. a saved run's config"""
    if "-h" in argv or "--help" in argv:
        print(help_text(cls))
        sys.exit(0)
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    cfg, pairs = cls(**{k: v for k, v in (defaults or {}).items() if k in types}), []
    for arg in argv:
        key, eq, value = arg[2:].partition("=")
        if not arg.startswith("--") or not eq:
            raise ValueError(f"expected --key=value, got '{arg}' (--help lists the options)")
        pairs.append((key, value))
    for key, value in sorted(pairs, key=lambda kv: kv[0] != "config"):  # the file first: the command line wins
        if key == "config":
            for k, v in read_config_file(value, types).items():
                setattr(cfg, k, v)
        else:
            _check_key(key, types, "command line")
            setattr(cfg, key, _convert(key, value, types[key]))
    return cfg
