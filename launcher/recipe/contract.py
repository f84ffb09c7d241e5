"""The recipe contract: load a recipe file, check it, and turn its Hparams into flags.

A recipe is a Python file with

    @dataclass
    class Hparams: ...                  # every field is a flag; batch_size and epochs are required
    def data(hp) -> Splits              # train / val / test datasets
    def model(hp) -> nn.Module
    def loss(hp) -> callable(out, y) -> scalar Tensor (mean over the batch); not needed with step()

and optionally

    def prepare(hp)                     # once per node before any process starts (download, cache)
    def metrics(hp) -> dict[str, torchmetrics.Metric]
    def optimizer(model, hp, total_steps) -> (optimizer, scheduler)
    def step(model, batch, hp)          # the loss of a batch: loss, (loss, count) or {"loss", "count", "preds",
    def eval_step(model, batch, hp)     #   "target"}; the default is loss(hp)(model(x), y); see steps.py
    def sample(model, hp) -> str        # after each validation, on every process: what rank zero shows
    best = ("val/acc", "max")           # the evaluation that picks the best checkpoint; ("val/loss", "min") else
    counts = "tokens"                   # what step()'s count counts: throughput is logged as tokens/s
    find_unused_parameters = True       # DDP: some parameters get no gradient in some steps
    defaults = {"clip_grad": 1.0}       # the launcher's flags as this recipe wants them, unless given

It never learns how many processes, which device or which precision it runs with.
This module knows nothing about devices or ranks either.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import importlib.util
import inspect
import io
import math
import re
import sys
import textwrap
import tokenize
import traceback
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import RecipeError
from ..flags import option

REQUIRED = ("Hparams", "data", "model")
LEARNING_RATE = re.compile(r"lr|\w*_lr|learning_rate")
# every function of the contract, with the arguments the launcher calls it with
FUNCTIONS = {"data": ("hp",), "model": ("hp",), "loss": ("hp",), "prepare": ("hp",), "metrics": ("hp",),
             "optimizer": ("model", "hp", "total_steps"), "step": ("model", "batch", "hp"),
             "eval_step": ("model", "batch", "hp"), "sample": ("model", "hp")}
SETTINGS = {"best": tuple, "counts": str, "find_unused_parameters": bool, "defaults": dict}
REQUIRED_FIELDS = {"batch_size": int, "epochs": int}
# other trainers' hooks: a recipe defining one expects it to be called, and it would not be
FOREIGN = re.compile(r"(training|validation|evaluation|test|predict|train|val)_step|compute_loss|configure_\w+|"
                     r"\w+_dataloader")


@dataclass
class Splits:
    """What a recipe's `data(hp)` returns.

    Each split is a dataset whose samples are tensors or any nesting of tuples, lists,
    dicts and dataclasses of them: (input, target) pairs for the default step. A
    `torch.utils.data.TensorDataset` (any number of tensors) or a dict of equal-length
    tensors is batched by indexing, on the device when it fits: no DataLoader, no
    per-sample Python. Any other map-style dataset goes through a DataLoader with
    `--workers` processes. `train` may be an `IterableDataset` (a stream): see data.py.

    `collate_fn(samples) -> batch` batches samples (padding them, say): one function for
    every split, or {"train": f, "val": g, ...} per split; torch's default_collate else.

    `augment` is applied to every training micro-batch after it reached the device,
    called like the batch: `augment(x, y) -> (x, y)` for (x, y) batches, `augment(batch)
    -> batch` for a dict: batched tensor ops, not per-sample transforms. An augment with
    a parameter named `epoch` is also given the batch's epoch (from 0), keyword.
    """

    train: Any
    val: Any = None
    test: Any = None
    augment: Callable | None = None
    collate_fn: Callable | dict[str, Callable] | None = None


def is_recipe(path: str | Path) -> bool:
    """Whether a Python file is a recipe rather than a training script, from its syntax alone: running it to find
    out would run a script's training (torchrun's scripts train at import). A recipe defines Hparams, or two of
    its functions (data, model, loss, step) at the top level; a file that does not parse is taken for a recipe,
    so that its error is reported as one."""
    try:
        tree = ast.parse(Path(path).read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):
        return True
    named = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            named.add(node.name)
        elif isinstance(node, ast.ClassDef) and node.name == "Hparams":
            return True
        elif isinstance(node, (ast.Import, ast.ImportFrom)) and any(
                (alias.asname or alias.name) == "Hparams" for alias in node.names):
            return True
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "Hparams" for t in node.targets):
            return True
    return len(named & {"data", "model", "loss", "step"}) >= 2


def load(path: str | Path) -> ModuleType:
    """Import a recipe file and check that it has what the launcher needs."""
    path = Path(path).resolve()
    if not path.is_file():
        raise RecipeError(f"recipe {path} not found")
    name = f"recipe_{path.stem}"
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) == str(path):
        return loaded  # checked when it was first loaded (the launcher, then an in-process worker)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RecipeError(f"recipe {path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    # a recipe may import helpers that sit beside it
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    try:
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise RecipeError(f"recipe {path} failed to import: {describe_error(e, path)}") from e
        _check(module, path)
    except RecipeError:
        del sys.modules[name]  # never hand out a module that failed
        raise
    return module


def _check(module: ModuleType, path: Path) -> None:
    missing = [n for n in REQUIRED if not hasattr(module, n)]
    if not hasattr(module, "loss") and not hasattr(module, "step"):
        missing.append("loss")
    if missing:
        raise RecipeError(f"recipe {path} lacks {', '.join(missing)} (a recipe defines {', '.join(REQUIRED)} and "
                          "loss, or a step of its own)")
    if not dataclasses.is_dataclass(module.Hparams):
        raise RecipeError(f"recipe {path}: Hparams must be a @dataclass")
    for name, arguments in FUNCTIONS.items():
        if hasattr(module, name):
            _check_function(getattr(module, name), name, arguments, path)
    for name, kind in SETTINGS.items():
        if hasattr(module, name) and not isinstance(getattr(module, name), kind):
            raise RecipeError(f"recipe {path}: {name} must be a {kind.__name__}, not {getattr(module, name)!r}")
    _check_unknown(module, path)
    hints = _hints(module.Hparams, path)
    for f, typ in REQUIRED_FIELDS.items():
        if hints.get(f) is not typ:
            raise RecipeError(f"recipe {path}: Hparams needs a field `{f}: {typ.__name__}`")
    if not hasattr(module, "optimizer") and hints.get("lr") is not float:
        raise RecipeError(f"recipe {path}: the default optimizer needs a field `lr: float` (or define optimizer())")
    best = getattr(module, "best", ("val/loss", "min"))
    if not (isinstance(best, tuple) and len(best) == 2 and isinstance(best[0], str) and best[1] in ("min", "max")):
        raise RecipeError(f"recipe {path}: best must be (metric, 'min' or 'max'), e.g. ('val/acc', 'max'); "
                          f"not {best!r}")


def _check_function(fn: Any, name: str, arguments: tuple[str, ...], path: Path) -> None:
    """A contract function that the launcher's call would not fit is an error now, not in a worker."""
    called = f"{name}({', '.join(arguments)})"
    if not callable(fn):
        raise RecipeError(f"recipe {path}: {name} must be a function {called}")
    try:
        inspect.signature(fn).bind(*arguments)
    except TypeError:
        shown = f"{name}{inspect.signature(fn)}"
        hint = (": it returns the loss function, e.g. `def loss(hp): return nn.CrossEntropyLoss()`"
                if name == "loss" else "")
        raise RecipeError(f"recipe {path}: {shown} cannot be called as {called}{hint}") from None
    except ValueError:  # no signature to read (a builtin): nothing to check
        pass


def _check_unknown(module: ModuleType, path: Path) -> None:
    """A function of the recipe's own that looks like part of a contract but is not one would be silently
    ignored: a misspelt `metric`, another trainer's `training_step`."""
    contract = list(FUNCTIONS)
    for name, value in vars(module).items():
        if name.startswith("_") or name in FUNCTIONS or not inspect.isfunction(value) \
                or value.__module__ != module.__name__:
            continue
        close = difflib.get_close_matches(name, contract, n=1, cutoff=0.8)
        if close or FOREIGN.fullmatch(name):
            hint = f"did you mean {close[0]}()? " if close else ""
            raise RecipeError(
                f"recipe {path}: {name}() is not part of the recipe contract, so nothing would call it; {hint}a "
                f"recipe defines {', '.join(REQUIRED)}, loss and optionally {', '.join(contract[3:])} "
                f"(docs/recipes.md: Writing a recipe). A helper of your own: start its name with _")


def describe_error(e: BaseException, path: Path) -> str:
    """`Type: message (line N)`, pointing into the recipe for anything but a plain bad-input error."""
    where = ""
    if isinstance(e, SyntaxError) and e.lineno:
        where = f" (line {e.lineno})"
    elif not isinstance(e, (OSError, ValueError)):
        frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename) == path]
        if frames:
            where = f" (line {frames[-1].lineno})"
    return f"{type(e).__name__}: {e}{where}"


def _hints(cls: type, path: Path) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception as e:
        raise RecipeError(f"recipe {path}: cannot read the types of Hparams: {e}") from e


def _parser_for(typ: Any) -> tuple[Callable[[str], Any] | None, list | None, str]:
    """(parse function, choices, shown type) for a field type; parse None means a bool switch."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if typ is bool:
        return None, None, "bool"
    if typ in (int, float, str):
        return typ, None, typ.__name__
    if origin is typing.Literal and len({type(a) for a in args}) == 1 and type(args[0]) in (int, float, str):
        return type(args[0]), list(args), "{" + ",".join(map(str, args)) + "}"
    if args and type(None) in args and len(args) == 2:  # Optional[T]
        inner = next(a for a in args if a is not type(None))
        parse, choices, shown = _parser_for(inner)
        if parse is not None and choices is None:
            return (lambda s: None if s.lower() == "none" else parse(s)), None, f"{shown} or none"
    raise TypeError(typ)


def add_flags(parser: argparse.ArgumentParser, Hparams: type, path: Path) -> None:
    """Every field of Hparams becomes `--field-name`, type-checked, its default shown in --help."""
    group = parser.add_argument_group(f"hyperparameters of {path.name} (Hparams)")
    hints = _hints(Hparams, path)
    comments = field_comments(Hparams)
    for f in dataclasses.fields(Hparams):
        default = _default(f)
        required = default is dataclasses.MISSING
        try:
            parse, choices, shown = _parser_for(hints[f.name])
        except TypeError:
            raise RecipeError(
                f"recipe {path}: Hparams.{f.name} has type {hints[f.name]!r}; "
                "a flag needs int, float, str, bool, a Literal of those, or Optional of int/float/str"
            ) from None
        flag = option(f.name)
        help_text = (f.metadata.get("help") or comments.get(f.name, "")).replace("%", "%%")  # argparse's format
        shown_default = "required" if required else f"default: {default}"
        options = {"dest": f.name, "required": required, "default": None if required else default,
                   "help": f"{help_text + ' ' if help_text else ''}[{shown}, {shown_default}]"}
        if parse is None:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options.update(type=parse, choices=choices, metavar=shown.upper())
        try:
            group.add_argument(flag, **options)
        except argparse.ArgumentError:
            raise RecipeError(f"recipe {path}: Hparams.{f.name} clashes with the launcher's own flag {flag}") from None


def field_comments(cls: type) -> dict[str, str]:
    """The comment of each field of a class, the help text of its flag where field metadata gives none: the one
    at the end of the field's line(s), else the comment lines right above it. {} where the source is not there."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    comments = {}  # line number (from 1) → the comment's text
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    found = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            after = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
            above, n = [], node.lineno - 1
            while n in comments and lines[n - 1].lstrip().startswith("#"):  # a line of its own, not a field's end
                above.insert(0, comments[n])
                n -= 1
            if after or above:
                found[node.target.id] = " ".join(after or above)
    return found


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def hparams(Hparams: type, values: dict[str, Any]) -> Any:
    """Build the recipe's Hparams; its __post_init__ may reject values with ValueError. Whatever the recipe,
    no number may be NaN, and a learning rate (lr, *_lr, learning_rate) is a finite number of at least 0: else
    the optimizer would fail inside every process, or train on NaN."""
    for name, value in values.items():
        flag = option(name)
        if isinstance(value, float) and math.isnan(value):
            raise RecipeError(f"invalid hyperparameters: {flag} is nan; give a number")
        if LEARNING_RATE.fullmatch(name) and isinstance(value, int | float) and not 0 <= value < math.inf:
            raise RecipeError(f"invalid hyperparameters: {flag} is a learning rate: a finite number of at least 0, "
                              f"not {value:g}")
    try:
        return Hparams(**{f.name: values[f.name] for f in dataclasses.fields(Hparams)})
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise RecipeError(f"invalid hyperparameters: {e}") from e
