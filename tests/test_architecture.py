"""The import rules of docs/architecture.md, checked on the source: a broken rule is a failing test, not a review note.

- modeling_mmcoconut and configuration_mmcoconut (remote code on the Hub) import nothing of the project but each other;
- no module imports an entry script (train, evaluate_aokvqa) and nothing edits sys.path;
- the layers import downwards only (e.g. data never imports training, evaluation, inference, analysis or cli);
- the library (mmcoconut outside cli, the card's modules) never imports a command from mmcoconut.cli.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = {"mmcoconut", "configuration_mmcoconut", "modeling_mmcoconut", "pipeline_mmcoconut", "data_collator", "trainer_curriculum", "train",
        "evaluate_aokvqa", "benchmarks", "experiments", "tests"}
ENTRY_SCRIPTS = {"train", "evaluate_aokvqa"}
# layer → the project modules it may not import (prefix match)
HEAVY = ("torch", "transformers", "datasets", "peft", "accelerate")
FORBIDDEN = {
    "mmcoconut.constants": ("mmcoconut.", "configuration_mmcoconut", "modeling_mmcoconut"),
    "mmcoconut.errors": ("mmcoconut.", "configuration_mmcoconut", "modeling_mmcoconut", *HEAVY),
    # the checks before loading: the standard library, mmcoconut.constants (the request bounds) and mmcoconut.errors
    # (huggingface_hub and PIL inside functions)
    "mmcoconut.preflight": ("mmcoconut.modes", "mmcoconut.text", "mmcoconut.data",
                            "mmcoconut.processing", "mmcoconut.conversion", "mmcoconut.training",
                            "mmcoconut.evaluation", "mmcoconut.inference", "mmcoconut.analysis", "mmcoconut.cli",
                            "mmcoconut.app", "configuration_mmcoconut", "modeling_mmcoconut", *HEAVY),
    "mmcoconut.modes": ("mmcoconut.", "configuration_mmcoconut", "modeling_mmcoconut"),
    "mmcoconut.text": ("mmcoconut.data", "mmcoconut.training", "mmcoconut.evaluation", "mmcoconut.inference",
                       "mmcoconut.analysis", "mmcoconut.cli", "modeling_mmcoconut"),
    "mmcoconut.data": ("mmcoconut.training", "mmcoconut.evaluation", "mmcoconut.inference", "mmcoconut.analysis",
                       "mmcoconut.cli", "trainer_curriculum"),
    "mmcoconut.evaluation": ("mmcoconut.training", "mmcoconut.analysis", "mmcoconut.cli", "trainer_curriculum"),
    "mmcoconut.inference": ("mmcoconut.training", "mmcoconut.evaluation", "mmcoconut.cli", "trainer_curriculum"),
    "mmcoconut.analysis": ("mmcoconut.training", "mmcoconut.evaluation", "mmcoconut.cli", "trainer_curriculum"),
    "mmcoconut.training": ("mmcoconut.cli",),
    # plug-ins for other tools (lmms-eval): they drive inference, as a command does, but are not commands
    "mmcoconut.integrations": ("mmcoconut.training", "mmcoconut.analysis", "mmcoconut.cli", "trainer_curriculum"),
}


def _modules():
    for path in sorted(REPO.glob("*.py")) + sorted(REPO.glob("mmcoconut/**/*.py")) + sorted(
        REPO.glob("experiments/*.py")
    ) + sorted(REPO.glob("benchmarks/*.py")) + sorted(REPO.glob("tests/*.py")):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        yield name, path


def _imports(path):
    """Every module name an import statement in `path` names (function-level ones too)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


MODULES = dict(_modules())


@pytest.mark.parametrize("name", ["modeling_mmcoconut", "configuration_mmcoconut", "pipeline_mmcoconut"])
def test_remote_code_imports_nothing_of_ours_but_each_other(name):
    allowed = {"modeling_mmcoconut", "configuration_mmcoconut", "pipeline_mmcoconut"}
    ours = {i for i in _imports(MODULES[name]) if i.split(".")[0] in OURS - allowed}
    assert not ours, f"{name} imports {sorted(ours)}"


def test_no_module_imports_an_entry_script_or_edits_sys_path():
    for name, path in MODULES.items():
        roots = {i.split(".")[0] for i in _imports(path)}
        assert not roots & ENTRY_SCRIPTS, f"{name} imports {sorted(roots & ENTRY_SCRIPTS)}"
        if name != "tests.test_architecture":
            assert "sys.path.insert" not in path.read_text() and "sys.path.append" not in path.read_text(), name


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_downwards_only(layer):
    for name, path in MODULES.items():
        if name != layer and not name.startswith(layer + "."):
            continue
        bad = [i for i in _imports(path) if i.startswith(FORBIDDEN[layer]) and not i.startswith(name)]
        assert not bad, f"{name} imports {bad}"


def test_the_library_never_imports_a_command():
    """Commands (mmcoconut.cli) are called by the entry scripts, experiments, benchmarks and tests, never by the
    library or the card's flat modules."""
    for name, path in MODULES.items():
        if not name.startswith("mmcoconut") and name not in ("data_collator", "trainer_curriculum"):
            continue
        if name.startswith("mmcoconut.cli"):
            continue
        bad = [i for i in _imports(path) if i.startswith("mmcoconut.cli") and i != "mmcoconut.cli.help"
               and not i.startswith("mmcoconut.cli.help.")]
        assert not bad, f"{name} imports {bad}"
