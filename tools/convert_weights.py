r"""Converts a real upstream weights file and checks it against the reference framework.

Given a record name and (optionally) the upstream file, this builds our model with the
record's layout, loads the file through `keras_preact.weights`, runs the reference
implementation on the same preprocessed batch, and prints the max |logit difference| and
the top-5 agreement. References, where installed:

- keras_h5 (`imagenet:keras`): `keras.applications.ResNet{50,101,152}V2(weights=<file>)`;
- timm_safetensors (`imagenet:timm_*`): `timm.create_model("resnetv2_<d>")` with the file
  (timm's torchvision import is stubbed as in tools/make_timm_fixture.py);
- torch7 (`imagenet:fb_torch`): the Torch7 module tree run by the torch.nn.functional
  interpreter of tools/torch7_reference.py (`forward` on `from_torchfile`).

    python tools/convert_weights.py --model PreActResNet50 --weights imagenet:keras \
        [--file ~/Downloads/resnet50v2_weights_tf_dim_ordering_tf_kernels.h5] \
        [--out preact_resnet50_keras.weights.h5] [--batch 4]

Without `--file` the record's URL is downloaded into the Keras cache. `--out` writes a
Keras 3 `.weights.h5` of the converted model, which `weights=<path>` loads with no
conversion (for the same builder arguments).
"""

import argparse
import importlib.util
import os
import sys

import keras
import numpy as np

import keras_preact
from keras_preact import imagenet_utils
from keras_preact import weights as kp_weights


def _sibling(name):
    """`tools/<name>.py` as a module: the tools are scripts, not a package."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def keras_reference(record, path, x):
    builder = getattr(keras.applications, f"ResNet{record.depth}V2")
    ref = builder(weights=path, classifier_activation=None, input_shape=x.shape[1:])
    return keras.ops.convert_to_numpy(ref(x, training=False))


def timm_reference(record, path, x):
    make_timm_fixture = _sibling("make_timm_fixture")  # stubs torchvision for timm's imports

    try:
        import torchvision  # noqa: F401
    except ImportError:
        sys.meta_path.insert(0, make_timm_fixture._StubFinder())
    import timm
    import torch
    from safetensors.torch import load_file

    ref = timm.create_model(f"resnetv2_{record.depth}", pretrained=False, num_classes=1000)
    ref.load_state_dict(load_file(path))
    with torch.no_grad():
        return ref.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


def torch7_reference(record, path, x):
    import torch
    import torchfile

    t7 = _sibling("torch7_reference")

    with torch.no_grad():
        nchw = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        return t7.forward(t7.from_torchfile(torchfile.load(path)), nchw).numpy()


REFERENCES = {"keras_h5": keras_reference, "timm_safetensors": timm_reference,
              "torch7": torch7_reference}  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="named builder, e.g. PreActResNet200")
    parser.add_argument("--weights", required=True, help="record, e.g. imagenet:fb_torch")
    parser.add_argument("--file", help="the upstream file, downloaded by hand")
    parser.add_argument("--out", help="write the converted model's Keras 3 .weights.h5 here")
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()

    depth = int(args.model.removeprefix("PreActResNet"))
    record = kp_weights.get_record(args.weights, depth)
    path = args.file or kp_weights.fetch(record)
    print(f"record {record.name} for {record.model}: {record.source}")
    print(f"file {path}: sha256 {kp_weights.file_digest(path)}")
    model = keras_preact.get_model(args.model, weights=path if args.file else args.weights,
                                   classifier_activation=None)  # fmt: skip
    if args.file:  # a local file takes its layout from the record it is named after
        assert model.input_shape[1:] == tuple(record.input_shape), model.input_shape

    side = record.input_shape[0]
    rng = np.random.default_rng(0)
    # Smooth random images (blurred noise) look more like photos than white noise does.
    raw = rng.uniform(0, 255, (args.batch, side // 8, side // 8, 3))
    raw = np.repeat(np.repeat(raw, 8, axis=1), 8, axis=2).astype(np.float32)
    x = imagenet_utils.preprocess_input(raw, weights=record, data_format="channels_last")
    ours = keras.ops.convert_to_numpy(model(x, training=False))
    try:
        theirs = REFERENCES[record.format](record, path, x)
    except ImportError as e:
        print(f"reference framework not installed ({e}); converted logits only.")
        theirs = None
    if theirs is not None:
        top_ours = np.argsort(-ours, axis=1)[:, :5]
        top_ref = np.argsort(-theirs, axis=1)[:, :5]
        agree = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(top_ours, top_ref)])
        top1 = np.mean(top_ours[:, 0] == top_ref[:, 0])
        print(f"max |logit diff| {np.abs(ours - theirs).max():.3e} "
              f"(max |logit| {np.abs(theirs).max():.2f}); top-5 agreement {agree:.3f}; "
              f"top-1 agreement {top1:.3f}")  # fmt: skip
    for row in imagenet_utils.decode_predictions(ours, top=3)[:2]:
        print("ours:", row)
    if args.out:
        model.save_weights(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
