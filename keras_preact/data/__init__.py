"""Input pipelines for training pre-activation ResNets.

This subpackage is not imported by `import keras_preact`. The modules
`idx`, `cifar_files` and `numpy_pipeline` need only numpy, so the trainers run
under JAX and PyTorch on machines without TensorFlow. The modules
`imagenet_preprocessing` and `tfdata` import TensorFlow and build `tf.data`
pipelines.
"""
