"""Run the README's shell blocks as a newcomer would: in order, in a fresh copy of the repository.

Every ```bash block of README.md is marked on the line before it: `<!-- run -->` (run here, on the
demo model, offline), `<!-- not run: REASON -->` (it needs the network, a GPU, hours, or installs
packages) or `<!-- run except "CMD": REASON -->` (all but the line whose command is CMD: the top
block's `make test` is the test suite that runs this). The runnable blocks run one after another with `bash -e -o pipefail` in a copy
of the tracked files (`git ls-files`, modification times kept), with this virtual environment's
`bin/` first on PATH, `VENV` pointing at it (so `make demo` finds it set up instead of building a
new one: a `make` that would reinstall is refused before it runs), `PYTHONPATH` set to the copy and
the Hugging Face Hub offline. tests/test_readme_commands.py runs this.

    .venv/bin/python scripts/run_readme.py [--keep DIR]

Prints each block's time and the total; exit status 0 when every block succeeded, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_MARK = re.compile(r'^<!-- (?:(?P<run>run)(?: except "(?P<skip>[^"]+)": (?P<why>.+?))?|not run: (?P<reason>.+?)) -->$')
_BLOCK = re.compile(r"^```bash[^\n]*\n(.*?)^```", re.M | re.S)


@dataclass
class Block:
    line: int          # 1-based line of the opening fence
    code: str
    run: bool
    reason: str = ""   # why a block (or its `skip` line) is not run
    skip: str = ""     # a command of a runnable block that is not run (`<!-- run except "CMD": WHY -->`)

    def commands(self) -> str:
        """The code that runs: every line but the skipped command's."""
        return "\n".join(line for line in self.code.splitlines()
                         if not self.skip or line.split("#", 1)[0].strip() != self.skip)


@dataclass
class Ran:
    block: Block
    returncode: int
    seconds: float
    output: str


def readme_blocks(text: str) -> list[Block]:
    """Every ```bash block with its mark; ValueError naming the line of a block without one."""
    blocks = []
    for found in _BLOCK.finditer(text):
        line = text.count("\n", 0, found.start()) + 1
        before = text[: found.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        mark = _MARK.match(before)
        if mark is None:
            raise ValueError(f"README.md:{line}: a ```bash block without '<!-- run -->', "
                             f"'<!-- run except \"CMD\": REASON -->' or '<!-- not run: REASON -->' on the line before it")
        block = Block(line, found.group(1), mark["run"] is not None, mark["reason"] or mark["why"] or "",
                      mark["skip"] or "")
        if block.skip and len(block.commands().splitlines()) == len(block.code.splitlines()):
            raise ValueError(f"README.md:{line}: the block has no line {block.skip!r} to leave out")
        blocks.append(block)
    return blocks


def fresh_copy(repo: Path, target: Path) -> Path:
    """The tracked files of `repo` (as they are in its working tree) copied into `target`."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = repo / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def environment(copy: Path) -> dict[str, str]:
    venv = Path(sys.prefix)
    return {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", "VENV": str(venv),
            "PYTHONPATH": str(copy), "HF_HUB_OFFLINE": "1"}


def _refuse_reinstall(code: str, copy: Path, env: dict[str, str]) -> None:
    for target in re.findall(r"^\s*make\s+(\S+)", code, flags=re.M):
        plan = subprocess.run(["make", "-n", target], cwd=copy, env=env, capture_output=True, text=True).stdout
        if "pip install" in plan:
            raise RuntimeError(f"`make {target}` would reinstall {env['VENV']} (its stamp is older than "
                               f"pyproject.toml): run `make install` first")


def run_blocks(copy: Path, blocks: list[Block], timeout: float = 600) -> list[Ran]:
    """Run the runnable blocks in order in `copy`; stops at the first failure."""
    env = environment(copy)
    ran = []
    for block in (b for b in blocks if b.run):
        _refuse_reinstall(block.commands(), copy, env)
        started = time.perf_counter()
        done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.commands()], cwd=copy, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        ran.append(Ran(block, done.returncode, time.perf_counter() - started, done.stdout))
        if done.returncode != 0:
            break
    return ran


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="make the copy here (kept) instead of a temporary folder")
    args = parser.parse_args(argv)
    blocks = readme_blocks((REPO / "README.md").read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(args.keep) if args.keep else Path(scratch) / "repo"
        copy.mkdir(parents=True, exist_ok=True)
        fresh_copy(REPO, copy)
        ran = run_blocks(copy, blocks)
    for result in ran:
        first = result.block.code.strip().splitlines()[0]
        print(f"README.md:{result.block.line}: exit {result.returncode} in {result.seconds:.1f} s: {first}")
        if result.returncode != 0:
            print(result.output[-4000:])
    for block in blocks:
        if not block.run or block.skip:
            print(f"README.md:{block.line}: not run{f': {block.skip}' if block.skip else ''} ({block.reason})")
    print(f"{len(ran)} of {sum(b.run for b in blocks)} runnable blocks ran in {sum(r.seconds for r in ran):.0f} s")
    return 0 if len(ran) == sum(b.run for b in blocks) and all(r.returncode == 0 for r in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
