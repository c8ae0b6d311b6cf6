"""Measurement of every model variant and of the edge pipeline; observes, never changes, models."""
