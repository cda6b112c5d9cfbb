"""byol-tf: BYOL self-supervised pretraining for TensorFlow / Keras 3."""
