"""Recipes: YAML over the argument dataclasses, with a `base` chain, type checks, and flags that override it.

A recipe may name a `base` recipe (a path relative to itself) whose keys it overrides. Command-line flags override
the recipe: `train.py recipes/cot.yaml --learning_rate 1e-5 --output_dir outputs/try`.
"""

import argparse
import enum
import os
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path

import yaml

from mmcoconut.errors import UserFileNotFoundError, UserValueError, shorten
from mmcoconut.preflight import require_extra
from mmcoconut.training.arguments import RECIPE_DATACLASSES, SetupError

# Values a recipe may hold once its YAML aliases are expanded (the shipped recipes hold under 100). PyYAML builds an
# alias once and shares it, so a "billion laughs" recipe loads at once and explodes only when something walks it
# (a type check, an error message, `config.json`); it is refused here instead.
MAX_RECIPE_VALUES = 10_000


def read_recipe(path, _chain=()):
    """The recipe at `path` merged over its `base` chain (later keys win)."""
    path = Path(path)
    chain = (*_chain, path)
    if path.resolve() in {link.resolve() for link in _chain}:
        raise UserValueError(f"recipe base chain loops: {' -> '.join(map(str, chain))}")
    if not path.is_file():
        raise UserFileNotFoundError(f"recipe {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            recipe = yaml.safe_load(f) or {}  # safe_load: `!!python/...` tags are refused, never run
    except yaml.YAMLError as error:
        raise UserValueError(f"{path}: not a valid recipe ({' '.join(str(error).split())})") from None
    if not isinstance(recipe, dict):
        raise UserValueError(f"{path}: a recipe must be a YAML mapping, got {type(recipe).__name__}")
    check_recipe_size(recipe, path)
    base = recipe.pop("base", None)
    if base is None:
        return recipe
    if not isinstance(base, str):
        raise UserValueError(f"{path}: base must be a recipe path, got {shorten(base)}")
    if not (path.parent / base).is_file():
        raise UserFileNotFoundError(f"{path}: base recipe {path.parent / base} not found")
    return {**read_recipe(path.parent / base, chain), **recipe}


def check_recipe_size(recipe, source, limit=MAX_RECIPE_VALUES):
    """Refuse a recipe whose values, with every YAML alias expanded, number more than `limit`; the walk stops at
    `limit`, so it costs at most that many steps whatever the recipe holds."""
    count, stack = 0, [recipe]
    while stack:
        value = stack.pop()
        count += 1
        if count > limit:
            raise UserValueError(
                f"{source}: the recipe expands to more than {limit:,} values (YAML aliases `*name` repeat what an "
                "anchor `&name` holds); write the values out"
            )
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)


def _type_name(hint):
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return f"one of {[member.value for member in hint]}"
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))


def _accepts(hint, value):
    """Whether a YAML value fits a dataclass field's type (classes we do not know are left to the dataclass)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in args)
    if origin is typing.Literal:
        return value in args
    if hint is typing.Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, hint) or value in {member.value for member in hint}
    if hint is list or origin is list:
        return isinstance(value, list) and (not args or all(_accepts(args[0], item) for item in value))
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    return True


def check_recipe_types(recipe, dataclass_types, source):
    """Every recipe value must fit its field's type, before it becomes a parser default.

    argparse converts only string defaults (YAML's `1e-3` is one, and stays valid); anything else would reach
    the run unchecked: `c_thought: 1.5` crashed in the DataLoader, `learning_rate: [1, 2]` inside AdamW.
    """
    hints = {}
    for dataclass_type in dataclass_types:
        hints.update(typing.get_type_hints(dataclass_type))
    problems = [
        f"{key}: {shorten(value)} is {type(value).__name__}, expected {_type_name(hints[key])}"
        for key, value in recipe.items()
        if not isinstance(value, str) and not _accepts(hints[key], value)
    ]
    if problems:
        raise UserValueError(f"{source}: wrong recipe value types: " + "; ".join(problems))


USAGE = "train.py RECIPE.yaml [--field value ...]"


def help_parser():
    """`train.py --help`: every field of our four dataclasses with its default, without importing transformers."""
    parser = argparse.ArgumentParser(
        prog="train.py",
        usage=USAGE,
        description="Train MMCoconut on a recipe: `accelerate launch train.py recipes/coconut.yaml`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Every field of transformers' TrainingArguments is a recipe key and a flag too (output_dir, "
               "num_train_epochs, learning_rate, per_device_train_batch_size, bf16, eval_strategy, save_strategy, "
               "report_to, ...): `train.py RECIPE.yaml --help` lists all of them with that recipe's values as "
               "defaults.",
    )
    for dataclass_type in RECIPE_DATACLASSES:
        group = parser.add_argument_group(dataclass_type.__name__)
        for f in fields(dataclass_type):
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            group.add_argument(f"--{f.name}", default=default, help=f.metadata.get("help", "").replace("%", "%%"))
    return parser


TRAINING_ARGUMENTS_DOCS = "https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments"


def recipe_help_parser(recipe_path):
    """`train.py RECIPE.yaml --help`: `help_parser` with the recipe's values as defaults, plus the TrainingArguments
    keys the recipe sets. Without transformers (importing it takes seconds): transformers' own reference lists the
    other TrainingArguments fields, each of which is a flag too."""
    recipe = read_recipe(recipe_path)
    parser = help_parser()
    parser.usage = f"train.py {recipe_path} [--field value ...]"
    ours = {action.dest for action in parser._actions}
    parser.set_defaults(**{key: value for key, value in recipe.items() if key in ours})
    group = parser.add_argument_group("TrainingArguments set by this recipe")
    for key, value in recipe.items():
        if key not in ours:
            group.add_argument(f"--{key}", default=value, help="as set by the recipe")
    parser.epilog = (
        f"Every other field of transformers' TrainingArguments is a flag too, with transformers' default: "
        f"{TRAINING_ARGUMENTS_DOCS}"
    )
    return parser


def parse_args(argv):
    if argv and argv[0] in ("-h", "--help"):
        help_parser().print_help()
        raise SystemExit(0)
    if not argv or not argv[0].endswith((".yaml", ".yml")):
        raise SystemExit(f"usage: {USAGE}\n(train.py --help lists the fields)")
    if "-h" in argv[1:] or "--help" in argv[1:]:
        recipe_help_parser(argv[0]).print_help()
        raise SystemExit(0)
    # Imported here, not at the top: this module is the torch-free help path of `train.py` (docs/architecture.md).
    from transformers import HfArgumentParser

    from trainer_curriculum import CurriculumTrainingArguments

    parser = HfArgumentParser((*RECIPE_DATACLASSES, CurriculumTrainingArguments))
    recipe = read_recipe(argv[0])
    check_deepspeed_installed(recipe, argv[1:])
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise UserValueError(f"{argv[0]}: unknown recipe keys {shorten(unknown, 200)}")
    if isinstance(recipe.get("resume_from_checkpoint"), bool):  # YAML `true`: TrainingArguments holds a string
        recipe["resume_from_checkpoint"] = str(recipe["resume_from_checkpoint"]).lower()
    check_recipe_types(recipe, parser.dataclass_types, argv[0])
    # The recipe becomes the defaults, so flags given after it override it.
    for action in parser._actions:
        if action.dest in recipe:
            action.required = False
    parser.set_defaults(**recipe)
    check_device_support(parser.parse_known_args(argv[1:])[0], argv[0])
    return parser.parse_args_into_dataclasses(args=argv[1:])


def check_deepspeed_installed(recipe, flags):
    """A DeepSpeed run (`deepspeed` in the recipe or the flags, or an accelerate DeepSpeed config) needs the
    `deepspeed` extra; without it, building the TrainingArguments fails with an unrelated TypeError."""
    launched = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if recipe.get("deepspeed") or any(flag.split("=")[0] == "--deepspeed" for flag in flags) or launched:
        require_extra("deepspeed", "DeepSpeed (the recipe's deepspeed, or an accelerate DeepSpeed config)")


def check_device_support(args, recipe_path):
    """A recipe that trains in bf16 needs a GPU: say so (and how to run it on CPU) before anything is loaded."""
    import torch

    if (args.bf16 or args.bf16_full_eval) and not args.use_cpu and not torch.cuda.is_available():
        raise SetupError(
            f"{recipe_path} trains in bf16 (`bf16: true`), which needs a GPU, and torch sees none; run it on a GPU, "
            "or on CPU (slow) add `--bf16 false --use_cpu true`"
        )


__all__ = [
    "USAGE", "MAX_RECIPE_VALUES", "read_recipe", "check_recipe_size", "check_recipe_types", "help_parser", "recipe_help_parser", "parse_args",
    "check_deepspeed_installed", "check_device_support",
]
