"""Quick CLIs: every command-line tool answers `--help` without importing torch, and shows its defaults; the
values the parsers name without importing their modules stay equal to those modules' own."""

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "datasets")
# (how to run it, what) for runpy: a script path, or a module name for `python -m`.
CLIS = [
    ("path", "train.py"),
    ("path", "evaluate_aokvqa.py"),
    ("module", "mmcoconut.cli.train"),
    ("module", "mmcoconut.cli.evaluate"),
    ("module", "mmcoconut.cli.analyze"),
    ("module", "mmcoconut.cli.data"),
    ("module", "mmcoconut.cli.convert"),
    ("module", "mmcoconut.cli.predict"),
    ("module", "mmcoconut.cli.app"),
    ("module", "mmcoconut.cli.probe"),
    ("module", "mmcoconut.cli.intervene"),
]
PROBE = """
import runpy, sys
kind, target = sys.argv[1], sys.argv[2]
sys.argv = [target, "--help"]
try:
    runpy.run_path(target, run_name="__main__") if kind == "path" else runpy.run_module(target, run_name="__main__")
except SystemExit as exit:
    code = exit.code
else:
    code = None
heavy = [name for name in {heavy!r} if name in sys.modules]
print("PROBE", code, ",".join(heavy) or "-", file=sys.stderr)
""".format(heavy=HEAVY)


@pytest.mark.parametrize("kind,target", CLIS, ids=[target for _, target in CLIS])
def test_help_answers_without_heavy_imports_and_shows_defaults(kind, target):
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, kind, target], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    probe = proc.stderr.strip().splitlines()[-1].split()
    assert probe[:2] == ["PROBE", "0"], proc.stderr[-2000:]
    assert probe[2] == "-", f"--help imported {probe[2]}"
    assert "(default:" in proc.stdout, proc.stdout[:2000]
    # an option whose help states its default is not followed by argparse's "(default: None)" as well
    assert not re.search(r"\(default: [^)]*\)\s*\(default:", " ".join(proc.stdout.split())), proc.stdout[:3000]


# The experiments and benchmarks are research scripts run from a checkout (`python -m experiments.NAME`), not
# installed commands: they import the library at the top like any module, so their `--help` may load torch; it must
# still answer.
EXPERIMENTS = [
    "experiments.learning_curve", "experiments.adaptive_thinking", "experiments.step_time_by_vocabulary",
    "experiments.thought_supervision", "experiments.graph_search",
    "benchmarks.bench_train_step", "benchmarks.bench_generate", "benchmarks.gpu_check", "benchmarks.bench_quantization",
]


@pytest.mark.parametrize("target", EXPERIMENTS)
def test_experiment_help_answers_and_shows_defaults(target):
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, "module", target], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    probe = proc.stderr.strip().splitlines()[-1].split()
    assert probe[:2] == ["PROBE", "0"], proc.stderr[-2000:]
    assert "(default:" in proc.stdout, proc.stdout[:2000]
    assert not re.search(r"\(default: [^)]*\)\s*\(default:", " ".join(proc.stdout.split())), proc.stdout[:3000]


def test_train_help_lists_every_recipe_field_with_its_default():
    from dataclasses import fields

    from mmcoconut.training.arguments import RECIPE_DATACLASSES

    proc = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    for dataclass_type in RECIPE_DATACLASSES:
        for f in fields(dataclass_type):
            assert f"--{f.name}" in text, f.name
    assert "--c_thought C_THOUGHT Continuous thoughts per replaced reasoning step. (default: 2)" in text
    assert "train.py RECIPE.yaml --help" in text  # where the TrainingArguments fields are listed


def test_train_recipe_help_lists_the_recipes_values_without_heavy_imports():
    """`train.py RECIPE --help` (also after other flags): our fields with the recipe's values as defaults, the
    TrainingArguments keys the recipe sets, and where the others are documented; without importing torch."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, "path", "train.py"], cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    recipe_help = PROBE.replace('[target, "--help"]', '[target, "recipes/tiny.yaml", "--seed", "3", "--help"]')
    proc = subprocess.run(
        [sys.executable, "-c", recipe_help, "path", "train.py"], cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    probe = proc.stderr.strip().splitlines()[-1].split()
    assert probe[:3] == ["PROBE", "0", "-"], proc.stderr[-2000:]
    text = " ".join(proc.stdout.split())
    assert "--learning_rate LEARNING_RATE as set by the recipe (default: 0.002)" in text
    assert "--c_thought C_THOUGHT Continuous thoughts per replaced reasoning step. (default: 1)" in text
    assert "TrainingArguments" in text and "huggingface.co/docs/transformers" in text


def test_the_one_copy_of_thinking_modes_equals_the_models():
    """modeling_mmcoconut is remote code and may import nothing of the package, so the CLIs' choices for
    `--thinking` (mmcoconut.constants, torch-free) are the one constant kept in two places."""
    import modeling_mmcoconut
    from mmcoconut import constants

    assert constants.THINKING_MODES == modeling_mmcoconut.THINKING_MODES


def _parsers():
    """(name, parser) of every command (train.py: its `--help` parser of the recipe fields)."""
    from mmcoconut.cli import analyze, app, convert, data, evaluate, predict, probe
    from mmcoconut.training.recipe import help_parser

    commands = {"analyze": analyze, "app": app, "convert": convert, "data": data, "evaluate": evaluate,
                "predict": predict, "probe": probe}
    return [(name, module.build_parser()) for name, module in commands.items()] + [("train", help_parser())]


PARSERS = _parsers()


@pytest.mark.parametrize("name, parser", PARSERS, ids=[name for name, _ in PARSERS])
def test_every_option_has_help_and_shows_one_default_at_most(name, parser):
    """Every option says what it does; a required option shows no default (it is never used), an option shows one
    default at most (`--device`: not its own "default: cuda ..." and argparse's "(default: None)" as well), and
    every command but train.py has `--debug` (train.py: MMCOCONUT_DEBUG=1, since TrainingArguments owns `--debug`)."""
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        option = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{name} {option} has no help text"
        shown = formatter._expand_help(action)  # as --help prints it, defaults filled in
        if action.required:
            assert "default" not in shown.lower(), f"{name} {option} is required but shows a default: {shown!r}"
        assert shown.lower().count("default:") <= 1, f"{name} {option} shows two defaults: {shown!r}"
    if name != "train":
        assert "--debug" in parser._option_string_actions, name
