"""Run Python code in a subprocess where `hybrid_rnn_lm` and `training` cannot be imported.

This is how a user who only has transformers (no copy of this package) loads a Hub folder with
`trust_remote_code=True`: the modeling code must come from the folder itself.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Drops every way the package could be found: the editable-install finder, the repo on sys.path.
_PRELUDE = f"""
import sys, importlib.util
sys.meta_path = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")
                 and "__editable__" not in type(f).__module__]
sys.path_hooks = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
sys.path_importer_cache.clear()
sys.path = [p for p in sys.path if p not in ("", ".", {str(REPO_ROOT)!r})]
for name in ("hybrid_rnn_lm", "training"):
    assert importlib.util.find_spec(name) is None, f"{{name}} is importable, isolation failed"
"""


def run_without_package(code: str, cwd: str | os.PathLike, env: dict | None = None, timeout: int = 300) -> dict:
    """Runs `code` isolated from the package; the code prints one JSON object on its last line, returned here."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    full_env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", _PRELUDE + textwrap.dedent(code)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(f"isolated subprocess failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
