"""The device side of bmc: LiteRT, OpenCV and numpy only — nothing here imports TensorFlow."""
