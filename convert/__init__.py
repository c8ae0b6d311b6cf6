"""Conversion: a trained Keras model → self-describing TFLite variants, each validated before it ships."""
