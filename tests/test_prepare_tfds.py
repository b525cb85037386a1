"""training/prepare_tfds.py without tensorflow-datasets, and the commands its help names.

(`tests/test_data_tfds.py` runs the script for real, where tensorflow-datasets is installed.)
"""

import os
import re
import subprocess
import sys

import keras
import pytest

pytestmark = pytest.mark.backend_independent
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "training", "prepare_tfds.py")
#: Runs the script as `python training/prepare_tfds.py ARGS` would, with tensorflow_datasets
#: unimportable (`sys.modules[name] = None`), as on an install without the `train` extra.
WITHOUT_TFDS = """
import runpy, sys
sys.modules["tensorflow_datasets"] = None
sys.argv = [{script!r}, *{args!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


def _run(code, *args):
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend())
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", code.format(script=SCRIPT, args=list(args))],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_without_tensorflow_datasets_one_line_names_the_package(tmp_path):
    out = _run(WITHOUT_TFDS, "--dataset=fashion_mnist", f"--files_dir={tmp_path}")
    assert out.returncode != 0
    assert "Traceback" not in out.stderr + out.stdout, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if "tensorflow-datasets" in line]
    assert len(lines) == 1, out.stderr[-2000:]
    assert "pip install 'keras-preact[train]'" in lines[0]
    assert "pip install tensorflow-datasets" in lines[0]
    assert not os.listdir(tmp_path)  # nothing written


def test_help_names_only_values_the_flags_accept():
    out = _run(WITHOUT_TFDS, "--help")  # the help needs no tensorflow-datasets
    text = out.stdout + out.stderr
    assert "flags:" in out.stdout and "Traceback" not in text, text[-2000:]  # (absl exits 1)
    accepted = re.search(r"--dataset: <([^>]*)>", text).group(1).split("|")
    named = re.findall(r"prepare_tfds\.py --dataset=(\w+)", text)
    assert named and set(named) <= set(accepted), (named, accepted)
    flags = set(re.findall(r"^\s+--(\w+):", text, flags=re.M))
    for command in re.findall(r"prepare_tfds\.py((?: \\?\s*--\w+=\S+)+)", text):
        assert set(re.findall(r"--(\w+)=", command)) <= flags, command
