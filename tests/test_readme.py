"""README.md and docs/*.md are executable: their command blocks run as written (`make readme-check`, slow) and
every block that the check does not run says why on its fence line."""

from pathlib import Path

import pytest

from tests import readme_check

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs"
README_LIMIT = 25_000  # bytes: the README is a front door; the rest lives in docs/ and CONTRIBUTING.md


def _all_blocks():
    return readme_check.collect_blocks(readme_check.checked_files(README, DOCS))


def test_every_bash_block_runs_or_names_why_not():
    blocks = readme_check.parse_blocks(README.read_text(encoding="utf-8"))
    assert blocks[0].title.startswith("make demo") and blocks[0].skip is None
    everything = _all_blocks()
    assert everything[: len(blocks)] == blocks  # README first, then the docs pages
    for block in everything:
        block.command()  # every override applies
        if block.skip is not None:
            assert any(word in block.skip for word in ("GPU", "Hub")), (block.where, block.skip)
    ran = " ".join(block.script for block in everything if block.skip is None)
    for command in ("train.py recipes/demo.yaml --use_lora true", "--num_processes 2 train.py recipes/demo.yaml",
                    "mmcoconut-analyze --model outputs/demo", "evaluate_aokvqa.py --model outputs/demo",
                    "mmcoconut-predict --model outputs/demo", "mmcoconut-data --out",
                    "python -m experiments.learning_curve", "python -m experiments.adaptive_thinking",
                    "python -m benchmarks.bench_train_step"):
        assert command in ran, command


def test_the_check_covers_readme_then_each_docs_page_in_name_order():
    files = readme_check.checked_files(README, DOCS)
    assert files[0] == README and files[1:] == sorted(DOCS.glob("*.md"))
    for page in ("training", "data", "evaluation", "inference", "experiments", "benchmarks", "errors"):
        assert DOCS / f"{page}.md" in files, page
    blocks = _all_blocks()
    assert [block.number for block in blocks] == list(range(1, len(blocks) + 1))
    order = [str(path.relative_to(REPO)) for path in files]
    assert [order.index(b.source) for b in blocks] == sorted(order.index(b.source) for b in blocks)
    assert readme_check.checked_files(README, None) == [README]


def test_readme_is_a_front_door():
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes; move detail to docs/ (limit {README_LIMIT})"
    text = README.read_text(encoding="utf-8")
    first_screen = text[: text.index("\n## ")]
    for command in ("make demo", "make test", "mmcoconut-predict"):
        assert command in first_screen, command
    for section in ("## Train on A-OKVQA", "## Multi-GPU", "## LoRA", "## Evaluate", "## Use a trained model",
                    "## Results"):
        assert section in text, section


def test_markdown_links_between_pages_resolve():
    """Every relative link of README.md, CONTRIBUTING.md and docs/*.md names a file that exists, or one of the pages
    that others write (architecture, generation, distributed), and every #anchor one of the page's headings."""
    import re

    pending = {"architecture.md", "generation.md", "distributed.md"}
    pages = [README, REPO / "CONTRIBUTING.md", *sorted(DOCS.glob("*.md"))]
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                assert resolved.name in pending and resolved.parent == DOCS, (page.name, target)
                continue
            if anchor and resolved.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", resolved.read_text(encoding="utf-8"), flags=re.M)
                slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}
                assert anchor in slugs, (page.name, target)


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
    # An error names the page and line it comes from.
    with pytest.raises(ValueError, match=r"docs/data\.md:2: `readme-check: skip` needs a reason"):
        readme_check.parse_blocks("text\n```bash readme-check: skip\nx\n```", source="docs/data.md")


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
    readme_check.main(["--keep", str(tmp_path / "clone")])
