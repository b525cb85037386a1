"""Prints the markdown table of every flag of the trainers and `evaluate.py` (docs/training.md).

Each program's flags are read in a subprocess of its own (they define flags of the same
names): the ones its `define_flags()` defines, which `--help` lists, without TensorFlow's.

    python tools/flags_table.py > /tmp/flags.md
"""

import json
import os
import subprocess
import sys

SCRIPTS = {
    "cifar": "keras_preact.train.cifar",
    "imagenet": "keras_preact.train.imagenet",
    "evaluate": "keras_preact.train.evaluate",
}
_READ = """
import importlib, json, sys
from absl import flags
module = importlib.import_module(sys.argv[1])
rows = {}
for name in module.define_flags():
    f = flags.FLAGS[name]
    rows[f.name] = {"default": f.default, "help": f.help}
print("FLAGS " + json.dumps(rows, default=str))
"""
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_flags(module):
    out = subprocess.run(
        [sys.executable, "-c", _READ, module], cwd=REPO, capture_output=True, text=True
    )
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("FLAGS ")]
    if not line:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(line[0][len("FLAGS ") :])


def _shown(default):
    return '`""`' if default == "" else f"`{default}`"


def main():
    by_script = {name: read_flags(path) for name, path in SCRIPTS.items()}
    names = sorted({n for rows in by_script.values() for n in rows})
    print("| flag | default (per script) | meaning |")
    print("| --- | --- | --- |")
    for name in names:
        present = {s: rows[name] for s, rows in by_script.items() if name in rows}
        defaults = {s: _shown(row["default"]) for s, row in present.items()}
        if len(set(map(str, defaults.values()))) == 1 and len(present) > 1:
            default = next(iter(defaults.values()))
            if len(present) < len(SCRIPTS):
                default += " (" + ", ".join(present) + ")"
        else:
            default = "; ".join(f"{s}: {d}" for s, d in defaults.items())
        scripts_by_help = {}
        for s, row in present.items():
            scripts_by_help.setdefault(row["help"], []).append(s)
        if len(scripts_by_help) == 1:
            meaning = next(iter(scripts_by_help))
        else:
            meaning = " ".join(f"{', '.join(s)}: {h}" for h, s in scripts_by_help.items())
        print(f"| `--{name}` | {default} | {meaning.replace('|', '/')} |")


if __name__ == "__main__":
    main()
