"""Pretrained weights: records (data), resolution of `weights=` and loading.

Placeholder of the weights issue: only `weights=None` and local `.weights.h5` files so far.
"""

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class WeightsRecord:
    """One downloadable (or shipped) weights file and what it needs."""

    model: str
    tag: str
    dataset: str
    classes: int
    input_shape: tuple
    layout: dict

    def default_input_shape(self, data_format):
        if data_format == "channels_last":
            return self.input_shape
        return self.input_shape[-1:] + self.input_shape[:2]


RECORDS = []


def resolve(weights, **kwargs):
    """Returns the record `weights` names, None for None or a file path; raises otherwise."""
    if weights is None:
        return None
    if isinstance(weights, (str, os.PathLike)) and os.path.isfile(weights):
        return None
    raise ValueError(
        f"weights={weights!r} is neither None, an existing weights file, nor a known record. "
        f"Known records: {[f'{r.dataset}:{r.tag}' for r in RECORDS]}."
    )


def load(model, weights, record):
    """Loads `weights` (a path) into `model`."""
    model.load_weights(weights)
