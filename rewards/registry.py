"""Where reward names come from: a plain dict, a decorator, entry points, and dotted paths.

`get(name, **options)` looks a name up in this order:

1. `REGISTRY`, a plain dict: the built-ins (as lazy "module:attr" strings, so `import rewards`
   never imports Math-Verify) and whatever `@register("name")` added.
2. Entry points in the group `posttrain.rewards` of installed packages. A package declares
       [project.entry-points."posttrain.rewards"]
       toxicity = "my_pkg.rewards:ToxicityReward"
3. `package.module:attr` (imported) or `path/to/file.py:attr` (loaded from the file; a relative
   path is relative to the working directory).

Anything else is a `UserError` that lists every valid name. The object found may be a function
(options are bound as keyword arguments) or a class (instantiated with the options); either way
the result is called as `reward(prompts, completions, **columns) -> list[float | None]`.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from posttrain.errors import UserError

from .base import ON_ERROR, CombinedReward

ENTRY_POINT_GROUP = "posttrain.rewards"

# Built-ins are "module:attr" strings, imported on first use. `reward_model` is the learned (WARM)
# reward model the warm stage writes: options {path: runs/<name>/warm/reward_model}.
REGISTRY: dict[str, Any] = {
    "math": "rewards.math:MathReward",
    "format": "rewards.math:answer_format",
    "code": "rewards.code:CodeReward",
    "safety": "rewards.safety:SafetyReward",
    "reward_model": "rewards.model:RewardModelReward",
}


def register(name: str) -> Callable[[Any], Any]:
    """Decorator: make a reward function or class available to recipes under `name`.

        @rewards.register("brevity")
        def brevity(prompts, completions, max_chars=200, **columns):
            return [1.0 if len(c) <= max_chars else 0.0 for c in completions]

    The module must be imported before the recipe is resolved (or name it as `file.py:attr`).
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"reward names are non-empty strings without ':', got {name!r}")

    def deco(obj: Any) -> Any:
        if not callable(obj):
            raise TypeError(f"@register({name!r}) needs a function or a class, got {type(obj).__name__}")
        REGISTRY[name] = obj
        return obj

    return deco


def _entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available() -> list[str]:
    """Every name `get` accepts without a path: the registry and installed entry points."""
    return sorted(set(REGISTRY) | set(_entry_points()))


def _load_path(ref: str) -> Any:
    """'pkg.module:attr' or 'path/to/file.py:attr' -> the attribute."""
    where, _, attr = ref.rpartition(":")
    if not where or not attr:
        raise UserError(f"reward '{ref}' must look like 'package.module:attr' or 'path/to/file.py:attr'")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise UserError(f"reward '{ref}': file {path} does not exist (relative paths start at "
                            f"the working directory)")
        # one module per file, named after its path, so loading it twice gives the same objects
        mod_name = f"_posttrain_reward_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        module = sys.modules.get(mod_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[mod_name]
                raise
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            if e.name and where.startswith(e.name):  # the named module itself, not one it imports
                raise UserError(f"reward '{ref}': no module named '{where}'; is the package "
                                f"installed, or did you mean a file path ending in .py?") from None
            raise
    try:
        return getattr(module, attr)
    except AttributeError:
        names = [n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n))]
        close = difflib.get_close_matches(attr, names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; callables there: {', '.join(sorted(names)) or 'none'}"
        raise UserError(f"reward '{ref}': {where} has no attribute '{attr}'{hint}") from None


def resolve(name: str) -> Any:
    """The function or class a reward name refers to (not yet instantiated)."""
    if not isinstance(name, str) or not name:
        raise UserError(f"reward name must be a non-empty string, got {name!r}")
    if name in REGISTRY:
        obj = REGISTRY[name]
        return _load_path(obj) if isinstance(obj, str) else obj
    eps = _entry_points()
    if name in eps:
        return eps[name].load()
    if ":" in name:
        return _load_path(name)
    valid = available()
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise UserError(f"unknown reward '{name}'; {hint}valid names: {', '.join(valid)}; or give "
                    f"'package.module:attr' or 'path/to/file.py:attr'")


def get(name: str, **options: Any) -> Callable[..., list]:
    """The reward called `name`, ready to call: `(prompts, completions, **columns) -> list[float | None]`.

    A class is instantiated with `options`; a function gets them bound as keyword arguments.
    Options the reward does not accept are a UserError naming them and the accepted ones.

        >>> r = get("format")
        >>> r(["What is 2 + 2?"], ["2 + 2 = 4. Answer: 4"])
        [1.0]
    """
    obj = _checked(name, options)
    if inspect.isclass(obj):
        return obj(**options)
    if options:
        bound = functools.partial(obj, **options)
        functools.update_wrapper(bound, obj)
        return bound
    return obj


def check_spec(name: str, options: Mapping[str, Any] | None = None) -> None:
    """What `get(name, **options)` checks, without building the reward: the name resolves to a function
    or class, and the options are ones it accepts. A UserError otherwise (the config check at read time)."""
    _checked(name, options or {})


def _checked(name: str, options: Mapping[str, Any]) -> Any:
    obj = resolve(name)
    if not callable(obj):
        raise UserError(f"reward '{name}' is a {type(obj).__name__}, not a function or a class")
    if options:
        _check_options(name, obj, options)
    return obj


def _check_options(name: str, obj: Any, options: Mapping[str, Any]) -> None:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    params = sig.parameters
    # a class taking **options checks them itself; a function's **columns receives dataset
    # columns, so its options must be named parameters (a typo is then an error, not ignored)
    if inspect.isclass(obj) and any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    accepted = [p for p, v in params.items() if v.kind in (v.KEYWORD_ONLY, v.POSITIONAL_OR_KEYWORD)
                and p not in ("self", "prompts", "completions")]
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise UserError(f"reward '{name}' has no option(s) {', '.join(map(repr, unknown))}; its options: "
                        f"{', '.join(accepted) or 'none'}")


def metric_key(name: str) -> str:
    """Short name for metrics: 'math' -> 'math', 'my_pkg.rewards:Toxicity' / 'x/y.py:brevity' -> the attr."""
    return name.rpartition(":")[2] if ":" in name else name


def from_config(specs: Sequence[Any]) -> CombinedReward:
    """A recipe's `rewards:` list -> one CombinedReward (weighted sum, deadlines, metrics).

    Each spec is a `posttrain.config.RewardSpec` or a dict with the same keys:
    `{name, weight=1.0, options={}, timeout_s=10.0, on_error="skip"}`.

        >>> combined = from_config([{"name": "format", "weight": 0.5}])
        >>> combined(["What is 2 + 2?"], ["Answer: 4"])
        [0.5]
    """
    defaults = {"weight": 1.0, "options": {}, "timeout_s": 10.0, "on_error": "skip"}
    members = []
    for i, spec in enumerate(specs):
        spec = spec.model_dump() if hasattr(spec, "model_dump") else dict(spec)
        if "name" not in spec:
            raise UserError(f"rewards.{i} has no name; e.g. {{name: math, weight: 1.0}}")
        unknown = set(spec) - set(defaults) - {"name"}
        if unknown:
            raise UserError(f"rewards.{i} ({spec['name']}) has unknown key(s) {sorted(unknown)}; "
                            f"keys: name, {', '.join(defaults)}")
        spec = {**defaults, **spec}
        if spec["on_error"] not in ON_ERROR:
            raise UserError(f"rewards.{i}.on_error must be one of {', '.join(ON_ERROR)}, got {spec['on_error']!r}")
        if not isinstance(spec["timeout_s"], (int, float)) or spec["timeout_s"] <= 0:
            raise UserError(f"rewards.{i}.timeout_s must be a positive number of seconds, got {spec['timeout_s']!r}")
        fn = get(spec["name"], **(spec["options"] or {}))
        key = metric_key(spec["name"])
        if key in [m[0] for m in members]:
            key = f"{key}_{i}"
        members.append((key, fn, float(spec["weight"]), float(spec["timeout_s"]), spec["on_error"]))
    return CombinedReward(members)
