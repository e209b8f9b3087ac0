"""README.md is executable: its command blocks run as written (`make readme-check`, slow) and every block that the
check does not run says why on its fence line."""

from pathlib import Path

import pytest

from tests import readme_check

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_bash_block_runs_or_names_why_not():
    blocks = readme_check.parse_blocks(README.read_text(encoding="utf-8"))
    assert blocks[0].title.startswith("make demo") and blocks[0].skip is None
    for block in blocks:
        block.command()  # every override applies
        if block.skip is not None:
            assert any(word in block.skip for word in ("GPU", "Hub")), (block.line, block.skip)
    ran = " ".join(block.script for block in blocks if block.skip is None)
    for command in ("train.py recipes/demo.yaml --use_lora true", "--num_processes 2 train.py recipes/demo.yaml",
                    "analyze_latents.py --model outputs/demo", "evaluate_aokvqa.py --model outputs/demo"):
        assert command in ran, command


def test_markers_skip_or_override_a_block():
    text = "\n".join([
        "```bash", "echo one", "```",
        "```bash readme-check: skip needs GPUs", "nvidia-smi", "```",
        "```python", "print('not a command block')", "```",
        "```bash readme-check: with 'big' 'small'", "run big", "```",
    ])
    one, gpu, override = readme_check.parse_blocks(text)
    assert one.skip is None and one.command() == "echo one\n"
    assert gpu.skip == "needs GPUs"
    assert override.command() == "run small\n"
    with pytest.raises(ValueError, match="readme-check replaces 'huge'"):
        readme_check.parse_blocks("```bash readme-check: with 'huge' 'tiny'\nrun big\n```")
    with pytest.raises(ValueError, match="needs a reason"):
        readme_check.parse_blocks("```bash readme-check: skip\nx\n```")


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
    readme_check.main(["--keep", str(tmp_path / "clone")])
