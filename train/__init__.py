"""Training: from a folder of labelled cell images to a fine-tuned EfficientNet classifier."""
