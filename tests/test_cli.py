"""Quick CLIs: every command-line tool answers `--help` without importing torch, and shows its defaults; the
values the parsers name without importing their modules stay equal to those modules' own."""

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
    ("path", "analyze_latents.py"),
    ("path", "synthetic_data.py"),
    ("path", "convert_internvl_chat.py"),
    ("path", "predict.py"),
    ("path", "app.py"),
    ("path", "probe_latents.py"),
    ("path", "experiments/learning_curve.py"),
    ("path", "experiments/adaptive_thinking.py"),
    ("path", "experiments/step_time_by_vocabulary.py"),
    ("module", "benchmarks.bench_train_step"),
    ("module", "benchmarks.bench_generate"),
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


def test_train_help_lists_every_recipe_field_with_its_default():
    import train

    proc = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    for dataclass_type in train.RECIPE_DATACLASSES:
        for f in train.fields(dataclass_type):
            assert f"--{f.name}" in text, f.name
    assert "--c_thought C_THOUGHT Continuous thoughts per replaced reasoning step. (default: 2)" in text
    assert "train.py RECIPE.yaml --help" in text  # where the TrainingArguments fields are listed


def test_train_recipe_help_still_lists_the_training_arguments():
    proc = subprocess.run(
        [sys.executable, "train.py", "recipes/demo.yaml", "--help"], cwd=REPO, capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--learning_rate" in proc.stdout and "--tiny_internvl" in proc.stdout


def test_names_the_parsers_hold_equal_their_modules():
    from mmcoconut.evaluation import aokvqa as aokvqa_evaluation
    from mmcoconut.analysis import attention as analyze_latents
    from mmcoconut.data import aokvqa as data_aokvqa
    from mmcoconut.data import curriculum as data_curriculum
    import evaluate_aokvqa
    import train

    assert train.DATA_SOURCES == (*data_aokvqa.SOURCES, "synthetic")
    assert train.MODES == data_curriculum.MODES
    assert evaluate_aokvqa.EVAL_MODES == aokvqa_evaluation.EVAL_MODES
    assert evaluate_aokvqa.DEFAULT_MAX_NEW_TOKENS == aokvqa_evaluation.DEFAULT_MAX_NEW_TOKENS
    assert evaluate_aokvqa.HF_AOKVQA_ID == data_aokvqa.HF_AOKVQA_ID
    assert analyze_latents.DTYPE_NAMES == tuple(analyze_latents.DTYPES)
    import app
    from mmcoconut import inference as predict

    assert predict.DTYPE_NAMES == tuple(predict.DTYPES)
    assert (app.QUANTIZATIONS, app.DTYPE_NAMES) == (predict.QUANTIZATIONS, predict.DTYPE_NAMES)
