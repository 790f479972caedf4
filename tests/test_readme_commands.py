"""The README's shell blocks run as written, in order, from a fresh copy of the repository
(scripts/run_readme.py): every block is marked run / not run, and the runnable ones (the demo
model, offline) succeed and leave the files the README says they write."""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import run_readme  # noqa: E402


def test_every_shell_block_is_marked_and_the_main_jobs_run():
    blocks = run_readme.readme_blocks((REPO / "README.md").read_text(encoding="utf-8"))
    runnable = [block.commands() for block in blocks if block.run]
    for verb in ("make demo", "detr-attn predict", "detr-attn eval", "detr-attn train", "detr-attn report",
                 "detr-attn export"):
        assert any(verb in code for code in runnable), verb
    assert all(block.reason for block in blocks if not block.run or block.skip)
    top = blocks[0]
    assert top.run and top.skip == "make test" and top.commands().split("#")[0].strip() == "make demo"


def test_an_unmarked_block_is_named_by_its_line():
    text = "# title\n\n<!-- run -->\n```bash\necho a\n```\n\ntext\n```bash\necho b\n```\n"
    with pytest.raises(ValueError, match=r"README.md:9: a ```bash block without"):
        run_readme.readme_blocks(text)
    marked = text.replace("text\n```bash", "<!-- not run: needs the network -->\n```bash")
    assert [(b.run, b.reason, b.commands()) for b in run_readme.readme_blocks(marked)] == [
        (True, "", "echo a"), (False, "needs the network", "echo b")]
    skipping = '<!-- run except "echo c": why -->\n```bash\necho a\necho c   # a comment\n```\n'
    assert run_readme.readme_blocks(skipping)[0].commands() == "echo a"
    with pytest.raises(ValueError, match="no line 'echo d'"):
        run_readme.readme_blocks(skipping.replace('except "echo c"', 'except "echo d"'))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs a git checkout")
def test_the_runnable_blocks_run_in_sequence_from_a_fresh_copy(tmp_path):
    blocks = run_readme.readme_blocks((REPO / "README.md").read_text(encoding="utf-8"))
    copy = run_readme.fresh_copy(REPO, tmp_path / "repo")
    assert not (copy / "demo_out").exists() and not (copy / "runs").exists()
    ran = run_readme.run_blocks(copy, blocks)
    failed = [(r.block.line, r.output[-3000:]) for r in ran if r.returncode != 0]
    assert not failed, failed
    assert len(ran) == sum(block.run for block in blocks)
    # what the README says each block writes
    for name in ("demo_out/report/index.html", "runs/demo/report/index.html", "runs/demo/report/report.pdf",
                 "runs/demo/report/viewer.html", "runs/eval/metrics.json", "runs/finetune/model/model.safetensors"):
        assert (copy / name).is_file(), name
    demo = [json.loads(line) for line in (copy / "runs/demo/predictions.jsonl").read_text().splitlines()]
    assert len(demo) == 4 and all(record["detections"] for record in demo)
    for method in ("attn-grad", "relevance", "drise"):
        assert all(method in record["methods"] for record in demo)
    masks = json.loads((copy / "runs/demo/masks.json").read_text())
    assert len(masks) == sum(len(record["detections"]) for record in demo)
    assert json.loads((copy / "runs/eval/metrics.json").read_text())["bbox"]["AP"] > 0.5
    # the fine-tuning example prints the AP before and after, and it goes up
    train_output = next(r.output for r in ran if "detr-attn train" in r.block.code)
    before, after = (float(v) for v in re.search(r"^AP (\S+) -> (\S+),", train_output, re.M).groups())
    assert after > before
