"""The documentation's examples run as written: the ```python blocks of README.md and docs/*.md on the
suite's small dataset and cache, and their ```toml protocols planned by `kdcache sweep --dry-run`."""
import os
import re
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), flags=re.S)


def with_blocks(language: str) -> list:
    return [pytest.param(p, id=str(p.relative_to(ROOT))) for p in DOCS if blocks(p, language)]


def test_the_docs_have_examples():
    assert (ROOT / "docs").is_dir()
    assert with_blocks("python"), "README.md or docs/*.md have Python examples"
    assert with_blocks("toml"), "docs/studies.md shows a protocol"


@pytest.mark.parametrize("doc", with_blocks("python"))
def test_python_examples_run(doc: Path, synth, cache, tmp_path):
    """A page's blocks run in order in one namespace (a page reads top to bottom), in a folder holding
    the paths the examples use: `data/` (train.beton, test.beton) and `cache.zarr`."""
    (tmp_path / "data").symlink_to(synth)
    (tmp_path / "cache.zarr").symlink_to(cache)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        namespace: dict = {}
        for block in blocks(doc, "python"):
            exec(compile(block, str(doc), "exec"), namespace)  # noqa: S102  (our own documentation)
        if "rows" in namespace:  # the LogitCache example: three rows of C classes
            assert namespace["rows"].shape == (3, 4)
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("doc", with_blocks("toml"))
def test_protocol_examples_plan(doc: Path, tmp_path):
    """Every protocol a page shows is one `kdcache sweep` accepts (no unknown key, every value of its
    type), planned without running anything."""
    for i, block in enumerate(blocks(doc, "toml")):
        protocol = tmp_path / f"example{i}.toml"
        protocol.write_text(block)
        result = run_cli("sweep", protocol, "--dry-run", "--out", tmp_path / f"runs{i}")
        planned = re.search(r"(\d+) students in this shard", result.output)
        assert planned and int(planned.group(1)) > 0, result.output


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_resolves():
    """Each relative link of README.md, CHANGELOG.md and docs/*.md names a file that exists and, for a
    page, a heading it has."""
    broken = []
    for doc in [*DOCS, ROOT / "CHANGELOG.md"]:
        for link in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", link):
                continue
            path, _, anchor = link.partition("#")
            target = doc.parent / path if path else doc
            if not target.exists():
                broken.append(f"{doc.name}: {link} (no such file)")
            elif anchor and target.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", target.read_text(), flags=re.M)
                if anchor not in {_slug(h) for h in headings}:
                    broken.append(f"{doc.name}: {link} (no such heading)")
    assert not broken, broken


@pytest.mark.parametrize("protocol", sorted((ROOT / "protocols").glob("*.toml")), ids=lambda p: p.name)
def test_committed_protocols_plan(protocol: Path, tmp_path):
    """Every committed protocol, GPU ones included, is one `kdcache sweep` accepts, planned without running."""
    result = run_cli("sweep", protocol, "--dry-run", "--out", tmp_path / "runs")
    planned = re.search(r"(\d+) students in this shard", result.output)
    assert planned and int(planned.group(1)) > 0, result.output
