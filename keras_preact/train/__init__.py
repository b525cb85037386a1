"""The training core: everything the trainers, the experiments and the benchmarks share.

`import keras_preact.train` imports nothing heavy; each module is imported where it is used
(docs/training.md, "How the trainers are built", has a table of the modules): `trainer` is
the one entry of both trainers, `controller` the one outer loop over the runners
(`runners`, `custom_loop`, `jax_loop`), `fs` the file-system layer of a run folder, and
`cifar`, `imagenet`, `evaluate` the programs, `python -m keras_preact.train.cifar ...`.
"""
