"""benchmarks/gpu_check.py must work the first time a GPU is lent (15 minutes in all): its dry run, in
the precision a GPU uses (bf16 weights), runs every row on CPU."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_gpu_check_dry_run_gives_every_row_in_bfloat16(tmp_path):
    env = {**os.environ, "DI_ASSETS_THREADS": "1", "TMPDIR": str(tmp_path)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--dtype", "bfloat16"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "dtype bfloat16" in text and "loaded (bfloat16)" in text
    for row in (r"textual inversion, 64 px, batch 1 +[\d.]+ steps/s",
                r"multi-class textual inversion, K=2, .* [\d.]+ class-steps/s \([\d.]+x K=1\)",
                r"encoder root \(1 token\) +saved", r"generate, 2 steps, batch 8 +[\d.]+ images/s",
                r"CLIP di-tiny-clip scores, 16 images of 64 px, batch 64 +[\d.]+ images/s"):
        assert re.search(row, text), f"no row matching {row!r} in:\n{text[-3000:]}"
