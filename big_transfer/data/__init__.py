"""Input: datasets, preprocessing ops, tf.data pipelines, MixUp."""

from big_transfer import native_logs

native_logs.import_tensorflow()  # Before tfds: keeps TensorFlow's import notices off stderr.
