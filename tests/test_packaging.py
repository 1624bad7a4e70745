"""The wheel (what the image installs) holds every file of the package, not only its Python modules."""

import shutil
import subprocess
import sys
import zipfile

from conftest import REPO


def test_wheel_holds_every_file_of_the_package(tmp_path):
    tracked = subprocess.run(["git", "ls-files", "entrypoint/qctrain"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    expected = {path.removeprefix("entrypoint/") for path in tracked}
    assert {"qctrain/sft_config_fields.json", "qctrain/assets/phi-3.5-tokenizer/tokenizer.json"} <= expected
    # Built as the image builds it: from pyproject.toml, README.md and entrypoint/ alone (no egg-info around
    # to list files that package-data forgets).
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "entrypoint", source / "entrypoint",
                    ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "build"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    [wheel] = (tmp_path / "dist").glob("qc_train_phi-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        packaged = {name for name in archive.namelist() if name.startswith("qctrain/")}
    assert expected - packaged == set()
