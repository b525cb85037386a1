"""`.keras` save -> load in a fresh process, and get_config / from_config, for every unit
and shortcut (STYLE habit 1: a model of registered layers reloads after `import keras_preact`).

All models are saved in this process and loaded and compared in one subprocess.
"""

import json

import keras
import numpy as np
import pytest
from model_test_utils import (
    assert_config_round_trip,
    paper,
    random_inputs,
    run_python,
    set_seeded_weights,
    tiny,
    to_numpy,
)

import keras_preact
from keras_preact import shortcuts, units

# Initializations feed the thresholds of these tests.
pytestmark = pytest.mark.usefixtures("seeded")

CASES = {
    **{f"unit_{u}": dict(unit=u) for u in sorted(units.UNITS)},
    **{f"shortcut_{s}": dict(shortcut=s) for s in sorted(shortcuts.SHORTCUTS) if s != "identity"},
    "gating_b-2": dict(shortcut=shortcuts.exclusive_gating(gate_bias=-2.0)),
    "scaling_0.7_0.3": dict(shortcut=shortcuts.constant_scaling(0.7, 0.3)),
    "drop_path": dict(depth=14, drop_path_rate=0.2, seed=1),
    "keras_layout": dict(depth=11, block="bottleneck", layout="keras"),
    "conv_bias": dict(layout=paper(conv_bias=True), zero_init_residual=True),
    "include_preprocessing": dict(include_preprocessing=True, preprocessing="inception"),
    "imagenet_neg_inf_pool": dict(
        family="imagenet",
        depth=None,
        block="basic",
        stage_blocks=(1, 1, 1, 1),
        input_shape=(32, 32, 3),
        layout="timm",
    ),
}

LOAD_AND_COMPARE = """
import json
import numpy as np
import keras
import keras_preact  # registers the custom layers
directory = {directory!r}
data = np.load(directory + "/expected.npz")
report = {{}}
for name in {names!r}:
    model = keras.models.load_model(f"{{directory}}/{{name}}.keras")
    out = keras.ops.convert_to_numpy(model(data[name + "_x"], training=False))
    classes = sorted({{type(la).__module__.split(".")[0] for la in model.layers}})
    report[name] = [float(np.max(np.abs(out - data[name + "_y"]))), model.name, classes]
print(json.dumps(report))
"""


@pytest.mark.parametrize("name", sorted(CASES))
def test_config_round_trip(name):
    model = tiny(**CASES[name])
    assert_config_round_trip(model, random_inputs(model))


def test_save_and_load_in_a_fresh_process(tmp_path):
    arrays = {}
    for i, (name, kwargs) in enumerate(sorted(CASES.items())):
        model = tiny(name=name, **kwargs)
        set_seeded_weights(model, seed=i)  # non-trivial BN statistics and gammas
        x = random_inputs(model, seed=i)
        arrays[name + "_x"] = x
        arrays[name + "_y"] = to_numpy(model(x, training=False))
        assert np.all(np.isfinite(arrays[name + "_y"]))
        model.save(str(tmp_path / f"{name}.keras"))
    np.savez(tmp_path / "expected.npz", **arrays)

    code = LOAD_AND_COMPARE.format(directory=str(tmp_path), names=sorted(CASES))
    report = json.loads(run_python(code).stdout.strip().splitlines()[-1])
    assert sorted(report) == sorted(CASES)
    for name, (max_diff, model_name, modules) in report.items():
        assert max_diff <= 1e-6, (name, max_diff)
        assert model_name == name
        assert set(modules) <= {"keras", "keras_preact"}, modules
    assert "keras_preact" in report["shortcut_constant_scaling"][2]


def test_custom_layers_are_registered():
    for cls in (
        keras_preact.layers.ScaledAdd,
        keras_preact.layers.GatedAdd,
        keras_preact.layers.ShortcutDropout,
        keras_preact.layers.DropPath,
        keras_preact.layers.ConstantPadding2D,
        keras_preact.layers.Normalize,
    ):
        name = keras.saving.get_registered_name(cls)
        assert name == f"keras_preact>{cls.__name__}"
        assert keras.saving.get_registered_object(name) is cls
