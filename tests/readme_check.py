"""Run the command blocks of README.md, then of docs/*.md, in a fresh copy of the repository: `make readme-check`.

    python tests/readme_check.py [--keep DIR] [--only N ...] [--list] [--readme FILE] [--docs DIR]

Every fenced ```bash block runs as one bash script (`set -euo pipefail`) at the root of a copy of the working tree
(the files git tracks or would track: no outputs/, data/ or .venv), with the virtualenv that runs this script as
`.venv` and its bin/ first on PATH (README: "Every other command below runs inside it"), so the copy is what a fresh
clone is after `make install`. The files run in this order: README.md, then each docs/*.md in name order
(docs/benchmarks.md, docs/data.md, ...; not the folders below docs/), each file's blocks in their own order, all in
the one copy: a page's commands may use what README's commands made (the demo's checkpoint in outputs/demo) and
what its own earlier blocks or an earlier page made, as a reader who follows the README and then the page would.
A block's fence line may say how the check treats it, after the language:

    ```bash readme-check: skip needs GPUs and the Hub          not run; the reason is printed
    ```bash readme-check: with 'OLD' 'NEW' ['OLD2' 'NEW2' ...]  run with OLD replaced by NEW (a small override
                                                                that the README states next to the block)

Blocks are numbered 1..N over all the files, in the order they run (`--list` shows each block's file and line).
The first failing block stops the check and shows its output. Prints one line per block (seconds, ran or skipped
and why) and the total wall time; with --keep, each block's output is in DIR/readme-check-logs/.
"""

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```(\S*)(.*)$")
MARKER = "readme-check:"
# What `make install` checks to decide whether .venv is up to date (the Makefile's `$(VENV)/.installed` rule).
INSTALL_INPUTS = ("requirements.txt", "setup.cfg", "requirements.lock", "pyproject.toml")


@dataclass
class Block:
    number: int  # 1-based, among the bash blocks of all the checked files, in the order they run
    line: int  # of the opening fence in its file
    script: str
    skip: str | None = None  # the reason, when not run
    replacements: list = field(default_factory=list)  # [(old, new), ...]
    source: str = "README.md"  # the file, relative to the repository root

    @property
    def where(self):
        return f"{self.source}:{self.line}"

    @property
    def title(self):
        first = next((text for text in self.script.splitlines() if text.strip() and not text.startswith("#")), "")
        return first.strip()[:90]

    def command(self):
        script = self.script
        for old, new in self.replacements:
            if old not in script:
                raise ValueError(f"{self.where}: readme-check replaces {old!r}, which the block lacks")
            script = script.replace(old, new)
        return script


def parse_blocks(text, source="README.md"):
    """The ```bash blocks of one Markdown file's `text` with their readme-check markers, numbered from 1."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match or not match.group(1):
            i += 1
            continue
        language, rest = match.group(1), match.group(2).strip()
        start = i
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        if language != "bash":
            continue
        block = Block(number=len(blocks) + 1, line=start + 1, script="\n".join(body) + "\n", source=source)
        if rest:
            if not rest.startswith(MARKER):
                raise ValueError(f"{source}:{start + 1}: unknown fence annotation {rest!r} (expected {MARKER} ...)")
            action, _, argument = rest[len(MARKER):].strip().partition(" ")
            if action == "skip":
                if not argument.strip():
                    raise ValueError(f"{source}:{start + 1}: `{MARKER} skip` needs a reason")
                block.skip = argument.strip()
            elif action == "with":
                words = shlex.split(argument)
                if not words or len(words) % 2:
                    raise ValueError(f"{source}:{start + 1}: `{MARKER} with` takes pairs 'OLD' 'NEW'")
                block.replacements = list(zip(words[::2], words[1::2]))
                block.command()  # every OLD must be in the block
            else:
                raise ValueError(f"{source}:{start + 1}: unknown {MARKER} action {action!r} (skip or with)")
        blocks.append(block)
    return blocks


def checked_files(readme=REPO / "README.md", docs=REPO / "docs"):
    """The Markdown files the check runs, in order: README, then docs/*.md by name (`docs=None`: README alone)."""
    files = [Path(readme)]
    if docs is not None and Path(docs).is_dir():
        files += sorted(Path(docs).glob("*.md"))
    return files


def _relative(path):
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def collect_blocks(files):
    """The ```bash blocks of `files`, in order, numbered 1..N over all of them."""
    blocks = []
    for path in files:
        for block in parse_blocks(Path(path).read_text(encoding="utf-8"), source=_relative(path)):
            block.number = len(blocks) + 1
            blocks.append(block)
    return blocks


def fresh_copy(destination):
    """The working tree's files that git tracks or would track, copied to `destination`, with this interpreter's
    virtualenv as `.venv` (already installed: `make` must not reinstall it)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    venv = Path(sys.prefix)
    if not (venv / "bin" / "python").is_file() or venv == Path(sys.base_prefix):
        raise SystemExit(f"run this with the project's virtualenv python (.venv/bin/python), not {sys.executable}")
    (destination / ".venv").symlink_to(venv, target_is_directory=True)
    # The copy's files are new, so make would see the install as out of date; it is the same install.
    for name in INSTALL_INPUTS:
        if (destination / name).exists():
            os.utime(destination / name, (0, 0))
    return destination


def run_block(block, workdir, env):
    started = time.perf_counter()
    proc = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + block.command()], cwd=workdir, env=env, capture_output=True, text=True
    )
    return proc, time.perf_counter() - started


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--readme", default=str(REPO / "README.md"))
    parser.add_argument("--docs", default=str(REPO / "docs"),
                        help="run the bash blocks of DIR/*.md after the README's; '' for the README alone")
    parser.add_argument("--keep", help="work in this (new) directory and keep it, instead of a temporary one")
    parser.add_argument("--only", type=int, nargs="+", help="run only these block numbers (see --list)")
    parser.add_argument("--list", action="store_true", help="list the blocks and what the check does with each")
    args = parser.parse_args(argv)
    files = checked_files(args.readme, args.docs or None)
    blocks = collect_blocks(files)
    if args.list:
        for block in blocks:
            what = f"skip: {block.skip}" if block.skip else ("run with overrides" if block.replacements else "run")
            print(f"{block.number:>2}  {block.where:<26} {what:<50} {block.title}")
        return blocks

    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="readme-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if any(workdir.iterdir()):
        raise SystemExit(f"{workdir} is not empty; the check starts from a fresh copy")
    fresh_copy(workdir)
    venv_bin = str(workdir / ".venv" / "bin")
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
           "VIRTUAL_ENV": str(workdir / ".venv")}
    env.pop("PYTHONPATH", None)  # the copy's own modules, as in a clone
    logs = workdir / "readme-check-logs"  # each block's output, kept with --keep
    logs.mkdir()
    print(f"README check of {', '.join(map(_relative, files))} in {workdir}")
    started = time.perf_counter()
    try:
        for block in blocks:
            if args.only and block.number not in args.only:
                continue
            if block.skip:
                print(f"block {block.number:>2} ({block.where}) skipped: {block.skip} | {block.title}")
                continue
            proc, seconds = run_block(block, workdir, env)
            (logs / f"block-{block.number:02d}.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
            status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
            print(f"block {block.number:>2} ({block.where}) {seconds:6.0f} s {status} | {block.title}",
                  flush=True)
            if proc.returncode != 0:
                print(block.command())
                print((proc.stdout + proc.stderr)[-6000:])
                raise SystemExit(1)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"README check passed: {time.perf_counter() - started:.0f} s wall")
    return blocks


if __name__ == "__main__":
    main()
