"""The README and docs/*.md hold together: every relative link (and image) names a file that
exists, every #anchor names a heading of its page (GitHub's slugs), every page is reachable
from the README, and the README stays short enough to read (at most 300 lines)."""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
README_MAX_LINES = 300

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1", flags=re.S)
# [text](target "title") and ![alt](target); the text may hold one level of brackets
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'(][^)]*)?\)")
_REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", flags=re.M)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _prose_lines(text: str) -> list[str]:
    """The lines of a markdown text outside fenced code blocks (those are blanked)."""
    lines, fence = [], None
    for line in text.splitlines():
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)[0] * len(match.group(1))
            lines.append("")
        elif fence is not None:
            if line.strip().startswith(fence) and set(line.strip()) == {fence[0]}:
                fence = None
            lines.append("")
        else:
            lines.append(line)
    return lines


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: markup dropped, lower case, punctuation other than
    '-' and '_' removed, each space a '-'."""
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\([^)]*\)", r"\1", heading)  # links -> their text
    # HTML tags are markup outside code spans and text inside them (`<key>` stays "key")
    parts = _CODE_SPAN.split(text)  # [prose, ticks, code, prose, ticks, code, ..., prose]
    text = "".join(re.sub(r"<[^>]+>", "", part) if i % 3 == 0 else part if i % 3 == 2 else ""
                   for i, part in enumerate(parts))
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def heading_anchors(text: str) -> set[str]:
    """Every anchor GitHub makes for the headings of a markdown text (repeats get -1, -2, ...)."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for line in _prose_lines(text):
        match = _HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def relative_links(text: str) -> list[str]:
    """The link and image targets of a markdown text that point inside the repository (no
    scheme such as https: or mailto:), code blocks and code spans left out."""
    prose = _CODE_SPAN.sub("", "\n".join(_prose_lines(text)))
    targets = [m.group(1) for m in _INLINE_LINK.finditer(prose)]
    targets += [m.group(1) for m in _REFERENCE_DEFINITION.finditer(prose)]
    return [t for t in targets if t and not _SCHEME.match(t) and not t.startswith("//")]


def broken_links(page: Path, root: Path = REPO) -> list[str]:
    """Each relative link of `page` that names no existing file (or, with #anchor into a
    markdown file, no heading of it), with the reason."""
    problems = []
    for target in relative_links(page.read_text(encoding="utf-8")):
        path_part, _, anchor = target.partition("#")
        path_part = unquote(path_part)
        if not path_part:
            destination = page
        elif path_part.startswith("/"):
            destination = root / path_part.lstrip("/")
        else:
            destination = page.parent / path_part
        destination = destination.resolve()
        if not destination.is_relative_to(root.resolve()):
            problems.append(f"{target}: outside the repository")
        elif not destination.exists():
            problems.append(f"{target}: no such file")
        elif anchor and destination.suffix.lower() == ".md":
            if unquote(anchor).lower() not in heading_anchors(destination.read_text(encoding="utf-8")):
                problems.append(f"{target}: no heading with anchor #{anchor} in {destination.relative_to(root.resolve())}")
        elif anchor and destination.is_dir():
            problems.append(f"{target}: an anchor into a folder")
    return problems


def _pages() -> list[Path]:
    return [README, *sorted((REPO / "docs").rglob("*.md"))]


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page: Path) -> None:
    problems = broken_links(page)
    assert not problems, f"{page.relative_to(REPO)}: broken links:\n" + "\n".join(problems)


def test_readme_is_at_most_300_lines() -> None:
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move reference text to docs/"


def test_every_docs_page_is_reachable_from_the_readme() -> None:
    reached, queue = {README.resolve()}, [README]
    while queue:
        page = queue.pop()
        for target in relative_links(page.read_text(encoding="utf-8")):
            path_part = unquote(target.partition("#")[0])
            if not path_part.endswith(".md"):
                continue
            destination = (page.parent / path_part).resolve()
            if destination.is_file() and destination not in reached:
                reached.add(destination)
                queue.append(destination)
    unreached = [str(p.relative_to(REPO)) for p in _pages() if p.resolve() not in reached]
    assert not unreached, f"docs pages no link from README.md leads to: {unreached}"


# -- the checker itself finds what it should --------------------------------------------------
def test_github_slug_matches_githubs_anchors() -> None:
    assert github_slug("Batch prediction: `detr-attn predict`") == "batch-prediction-detr-attn-predict"
    assert github_slug("Interactive viewer: `detr-attn report RUN_DIR --viewer`") == \
        "interactive-viewer-detr-attn-report-run_dir---viewer"
    assert github_slug("The model path against the bf16 body alone (issue 14)") == \
        "the-model-path-against-the-bf16-body-alone-issue-14"
    assert github_slug("Fine-tune DETR-R50 on your [data](x.md)") == "fine-tune-detr-r50-on-your-data"
    assert github_slug("Maps npz: `attention/<key>.npz`") == "maps-npz-attentionkeynpz"
    assert github_slug("Tips <em>here</em>") == "tips-here"
    assert heading_anchors("# A\n## A\n```\n# not a heading\n```\n### A b\n") == {"a", "a-1", "a-b"}


def test_broken_links_are_reported(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## Second part\n", encoding="utf-8")
    (tmp_path / "picture.png").write_bytes(b"")
    readme = tmp_path / "README.md"
    readme.write_text(
        "# Title\n\n"
        "[ok](docs/page.md) [ok anchor](docs/page.md#second-part) ![ok image](picture.png) [self](#title)\n"
        "[web](https://example.com/missing.md) `[in code](nowhere.md)`\n"
        "```\n[in a block](nowhere.md)\n```\n"
        "[missing](docs/nope.md) ![missing image](images/none.png) [bad anchor](docs/page.md#third-part)\n"
        "[bad self](#no-such-heading) [escape](../outside.md)\n"
        "[ref]: docs/gone.md\n", encoding="utf-8")
    assert broken_links(readme, root=tmp_path) == [
        "docs/nope.md: no such file",
        "images/none.png: no such file",
        "docs/page.md#third-part: no heading with anchor #third-part in docs/page.md",
        "#no-such-heading: no heading with anchor #no-such-heading in README.md",
        "../outside.md: outside the repository",
        "docs/gone.md: no such file",
    ]
