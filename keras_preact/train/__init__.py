"""The training core: everything the trainers, the experiments and the benchmarks share.

Modules (each imported where it is used, so `import keras_preact.train` imports nothing
heavy; TensorFlow only in `custom_loop` and the ImageNet trainer):

- `config`: the frozen run configurations and their presets (`get_config("paper")`);
- `flags`: the trainers' command-line flags (absl);
- `sources`, `distribution`, `optimization`, `metrics`, `modeling`: data sources,
  strategy and precision, schedule / weight decay / loss / optimizer, metrics, the model;
- `checkpoints`, `callbacks`, `loops`, `custom_loop`, `jax_loop`: resumable state and
  every file a run writes, the epoch-end work, and the three loops (`fit`, `custom`, `jax`);
- `cifar`, `imagenet`, `evaluate`: the programs, `python -m keras_preact.train.cifar ...`.
"""
