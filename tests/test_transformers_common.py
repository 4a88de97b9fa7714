"""transformers' own common model tests (ModelTesterMixin from the installed version's source distribution) pass
for our model classes, with four cells and three attention layouts: tests/transformers_common/."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.transformers_common.fetch import folder

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
STAND_INS = {
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "utils/test_configuration_utils.py": "config_common_kwargs = {}\n",
}


def test_transformers_common_model_tests_pass(tmp_path):
    common = folder()
    assert (common / "test_modeling_common.py").is_file(), (
        f"transformers' common tests are missing from {common}: run `python tests/transformers_common/fetch.py` "
        "(make test does)"
    )
    package = tmp_path / "tests"  # the layout of transformers' tests/ folder, which they import relatively
    package.mkdir()
    (package / "__init__.py").touch()
    for name in ("test_modeling_common.py", "test_configuration_common.py"):
        shutil.copy(common / name, package / name)
    for name, text in STAND_INS.items():
        (package / name).parent.mkdir(exist_ok=True)
        (package / name).parent.joinpath("__init__.py").touch()
        (package / name).write_text(text)
    shutil.copy(HERE / "transformers_common" / "hybrid_rnn_lm_common.py", package / "test_hybrid_rnn_lm_common.py")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)])}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-rf"]
    result = subprocess.run(
        [*command, "tests/test_hybrid_rnn_lm_common.py"], cwd=tmp_path, env=environment, capture_output=True, text=True
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-2000:]
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    assert passed >= 4 * 100, summary  # the four test classes ran (about 110 common tests pass for each)
