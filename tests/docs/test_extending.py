"""docs/extending.md runs as written: its Python code blocks, executed in order in one fresh Python
process (each block's own assertions check what the page says it does; a process of its own, so the
page's registrations do not leak into other tests)."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "extending.md"


def code_blocks(text: str) -> list[str]:
  return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_every_example_runs(tmp_path):
  blocks = code_blocks(PAGE.read_text())
  assert (
    len(blocks) >= 8
  )  # setup, router, logits, post-routing, expert kind, block, backend, surgery
  script = tmp_path / "extending.py"
  script.write_text("\n\n".join(f"# --- block {i}\n{b}" for i, b in enumerate(blocks)))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run(
    [sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )
  assert done.returncode == 0, f"{PAGE.name} failed:\n{done.stderr[-4000:]}"
