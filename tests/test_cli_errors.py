"""The programs' user errors: one clear line and a non-zero exit code, no traceback, no
help text, nothing half-written (docs/training.md, "Errors").

Each program runs once, in one subprocess (`_RUNNER`): its cases go through its real entry
point (`run_main`, absl's `app.run`) one after the other, each exit caught, and the last one
ends the process, so its exit code and stderr are the program's own.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = pytest.mark.backend_independent

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = "/usr/share/datasets/fashion-mnist"

_RUNNER = textwrap.dedent("""
    import contextlib, errno, io, json, os, runpy, sys
    from absl import flags
    module, cases, disk_full = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "1"
    program = runpy.run_module(module, run_name="cli_errors")
    sys.modules["__main__"].__doc__ = program["__doc__"]  # absl's help text, as with `-m`
    results = {}
    for name, argv in cases[:-1]:
        sys.argv, err, code = [module, *argv], io.StringIO(), 0
        with contextlib.redirect_stderr(err):
            try:
                program["run_main"]()
            except SystemExit as e:
                code = e.code
        flags.FLAGS.unparse_flags()
        results[name] = [code, err.getvalue()]
    print("RESULTS " + json.dumps(results), flush=True)
    if disk_full:  # every write of the last case fails as on a full disk
        def fsync(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.fsync = fsync
    sys.argv = [module, *cases[-1][1]]
    program["run_main"]()
""")


def _run(module, cases, *, disk_full=False):
    """`(results, last)`: `{case: (exit code, stderr)}` of every case but the last, and the
    `CompletedProcess` the last one ended."""
    out = subprocess.run(
        [sys.executable, "-c", _RUNNER, module, json.dumps(list(cases.items())), str(+disk_full)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert lines, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(lines[0][len("RESULTS ") :]), out


def _one_line(code, stderr, *fragments, docstring=None):
    """A user error: exit code 1, the fragments in one line, no traceback, no help text."""
    assert code == 1, (code, stderr)
    assert "Traceback" not in stderr, stderr
    assert any(all(f in line for f in fragments) for line in stderr.splitlines()), stderr
    if docstring:  # absl prints the program's docstring as help before a UsageError
        assert docstring not in stderr, stderr


def _check(results, expected, docstring):
    for name, fragments in expected.items():
        _one_line(*results[name], *fragments, docstring=docstring)


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="apt-get install dataset-fashion-mnist")
def test_trainer_flag_errors(tmp_path):
    """`cifar.py`: a weights record for another net or layout, a file as --model_dir."""
    file = tmp_path / "a_file"
    file.write_text("")
    base = ["--dataset=fashion_mnist", "--source=files", f"--data_dir={FMNIST}"]
    base += [f"--model_dir={tmp_path / 'run'}"]
    cases = {
        "record for another model": base + ["--weights=fashion_mnist", "--model=PreActResNet32"],
        "model_dir is a file": base + [f"--model_dir={file}"],
        "record with another layout": base + ["--weights=fashion_mnist", "--layout=timm"],
    }
    results, last = _run("keras_preact.train.cifar", cases)
    expected = {
        "record for another model": ["--weights=fashion_mnist", "--model=PreActResNet32",
                                     "PreActResNet20"],
        "model_dir is a file": [f"--model_dir={file}", "not a folder"],
    }  # fmt: skip
    _check(results, expected, "Trains a pre-activation ResNet on CIFAR")
    _one_line(last.returncode, last.stderr, "--layout=timm", "--weights=fashion_mnist", "paper")
    assert os.listdir(tmp_path) == ["a_file"]  # nothing written


def test_imagenet_flag_errors(tmp_path):
    """`imagenet.py`: a folder without shards, a batch larger than the training set (before:
    an error after parsing, behind the whole help text), a record for another model."""
    empty, shards = tmp_path / "empty", tmp_path / "shards"
    empty.mkdir()
    shards.mkdir()
    for name in ("train-00000-of-00001", "validation-00000-of-00001"):
        (shards / name).write_bytes(b"")
    base = [f"--model_dir={tmp_path / 'run'}", f"--data_dir={shards}"]
    cases = {
        "no shards": [f"--model_dir={tmp_path / 'run'}", f"--data_dir={empty}"],
        "batch above the images": base + ["--num_train_examples=10", "--batch_size=16"],
        "record for another model": base + ["--weights=fashion_mnist"],
    }
    results, last = _run("keras_preact.train.imagenet", cases)
    expected = {
        "no shards": [f"--data_dir={empty}", "train-*", "validation-*"],
        "batch above the images": ["--batch_size=16", "10 training images"],
    }
    _check(results, expected, "Trains a pre-activation ResNet on ImageNet")
    _one_line(last.returncode, last.stderr, "--model=PreActResNet50", "PreActResNet20")
    assert sorted(os.listdir(tmp_path)) == ["empty", "shards"]


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="apt-get install dataset-fashion-mnist")
def test_evaluate_errors_and_a_full_disk(tmp_path):
    """`evaluate.py`: a hand-edited config.json, folders without the data, flags that do not
    apply, a conflict with the run found after parsing (before: behind the whole help
    text); then a real evaluation of the Fashion-MNIST record whose --output meets a full
    disk: one line, exit code 1, no file, and the JSON it printed reports the 28x28 images
    it evaluated (before: eval_size 224)."""
    runs = {}
    for name, unit in (("edited", "bogus"), ("trained", "full_preact")):
        runs[name] = tmp_path / name
        runs[name].mkdir()
        (runs[name] / "final.weights.h5").write_bytes(b"")
        config = {"model": "PreActResNet20", "unit": unit, "dataset": "fashion_mnist"}
        (runs[name] / "config.json").write_text(json.dumps(config))
    empty = tmp_path / "empty"
    empty.mkdir()
    fmnist = ["--dataset=fashion_mnist", "--source=files", f"--data_dir={FMNIST}"]
    record = ["--weights=fashion_mnist", *fmnist]
    output = tmp_path / "out" / "eval.json"
    output.parent.mkdir()
    cases = {
        "edited config": [f"--weights={runs['edited'] / 'final.weights.h5'}", *fmnist],
        "no IDX files": ["--weights=fashion_mnist", "--dataset=fashion_mnist",
                         "--source=files", f"--data_dir={empty}"],
        "no shards": ["--weights=fashion_mnist", f"--data_dir={empty}"],
        "record with another layout": [*record, "--layout=timm"],
        "ten crops of Fashion-MNIST": [*record, "--ten_crop"],
        "output in no folder": [*record, f"--output={tmp_path / 'nowhere' / 'eval.json'}"],
        "conflict with the run": [f"--weights={runs['trained'] / 'final.weights.h5'}",
                                  *fmnist, "--unit=original"],
        "crop size of Fashion-MNIST": [*record, "--eval_size=32"],
        "full disk": [*record, "--batch_size=10", "--max_batches=1", f"--output={output}"],
    }  # fmt: skip
    results, last = _run("keras_preact.train.evaluate", cases, disk_full=True)
    expected = {
        "edited config": [str(runs["edited"] / "config.json"), '"unit": "bogus"', "full_preact"],
        "no IDX files": [f"--data_dir={empty}", "train-images-idx3-ubyte"],
        "no shards": [f"--data_dir={empty}", "validation-*"],
        "record with another layout": ["--layout=timm", "--layout=paper"],
        "ten crops of Fashion-MNIST": ["--ten_crop", "--dataset=fashion_mnist"],
        "output in no folder": ["--output=", "does not exist"],
        "conflict with the run": ["--unit=original", "full_preact"],
        "crop size of Fashion-MNIST": ["--eval_size", "--dataset=fashion_mnist"],
    }
    _check(results, expected, "Single-crop (or 10-crop) top-1")
    _one_line(last.returncode, last.stderr, str(output), "No space left on device")
    assert os.listdir(output.parent) == []  # no partial file, no temporary file
    printed = json.loads(last.stdout.split("\n", 1)[1])  # after the RESULTS line
    assert printed["examples"] == 10 and printed["eval_size"] == 28, printed
    assert "eval_resize" not in printed and "ten_crop" not in printed, printed


def test_evaluate_max_batches_counts_only_what_it_read(tmp_path):
    """`evaluate.py --max_batches` reads the first max_batches x batch_size records and
    exhausts that pipeline: the skip counts are those records' (before: read from a pipeline
    stopped while decoding, they counted the records in flight as undecodable)."""
    tf = pytest.importorskip("tensorflow")
    from keras_preact.data import tfdata
    from keras_preact.train import sources

    rng = np.random.default_rng(0)
    jpeg = [
        tf.io.encode_jpeg(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).numpy()
        for _ in range(10)
    ]
    # Batches of 2: the first two batches' records hold one bad image, the rest another.
    jpeg[1] = jpeg[7] = b"not an image"
    tfdata.write_imagenet_tfrecords(str(tmp_path / "validation-00000-of-00001"), jpeg, [1] * 10)
    for ten_crop in (False, True):
        batches, counter = sources.imagenet_eval_batches(
            source="tfrecord", split="validation", data_dir=str(tmp_path), batch_size=2,
            size=32, resize=36, ten_crop=ten_crop, raw=True, max_batches=2,
        )  # fmt: skip
        sizes = [len(labels) for _, labels in batches]
        assert sizes == [2, 1], sizes  # 4 records read, one of them undecodable
        counts = counter.counts()
        assert counts["undecodable"] == 1 and counter.skipped() == 1, counts
