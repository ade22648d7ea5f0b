"""README's Python examples run as written (on the suite's small dataset and cache)."""
import os
import re

from conftest import ROOT


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_examples_run(synth, cache, tmp_path):
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert blocks, "README has Python examples"
    (tmp_path / "data").symlink_to(synth)  # the paths the examples use
    (tmp_path / "cache.zarr").symlink_to(cache)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for block in blocks:
            namespace: dict = {}
            exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102  (our own documentation)
            if "rows" in namespace:  # the LogitCache example: three rows of C classes
                assert namespace["rows"].shape == (3, 4)
    finally:
        os.chdir(cwd)
