"""Puts transformers' own common model tests beside this repository: `tests/test_modeling_common.py` and
`tests/test_configuration_common.py` from the source distribution of the installed transformers version, taken from
the package index (pip download), into .cache/transformers-tests/<version>/. `make test` runs it first.

    python tests/transformers_common/fetch.py
"""

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

FILES = ("tests/test_modeling_common.py", "tests/test_configuration_common.py")
CACHE = Path(__file__).resolve().parents[2] / ".cache" / "transformers-tests"


def folder(version: str = transformers.__version__) -> Path:
    return CACHE / version


def fetch(version: str = transformers.__version__) -> Path:
    target = folder(version)
    if all((target / Path(name).name).is_file() for name in FILES):
        return target
    with tempfile.TemporaryDirectory() as download:
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*command, f"transformers=={version}", "-d", download], check=True)
        (archive,) = Path(download).glob("transformers-*.tar.gz")
        CACHE.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=CACHE))
        with tarfile.open(archive) as sdist:
            for name in FILES:
                member = sdist.getmember(f"transformers-{version}/{name}")
                with sdist.extractfile(member) as source, open(staging / Path(name).name, "wb") as copy:
                    shutil.copyfileobj(source, copy)
    shutil.rmtree(target, ignore_errors=True)
    staging.replace(target)  # whole or absent
    return target


if __name__ == "__main__":
    print(f"transformers {transformers.__version__} common tests in {fetch()}")
