"""The README's Python example runs as written (from the repository's root, here a copy of its layout)."""

import os
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def python_example() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### From Python (the paper's API)"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_example_runs_as_written(tmp_path, capsys):
    code = python_example()
    assert "from di_assets import" in code and "generate(" in code and "evaluate(" in code
    shutil.copytree(ROOT / "di_assets" / "example_data" / "star", tmp_path / "di_assets" / "example_data" / "star")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        env: dict = {}
        exec(compile(code, "README.md", "exec"), env)
    finally:
        os.chdir(cwd)
    imgs, preds = env["imgs"], env["preds"].to_pylist()
    assert len(imgs) == 8 and all(im.size == (64, 64) for im in imgs)  # a flat list of images, not a module
    assert len(preds) == 8 and {p["label"] for p in preds} == {"star"}
    assert (tmp_path / "my_encoder_root" / "tokens.json").exists()
    assert "correct1" in capsys.readouterr().out
