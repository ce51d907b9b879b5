"""Every command block of the README and docs says what it needs, and the offline ones run as written.

A fenced ``bash`` block is preceded by ``<!-- commands: KIND -->``:

- ``offline``: runs here as written (embedded model, toy or generated data, random architectures). The test runs
  the block in a fresh folder and checks that it leaves nothing outside its run folders and the caches;
- ``setup``: the README's set-up commands (CI runs them on a fresh clone);
- ``long``: offline, but minutes to hours (full benches, pretraining, benchmarks);
- ``need real weights and data`` / ``need GPUs``: cannot run here.

Blocks that do not run here are still checked: every ``vlprompt`` command parses, its config keys exist, and every
script it names is in the repository.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Raw outputs of benchmark runs (kept as they were written) record the command that made them: not instructions.
RAW_OUTPUTS = ("docs/benchmarks/gpu/", "docs/benchmarks/cpu_scaling_check/after_run",
               "docs/benchmarks/cpu_scaling_check/before_run")  # fmt: skip
DOCS = sorted(file for file in [REPO / "README.md", *(REPO / "docs").rglob("*.md"), *(REPO / "benchmarks").rglob("*.md")]
              if not str(file.relative_to(REPO)).startswith(RAW_OUTPUTS))  # fmt: skip
KINDS = ("offline", "setup", "long", "need real weights and data", "need GPUs")
MARKER = re.compile(r"<!--\s*commands:\s*(.+?)\s*-->")
FENCE = re.compile(r"^```(bash|sh|shell)\s*$")
# Top-level entries an offline block may create in its working folder: the folders its commands name (--output and
# other paths) and the default run folder.
DEFAULT_OUTPUTS = {"runs"}


@dataclass(frozen=True)
class Block:
    file: Path
    line: int
    kind: str | None
    text: str

    @property
    def name(self) -> str:
        return f"{self.file.relative_to(REPO)}:{self.line}"


def command_blocks() -> list[Block]:
    blocks = []
    for file in DOCS:
        lines = file.read_text().splitlines()
        i = 0
        while i < len(lines):
            if FENCE.match(lines[i].strip()):
                previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
                marker = MARKER.search(previous)
                end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
                blocks.append(Block(file, i + 1, marker.group(1) if marker else None, "\n".join(lines[i + 1:end])))
                i = end
            i += 1
    return blocks


def commands(text: str) -> list[str]:
    """The block's commands: continuation lines joined, comments and blank lines dropped."""
    out, pending = [], ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        stripped = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
        if stripped:
            out.append(stripped)
    return out


BLOCKS = command_blocks()


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.name)
def test_every_command_block_says_what_it_needs(block):
    assert block.kind in KINDS, (
        f"{block.name}: a command block needs a `<!-- commands: KIND -->` line before it, KIND one of {KINDS} "
        f"(got {block.kind!r})"
    )


def _vlprompt_argv(command: str) -> list[str] | None:
    """The vlprompt arguments of a command line (plain, `python -m vlprompt.cli`, torchrun/accelerate), or None."""
    words = shlex.split(command.replace("~", os.path.expanduser("~")))
    for i, word in enumerate(words):
        if Path(word).name == "vlprompt":
            return words[i + 1:]
        if word == "vlprompt.cli" and i > 0 and words[i - 1] == "-m":
            return words[i + 1:]
    return None


def _check_parses(command: str, where: str) -> None:
    """A command that cannot run here still names real subcommands, flags, config keys and scripts."""
    from vlprompt.cli import CLIError, bench_config_from, build_parser, build_run_options, resolved_tree

    argv = _vlprompt_argv(command)
    if argv is None:
        for word in shlex.split(command):
            if word.startswith(("benchmarks/", "scripts/", "configs/")) and "<" not in word:
                assert (REPO / word).exists(), f"{where}: {word} is not in the repository ({command})"
        return
    if "..." in argv or any("<" in a for a in argv):
        return  # an elided or templated command: its flags are checked where it is written in full
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `vlprompt {' '.join(argv)}` does not parse")
    try:
        if args.command == "train":
            build_run_options(resolved_tree(args))
        elif args.command == "bench" and not args.report_only:
            bench_config_from(args)
    except CLIError as err:
        pytest.fail(f"{where}: `vlprompt {' '.join(argv)}`: {err}")


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind != "offline"], ids=lambda b: b.name)
def test_commands_that_cannot_run_here_still_parse(block, monkeypatch):
    monkeypatch.chdir(REPO)
    for command in commands(block.text):
        _check_parses(command, block.name)


def _outputs_named(block_commands: list[str]) -> set[str]:
    names = set(DEFAULT_OUTPUTS)
    for command in block_commands:
        words = shlex.split(command)
        for flag, value in zip(words, words[1:]):
            if flag == "--output":
                names.add(Path(value).parts[0])
    return names


def _git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO, capture_output=True,
                          text=True).stdout


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind == "offline"], ids=lambda b: b.name)
def test_offline_commands_run_as_written_and_leave_nothing_stray(block, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    for shared in ("configs", "benchmarks"):  # what the commands name relative to the repository
        (work / shared).symlink_to(REPO / shared)
    block_commands = [c for c in commands(block.text) if not c.startswith(". ")]  # the venv is on PATH here
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONWARNINGS": "ignore"}
    env.pop("VLPROMPT_TOY_ROOT", None)  # the commands name files in the default toy folder
    repo_before = _git_status()
    for command in block_commands:
        done = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{block.name}: `{command}` failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    created = {p.name for p in work.iterdir()} - {"configs", "benchmarks"}
    named = _outputs_named(block_commands) | {name for name in created if re.search(rf"\b{re.escape(name)}\b",
                                                                                     block.text)}  # fmt: skip
    stray = created - named
    assert not stray, f"{block.name} left {sorted(stray)}, which none of its commands names"
    assert _git_status() == repo_before, f"{block.name} changed files in the repository"
