"""Recipe files and `key=value` overrides -> a validated Config, with errors a user can act on.

    cfg = load_config(["recipe=it_4b", "distill.lr=1e-5", "model.student.source=/ckpt/gemma-3-4b-pt"])

A recipe is `recipes/NAME.yaml` (or a path to any .yaml file). It may start with `base: OTHER`
to inherit another recipe: mappings merge key by key, anything else (lists included) is
replaced. Overrides are dotted keys; values are YAML (`tracking.tags=[a,b]`,
`model.teacher=null`, `rewards.0.weight=0.5`) and replace the value at that key.

Every error is a `UserError` naming the key, where it came from, the rule and the fix; unknown
keys get the closest known key. `describe_keys()` is what `python train.py --help` prints.
The schema itself lives in config.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ValidationError

from .config import RECIPES_DIR, Config
from .errors import UserError
from .model import GemmaConfig

# ----------------------------------------------------------------------------- schema walking

def _unwrap(annotation: Any) -> Any:
    """Strip Optional[...] and Annotated[...] down to the type that holds the value."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def all_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, sections included ('distill', 'distill.lr', ...)."""
    keys = []
    for name, field in model.model_fields.items():
        key = prefix + name
        keys.append(key)
        inner = _unwrap(field.annotation)
        if _is_model(inner):
            keys += all_keys(inner, key + ".")
        elif name == "arch":
            keys += [f"{key}.{f.name}" for f in dataclasses.fields(GemmaConfig) if f.name not in ("layer_types", "vision")]
    return keys


def _suggest(key: str) -> str:
    """'; did you mean ...?' for an unknown dotted key: a sibling when the parent is known, else any key."""
    parts = key.split(".")
    close = []
    if len(parts) > 1:
        try:
            parent = _unwrap(_leaf_type(parts[:-1]))
        except UserError:
            parent = None
        if _is_model(parent):
            close = [".".join(parts[:-1] + [m]) for m in difflib.get_close_matches(parts[-1], parent.model_fields, n=1)]
    close = close or difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else "; see `python train.py --help` for all keys"


def _leaf_type(parts: list[str]) -> Any:
    """The annotation at a dotted key; raises UserError for keys the schema does not have.

    Dict-valued fields (arch, options, ds_config) accept any sub-key here; their own
    validators check them. List fields take an integer index: rewards.0.weight.
    """
    annotation: Any = Config
    for i, part in enumerate(parts):
        inner = _unwrap(annotation)
        origin = typing.get_origin(inner)
        if _is_model(inner):
            if part not in inner.model_fields:
                key = ".".join(parts)
                raise UserError(f"unknown key '{key}'{_suggest(key)}")
            annotation = inner.model_fields[part].annotation
        elif origin is dict:
            return Any
        elif origin is list:
            if not part.isdigit():
                raise UserError(f"'{'.'.join(parts[:i])}' is a list; index it with a number, e.g. "
                                f"{'.'.join(parts[:i])}.0, or replace the whole list")
            annotation = typing.get_args(inner)[0]
        else:
            key = ".".join(parts)
            raise UserError(f"unknown key '{key}': '{'.'.join(parts[:i])}' is a value, not a section{_suggest(key)}")
    return annotation


def describe_keys() -> str:
    """One line per key: `key (type, default): description`, for --help."""
    lines = []

    def walk(model: type[BaseModel], prefix: str, defaults: Any) -> None:
        for name, field in model.model_fields.items():
            key, inner = prefix + name, _unwrap(field.annotation)
            if defaults is not None:
                default = getattr(defaults, name)
            else:
                default = field.get_default(call_default_factory=True)
            if _is_model(inner):
                lines.append(f"{key}: {field.description}")
                walk(inner, key + ".", default if isinstance(default, BaseModel) else None)
                continue
            shown = default.model_dump(mode="json") if isinstance(default, BaseModel) else default
            if isinstance(shown, list) and shown and isinstance(shown[0], BaseModel):
                shown = [s.model_dump(mode="json") for s in shown]
            type_name = re.sub(r"typing\.|posttrain\.config\.|<class '|'>", "", str(field.annotation))
            lines.append(f"  {key} ({type_name} = {shown!r}): {field.description}")

    walk(Config, "", Config.model_construct())
    return "\n".join(lines)


# ----------------------------------------------------------------------------- loading

class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-5 as a float (YAML 1.1 insists on 1.0e-5)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_value(text: str) -> Any:
    """A command-line value, read as YAML: '1e-5' -> 1e-05, '[a,b]' -> ['a', 'b'], 'null' -> None."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"value {text!r} is not valid YAML ({problem}); fix: quote it in the shell, e.g. "
                        "'rewards=[{name: math, weight: 1.0}]'") from None


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def _recipe_path(recipe: str, relative_to: Path | None = None) -> Path:
    if recipe.endswith((".yaml", ".yml")) or os.sep in recipe:
        path = Path(recipe).expanduser()
        if not path.is_absolute() and relative_to is not None and not path.exists():
            path = relative_to / path
        if not path.is_file():
            raise UserError(f"recipe file '{recipe}' does not exist; fix: give a .yaml path or one of "
                            f"{', '.join(available_recipes())}")
        return path
    path = RECIPES_DIR / f"{recipe}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(recipe, available_recipes(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"unknown recipe '{recipe}'{hint}; available: {', '.join(available_recipes())} "
                        f"(in {RECIPES_DIR}), or recipe=path/to/file.yaml")
    return path


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{where}: YAML syntax error ({problem}); fix: check indentation, colons and quoting "
                        "there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a mapping of keys to values, got {type(data).__name__}")
    return data


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_recipe(recipe: str, _seen: tuple[Path, ...] = ()) -> tuple[dict, Path]:
    """The raw mapping of a recipe, its `base` chain merged in (the recipe's own keys win)."""
    path = _recipe_path(recipe, _seen[-1].parent if _seen else None).resolve()
    if path in _seen:
        chain = " -> ".join(p.name for p in (*_seen, path))
        raise UserError(f"recipe inheritance loops: {chain}; fix: remove one of the `base:` keys")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data, path
    if not isinstance(base, str):
        raise UserError(f"{path}: `base` must be a recipe name or .yaml path, got {base!r}")
    parent, _ = read_recipe(base, (*_seen, path))
    return _deep_merge(parent, data), path


def _set(raw: dict, parts: list[str], value: Any, arg: str) -> None:
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            index = int(part)
            if index >= len(node):
                raise UserError(f"{arg}: '{'.'.join(parts[:i])}' has {len(node)} entries, so there is no "
                                f"entry {index}; fix: replace the whole list, e.g. {'.'.join(parts[:i])}=[...]")
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if last:
            node[part] = value
        else:
            # A section that is null (model.teacher: null) or absent becomes a fresh mapping.
            if not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            node = node[part]


def apply_overrides(raw: dict, args: list[str]) -> dict[str, str]:
    """Apply `key=value` arguments to a raw config mapping in place; returns key -> argument."""
    origins = {}
    for arg in args:
        key, sep, text = arg.partition("=")
        key = key.strip()
        if not sep:
            example = f"{arg}=<value>" if arg in all_keys() else "distill.lr=1e-5"
            raise UserError(f"argument '{arg}' is not key=value; fix: write it as {example} (no spaces "
                            "around '=')")
        if key.startswith("-") or not key:
            raise UserError(f"argument '{arg}': keys are written without dashes; fix: e.g. distill.lr=1e-5")
        parts = key.split(".")
        annotation = _unwrap(_leaf_type(parts))
        try:
            value = parse_value(text)
        except UserError as e:
            raise UserError(f"argument '{arg}': {e}") from None
        # A string field keeps the text as typed, so name=2024 or run_name=1.10 stay strings.
        if annotation is str and value is not None:
            value = text
        _set(raw, parts, value, arg)
        origins[key] = arg
    return origins


_EXPECTED = {
    "int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
    "string_type": "a string", "list_type": "a list, e.g. [a, b]", "dict_type": "a mapping, e.g. {k: v}",
    "model_type": "a mapping of its keys", "missing": "a value (it is required)",
}


def _example(key: str) -> str | None:
    """`key=<default>` when the key has a scalar default, for the fix part of a message."""
    node: Any = Config.model_construct()
    for part in key.split("."):
        if not isinstance(node, BaseModel) or part not in type(node).model_fields:
            return None
        node = getattr(node, part)
    if isinstance(node, (bool, int, float, str)):
        return f"{key}={str(node).lower() if isinstance(node, bool) else node} (the default)"
    return None


def _explain(errors: list[dict], origins: dict[str, str], recipe: Path | None) -> str:
    lines = []
    for err in errors:
        key = ".".join(str(p) for p in err["loc"])
        args = [a for k, a in origins.items() if key and (key == k or key.startswith(k + ".") or k.startswith(key + "."))]
        if args:
            where = f"command line {' '.join(repr(a) for a in args)}"
        else:
            where = f"recipe {recipe}" if recipe else "config"
            if origins and not key:  # a rule across keys: any override may be the cause
                where += f" with {' '.join(repr(a) for a in origins.values())}"
        value = err.get("input")
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}' ({where}){_suggest(key)}")
        elif err["type"] == "missing":
            lines.append(f"'{key}' is required ({where}) but missing; fix: set {key}=...")
        elif err["type"] == "value_error":
            message = str(err["msg"]).removeprefix("Value error, ")
            prefix = f"{key}: " if key and key + "." not in message else ""
            lines.append(f"{prefix}{message} ({where})")
        else:
            expected = _EXPECTED.get(err["type"]) or str(err["msg"]).replace("Input should be", "").strip()
            if err["type"] == "literal_error":
                expected = "one of " + expected
            elif err["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
                expected = "a value " + expected
            elif err["type"] == "string_pattern_mismatch":
                expected = "a name of letters, digits, '.', '_' and '-'"
            got = f"{value!r} ({type(value).__name__})" if not isinstance(value, (dict, list)) else \
                type(value).__name__
            fix = _example(key) or f"{key}=<{expected}>"
            lines.append(f"'{key}' expects {expected}, got {got} ({where}); fix: e.g. {fix}")
    return "\n".join(lines)


def build_config(raw: dict, origins: dict[str, str] | None = None, recipe: Path | None = None) -> Config:
    """Validate a raw mapping into a Config; every problem becomes one line of a UserError."""
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise UserError(_explain(e.errors(), origins or {}, recipe)) from None


def load_config(argv: list[str]) -> Config:
    """Config from command-line arguments: `recipe=NAME_OR_PATH` plus dotted `key=value` overrides."""
    recipes = [a for a in argv if a.startswith("recipe=")]
    if not recipes:
        raise UserError(f"no recipe given; fix: add recipe=NAME (one of {', '.join(available_recipes())}) "
                        "or recipe=path/to/file.yaml")
    if len(recipes) > 1:
        raise UserError(f"give one recipe, got {', '.join(recipes)}")
    raw, path = read_recipe(recipes[0].partition("=")[2])
    raw.setdefault("name", path.stem)
    origins = apply_overrides(raw, [a for a in argv if not a.startswith("recipe=")])
    return build_config(raw, origins, path)


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML, in schema order; load_config(["recipe=<it>"]) reproduces it."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=None, width=100)


def print_config(cfg: Config) -> None:
    print(f"# resolved config: {cfg.name}\n{config_yaml(cfg)}", end="", flush=True)


def save_config(cfg: Config, run_dir: str | Path | None = None) -> Path:
    """Write resolved_config.yaml into run_dir (default: cfg.out_dir) and return its path."""
    out = Path(run_dir) if run_dir is not None else cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    path = out / "resolved_config.yaml"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(config_yaml(cfg))
    os.replace(tmp, path)
    return path


__all__ = [
    "load_config", "build_config", "read_recipe", "apply_overrides", "parse_value", "available_recipes",
    "all_keys", "describe_keys", "config_yaml", "print_config", "save_config",
]
