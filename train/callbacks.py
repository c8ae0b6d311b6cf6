"""Keras callbacks of the training loop. Imported only where training runs: importing Keras
costs seconds and prints the backend's log lines, which a bad setting must not wait for."""

from __future__ import annotations

import os
from pathlib import Path

import keras


class BestOnValF1(keras.callbacks.Callback):
    """Early stopping on validation macro-F1, keeping the best weights: a plain Keras callback.

    ``predict_val()`` gives the validation probabilities of the model being fitted (its head alone,
    its top, or the whole network), ``model`` is the network whose weights are kept (and written to
    ``checkpoint`` at each new best, so a run killed later keeps them)."""

    def __init__(self, model, predict_val, y_val, patience, log, phase, checkpoint: Path | None = None):
        super().__init__()
        self.kept, self.predict_val, self.y_val = model, predict_val, y_val
        self.patience, self.log, self.phase, self.checkpoint = patience, log, phase, checkpoint
        self.best, self.best_epoch, self.wait, self.weights = -1.0, 0, 0, None
        self.history: list[dict] = []

    def on_epoch_end(self, epoch, logs=None):
        from sklearn.metrics import f1_score

        probs = self.predict_val()
        f1 = float(f1_score(self.y_val, probs.argmax(1), average="macro"))
        acc = float((probs.argmax(1) == self.y_val).mean())
        self.history.append(
            {
                "phase": self.phase,
                "epoch": epoch + 1,
                "val_macro_f1": f1,
                "val_accuracy": acc,
                **{k: float(v) for k, v in (logs or {}).items()},
            }
        )
        self.log(f"{self.phase} epoch {epoch + 1}: val macro-F1 {f1:.4f}, val accuracy {acc:.4f}")
        if f1 > self.best:
            self.best, self.best_epoch, self.wait = f1, epoch + 1, 0
            self.weights = [w.copy() for w in self.kept.get_weights()]
            if self.checkpoint is not None:
                tmp = self.checkpoint.with_name(f"tmp-{self.checkpoint.name}")
                self.kept.save_weights(tmp)
                os.replace(tmp, self.checkpoint)
        else:
            self.wait += 1
            if self.wait >= self.patience:
                self.model.stop_training = True

    def restore(self):
        if self.weights is not None:
            self.kept.set_weights(self.weights)
