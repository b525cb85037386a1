"""The built wheel and sdist: licence, metadata, the training core, the tests.

Builds both from this checkout with `python -m build --no-isolation` (no network: the
build backend is the environment's setuptools). Independent of the Keras backend, so it
runs once, under TensorFlow.
"""

import os
import pathlib
import subprocess
import sys
import tarfile
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow",
    reason="backend-independent: runs under KERAS_BACKEND=tensorflow only",
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if not (ROOT / "pyproject.toml").exists():
        pytest.skip("not a source checkout")
    pytest.importorskip("build", reason="the dev extra's `build` package")
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return wheel, sdist, log


def test_build_prints_no_deprecation_warning(built):
    log = built[2]
    assert "deprecat" not in log.lower(), [ln for ln in log.splitlines() if "eprecat" in ln]


def test_wheel_holds_licence_typing_marker_and_training_core(built):
    with zipfile.ZipFile(built[0]) as z:
        names = set(z.namelist())
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        licence = next(n for n in names if n.endswith(".dist-info/licenses/LICENSE"))
        assert "Apache License" in z.read(licence).decode()
    assert "keras_preact/py.typed" in names
    train = {f"keras_preact/train/{p.name}" for p in (ROOT / "keras_preact/train").glob("*.py")}
    assert train and train <= names, sorted(train - names)
    assert "keras_preact/imagenet_class_index.json" in names
    shipped = {
        f"keras_preact/weights_files/{p.name}"
        for p in (ROOT / "keras_preact/weights_files").iterdir()
    }
    assert shipped <= names
    assert not any(n.startswith(("tests/", "training/")) for n in names)

    assert "License-Expression: Apache-2.0" in metadata
    assert "License :: OSI Approved" not in metadata  # superseded by the expression
    for line in (
        "Classifier: Programming Language :: Python :: 3.10",
        "Classifier: Programming Language :: Python :: 3.12",
        "Classifier: Development Status :: ",
        "Classifier: Topic :: Scientific/Engineering :: Image Recognition",
        "Project-URL: Source, https://",
        "Project-URL: Documentation, https://",
        "Project-URL: Issues, https://",
    ):
        assert line in metadata
    # The README renders on the index page: no relative links.
    assert "](docs/" not in metadata and "](.ci/" not in metadata


def test_sdist_holds_what_the_suite_needs(built):
    with tarfile.open(built[1]) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for needed in ("LICENSE", "conftest.py", "tests/conftest.py", "tests/model_test_utils.py",
                   "tests/run_all_backends.sh", "training/cifar.py", "docs/weights.md",
                   "keras_preact/py.typed"):  # fmt: skip
        assert needed in names, needed
    fixtures = [p.relative_to(ROOT).as_posix() for p in (ROOT / "tests/fixtures").rglob("*")]
    assert {p for p in fixtures if (ROOT / p).is_file()} <= names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
