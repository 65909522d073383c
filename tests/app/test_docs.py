"""The docs hold together: every relative Markdown link in README.md and docs/*.md points at a file
that exists, and an anchor into a Markdown file at one of its headings (external links are skipped)."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# [text](target) and [text](target "title"); images too. Not inside `code` or fenced blocks.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")


def anchors(md: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file: lower case, punctuation dropped, spaces to hyphens."""
    text = FENCE.sub("", md.read_text())
    heads = re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def doc_files(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def broken_links(md: Path, root: Path) -> list[str]:
    """The relative links of one Markdown file whose file or heading does not exist, as 'file: target'."""
    text = CODE.sub("", FENCE.sub("", md.read_text()))
    out = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
            continue                                  # http:, mailto:, ...
        path, _, anchor = target.partition("#")
        resolved = (md.parent / path).resolve() if path else md.resolve()
        if not resolved.exists() or root.resolve() not in (resolved, *resolved.parents):
            out.append(f"{md.relative_to(root)}: {target}")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            out.append(f"{md.relative_to(root)}: {target} (no such heading)")
    return out


def test_every_relative_link_in_the_docs_resolves():
    files = doc_files(ROOT)
    assert len(files) >= 9, files                     # README + the docs/ pages, not an empty glob
    problems = [b for md in files for b in broken_links(md, ROOT)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_link_check_fails_on_a_broken_link(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "real.md").write_text("# real\n")
    (tmp_path / "README.md").write_text(
        "# Top\n[ok](docs/real.md) [anchor ok](docs/real.md#real) [web](https://example.com) [here](#top)\n"
        "`[in code](docs/none.md)`\n```\n[fenced](docs/none.md)\n```\n"
        "[gone](docs/missing.md) [climbs out](../../etc/passwd) [no heading](docs/real.md#unreal)\n")
    (tmp_path / "docs" / "page.md").write_text("[back](../README.md) [bad](../benchmarks/results/nope.md)\n")
    problems = [b for md in doc_files(tmp_path) for b in broken_links(md, tmp_path)]
    assert problems == ["README.md: docs/missing.md", "README.md: ../../etc/passwd",
                        "README.md: docs/real.md#unreal (no such heading)",
                        "docs/page.md: ../benchmarks/results/nope.md"]
