"""Two-phase transfer learning: a new head on a frozen backbone, then the top blocks fine-tuned.

Two execution paths share the model, the split, the contract and the run folder:

* ``cached`` (the CPU path) — images are decoded, augmented (``views`` random views per training
  image) and pushed once through the frozen bottom of the network, up to ``fine_tune_from``; the
  activations are kept in memory (float16). Phase 1 trains the head on pooled features of the
  frozen top, phase 2 fine-tunes the top blocks and the head on the cached activations. On two
  CPU cores this turns hours of end-to-end fine-tuning into minutes.
* ``full`` (the GPU path) — end-to-end ``tf.data`` training with online augmentation, mixed
  precision on GPUs and ``tf.distribute`` (``--strategy mirrored``) across several of them.

Both stop early on validation macro-F1 and keep the best weights. BatchNorm layers stay frozen.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bmc.contract import Contract, read_image
from bmc.errors import BmcError
from bmc.stages import parents_for, soft_targets
from bmc.train import data as data_mod
from bmc.train.augment import LIGHT, AugmentConfig, augmented_view, plain_view
from bmc.train.config import MODES, STRATEGIES, TrainConfig, TrainError  # noqa: F401 - re-exported

if TYPE_CHECKING:
    from bmc.train.evaluate import Evaluation


class _Log:
    def __init__(self, path: Path):
        self.path = path

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(self.path, "a") as fh:
            fh.write(line + "\n")


def _progress(iterable, total, desc):
    """A progress bar with rate and ETA (tqdm), or None where tqdm is missing."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(iterable, total=total, desc=desc, unit="img", mininterval=5.0)


def init_from(model, path: str | Path, contract: Contract, splits, log) -> None:
    """Start ``model`` from a trained classifier of the same backbone: every backbone weight, and the
    head when the source knows the same classes in the same order (else the head starts afresh).

    The way a laboratory retrains on its own cells from a model that already knows blood cells
    (``bmc data harvest``), and the way a run is continued. Where the source's run folder keeps its
    split, test images it was trained on are counted and reported: they make test figures optimistic.
    """
    import keras

    from bmc.train.evaluate import contract_for

    path = Path(path)
    if not path.is_file() or path.suffix not in (".keras", ".tflite"):
        raise TrainError(
            f"{path}: --init-from needs a trained model.keras (a run folder's) or a shipped float16 .tflite"
        )
    if path.suffix == ".tflite":  # the files a device holds: the float weights, BatchNorm folded in
        from bmc.card import load_card
        from bmc.train.recover import recover

        try:
            _, src_contract = load_card(path)
            src = recover(path, src_contract)
        except BmcError as e:
            raise TrainError(str(e)) from e
        src_labels = tuple(src_contract.labels)
        log(f"recovered the float model of {path} (its BatchNormalization folded into the convolutions)")
    else:
        try:
            src = keras.models.load_model(path, compile=False)
        except Exception as e:  # noqa: BLE001 - Keras raises several kinds for a bad file
            raise TrainError(f"{path}: not a loadable Keras model ({e})") from e
        src_labels = tuple(contract_for(path).labels)
    by_name = {l.name: l for l in src.layers}
    copied, differ = 0, []
    for layer in model.layers:
        if not layer.weights or layer.name == "cell_class":
            continue
        other = by_name.get(layer.name)
        shapes = [tuple(w.shape) for w in layer.weights]
        if other is None or [tuple(w.shape) for w in other.weights] != shapes:
            differ.append(layer.name)
            continue
        layer.set_weights(other.get_weights())
        copied += 1
    if differ:
        raise TrainError(
            f"{path}: not the same backbone ({len(differ)} layers differ, e.g. {differ[:3]}); "
            "--init-from takes a model trained with the same --backbone and --input-size"
        )
    head = src_labels == tuple(contract.labels)
    if head:
        model.get_layer("cell_class").set_weights(by_name["cell_class"].get_weights())
    log(
        f"initialised from {path}: {copied} backbone layers"
        + (
            ", and its head (same classes)"
            if head
            else f"; head starts afresh ({len(src_labels)} classes there, {contract.num_classes} here)"
        )
    )
    split_file = path.parent / "split.json"
    if split_file.is_file():
        # the same image by its real path, or by class and file stem (a packed copy is .webp)
        def keys(s):
            return {str(Path(s.path).resolve()), (s.label, Path(s.path).stem)}

        before = data_mod.load_split(split_file)
        seen = set().union(*(keys(s) for part in ("train", "val") for s in before.get(part, [])))
        leaked = sum(bool(keys(s) & seen) for s in splits["test"])
        if leaked:
            log(
                f"warning: {leaked} of {len(splits['test'])} test images were training or validation images of "
                f"{path}: test figures are optimistic (reuse its split: --split {split_file})"
            )


def limit(samples, per_class: int | None, seed: int):
    if not per_class:
        return samples
    rng = np.random.default_rng(seed)
    by = {}
    for s in samples:
        by.setdefault(s.label, []).append(s)
    out = []
    for label in sorted(by):
        items = by[label]
        keep = rng.choice(len(items), size=min(per_class, len(items)), replace=False)
        out.extend(items[i] for i in sorted(keep))
    return out


def class_weight_for(y: np.ndarray, n_classes: int) -> dict[int, float]:
    """Balanced weights n / (k * n_c), as scikit-learn's ``compute_class_weight('balanced')``."""
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(y)
    w = compute_class_weight("balanced", classes=present, y=y)
    out = {int(c): 1.0 for c in range(n_classes)}
    out.update({int(c): float(v) for c, v in zip(present, w)})
    return out


def _devices() -> list:
    """The GPUs that the Keras backend sees (TensorFlow, JAX or PyTorch)."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.config.list_physical_devices("GPU")
    if backend == "jax":
        import jax

        return [d for d in jax.devices() if d.platform == "gpu"]
    if backend == "torch":
        import torch

        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return []


def train(cfg: TrainConfig) -> Evaluation:
    """Run ``bmc train``; returns its test figures. Everything lands in ``cfg.out``."""
    t_start = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log = _Log(out / "bmc.train.log")

    # -- data and split ------------------------------------------------------------------
    if cfg.split_file:
        splits = data_mod.load_split(cfg.split_file)
        log(f"reusing split {cfg.split_file}")
    else:
        samples = data_mod.discover(cfg.data, cfg.label_from, cfg.manifest, cfg.label_column, cfg.group_column)
        samples = limit(samples, cfg.limit_per_class, cfg.seed)
        splits = data_mod.split(samples, cfg.fractions, cfg.seed)
    data_mod.save_split(splits, out / "split.json")
    labels = sorted({s.label for part in splits.values() for s in part})
    cell_fraction = cfg.cell_fraction
    from bmc.train.cellscale import measure_cell_fraction, measure_lamp

    if cell_fraction is None:
        cell_fraction, n_measured = measure_cell_fraction(splits["train"], cfg.crop_fraction, seed=cfg.seed)
        log(f"cell scale: a cell spans {cell_fraction:.3f} of the crop (median of {n_measured} training images)")
    lamp = measure_lamp(splits["train"], seed=cfg.seed)
    log(f"lamp (training images' background, RGB): {lamp}")
    contract = Contract(
        labels=tuple(labels),
        input_size=cfg.input_size,
        crop_fraction=cfg.crop_fraction,
        cell_fraction=round(cell_fraction, 4),
        stain_norm=cfg.stain_norm,
        lamp=lamp,
        parents=parents_for(labels),
    )
    (out / "contract.json").write_text(contract.to_json())
    (out / "labels.txt").write_text("\n".join(labels) + "\n")
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    index = {l: i for i, l in enumerate(labels)}
    log(
        f"{len(labels)} classes; train {len(splits['train'])}, val {len(splits['val'])}, "
        f"test {len(splits['test'])} images"
    )

    gpus = _devices()
    mode = cfg.mode if cfg.mode != "auto" else ("full" if gpus else "cached")
    log(f"mode {mode} ({len(gpus)} GPU(s)); backbone {cfg.backbone}")
    if mode == "full":
        model, history, skipped = _train_full(cfg, contract, splits, index, log, gpus)
    else:
        model, history, skipped = _train_cached(cfg, contract, splits, index, log)

    model_path = out / "model.keras"
    model.save(model_path)
    log(f"saved {model_path}")

    # -- honest evaluation of the saved artifact on the held-out test split ----------------
    import keras

    from bmc.train.evaluate import evaluate_samples, write_reports

    saved = keras.models.load_model(model_path)
    test = [s for s in splits["test"] if s.path not in {p for p, _ in skipped}]
    ev = evaluate_samples(saved, contract, test, batch_size=cfg.batch_size)
    for s in ev.skipped:  # unreadable test images: listed, never silently dropped
        log(f"skipping unreadable image: {s['why']}")
    ev = dataclasses.replace(
        ev,
        skipped=[{"path": p, "why": w} for p, w in skipped] + ev.skipped,
        train_seconds=round(time.time() - t_start, 1),
    )
    write_reports(ev, out, title=f"{cfg.backbone} · test split")
    (out / "history.json").write_text(json.dumps(history, indent=1))
    log(
        f"test accuracy {ev.metrics.accuracy:.4f}, macro-F1 {ev.metrics.macro_f1:.4f} "
        f"(n={ev.metrics.n}); total {ev.train_seconds / 60:.1f} min"
    )
    return ev


def _train_cached(cfg, contract, splits, index, log):
    """Cached training: the frozen bottom's activations computed once (``cfg.views`` augmented
    views of each training image), then phase 1 (the head on the top's pooled features) and
    phase 2 (the top blocks fine-tuned on the cached activations), each kept only if it helps."""
    import keras

    from bmc.train.model import build_classifier, set_trainable_from, split_at

    keras.utils.set_random_seed(cfg.seed)
    model = build_classifier(cfg.backbone, contract, cfg.weights, cfg.dropout)
    if cfg.init_from:
        init_from(model, cfg.init_from, contract, splits, log)
    bottom, top, feat_model = split_at(model, cfg.fine_tune_from)
    skipped: list[tuple[str, str]] = []
    timings: dict[str, float] = {}
    a_train, y_train = _cache(bottom, splits["train"], cfg.views, "train", cfg, contract, index, log, skipped, timings)
    a_val, y_val = _cache(bottom, splits["val"], 1, "val", cfg, contract, index, log, skipped, timings)
    targets = soft_targets(contract.labels, cfg.label_smoothing, cfg.neighbour_smoothing)
    cw = class_weight_for(y_train, contract.num_classes) if cfg.class_weights else None
    history, head_f1 = _fit_head(model, feat_model, (a_train, y_train), (a_val, y_val), targets, cw, cfg, log, timings)
    if cfg.fine_tune_epochs > 0:
        set_trainable_from(model, cfg.fine_tune_from)
        history += _fine_tune_top(
            model, top, (a_train, y_train), (a_val, y_val), targets, cw, head_f1, cfg, log, timings
        )
    set_trainable_from(model, None)
    history.append({"phase": "timings", **timings})
    return model, history, skipped


def _cache(bottom, samples, views, name, cfg, contract, index, log, skipped, timings):
    """The bottom's activations (float16) and labels for ``views`` views of each sample (augmented
    for training; the first of several views lightly); unreadable images are logged and skipped."""
    t0 = time.time()
    aug = AugmentConfig()
    rng = np.random.default_rng([cfg.seed, {"train": 0, "val": 1, "test": 2}[name]])
    acts, ys = [], []
    chunk = 128
    todo = [(s, v) for v in range(views) for s in samples]
    bar = _progress(None, len(todo), f"cache {name}")

    def make(args):
        (s, v), seed = args
        try:
            img = read_image(s.path)
        except ValueError as e:
            return None, s, str(e)
        if views == 1 and name != "train":
            return plain_view(img, contract), s, None
        light = v == 0 and views > 1
        return augmented_view(img, contract, np.random.default_rng(seed), LIGHT if light else aug), s, None

    with ThreadPoolExecutor(max_workers=2) as pool:
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            seeds = rng.integers(0, 2**31, len(part))
            batch, yb = [], []
            for x, s, err in pool.map(make, zip(part, seeds)):
                if err:
                    if (s.path, err) not in skipped:
                        skipped.append((s.path, err))
                        log(f"skipping unreadable image: {err}")
                    continue
                batch.append(x)
                yb.append(index[s.label])
            if batch:
                a = bottom.predict(np.stack(batch).astype(np.float32), batch_size=cfg.batch_size, verbose=0)
                acts.append(a.astype(np.float16))
                ys.extend(yb)
            if bar is not None:
                bar.update(len(part))
    if bar is not None:
        bar.close()
    timings[f"cache_{name}_s"] = round(time.time() - t0, 1)
    log(f"cached {name}: {len(ys)} views in {timings[f'cache_{name}_s']:.0f} s")
    return np.concatenate(acts), np.asarray(ys, dtype=np.int64)


def _fit_head(model, feat_model, train, val, targets, cw, cfg, log, timings) -> tuple[list[dict], float]:
    """Phase 1: the model's own head layers fitted on the frozen top's pooled features; the best
    epoch by validation macro-F1 is kept. Returns (history, best macro-F1)."""
    import keras

    from bmc.train.callbacks import BestOnValF1

    t0 = time.time()
    (a_train, y_train), (a_val, y_val) = train, val

    def feats(a):
        return feat_model.predict(a.astype(np.float32), batch_size=64, verbose=0)

    f_train, f_val = feats(a_train), feats(a_val)
    f_in = keras.Input(f_train.shape[1:])
    head = keras.Model(f_in, model.get_layer("cell_class")(model.get_layer("head_dropout")(f_in)))
    loss = keras.losses.CategoricalCrossentropy()  # smoothing is in the targets
    head.compile(keras.optimizers.Adam(cfg.head_lr), loss, metrics=["accuracy"])
    best = BestOnValF1(
        head, lambda: head.predict(f_val, batch_size=256, verbose=0), y_val, cfg.head_patience, log, "head"
    )
    head.fit(
        f_train,
        targets[y_train],
        batch_size=64,
        epochs=cfg.head_epochs,
        class_weight=cw,
        callbacks=[best],
        verbose=0,
        shuffle=True,
    )
    best.restore()
    timings["head_s"] = round(time.time() - t0, 1)
    log(f"phase 1 (head): best val macro-F1 {best.best:.4f} at epoch {best.best_epoch}")
    return list(best.history), best.best


def _fine_tune_top(model, top, train, val, targets, cw, head_f1, cfg, log, timings) -> list[dict]:
    """Phase 2: the top blocks (from ``cfg.fine_tune_from``) fine-tuned on the cached activations
    with a cosine schedule; kept only if it beats phase 1's validation macro-F1."""
    import keras
    import tensorflow as tf

    from bmc.train.callbacks import BestOnValF1

    t0 = time.time()
    (a_train, y_train), (a_val, y_val) = train, val
    steps = math.ceil(len(y_train) / cfg.batch_size) * cfg.fine_tune_epochs
    # cosine decay to 5% over the planned epochs: large steps first, a settled model at the end
    schedule = keras.optimizers.schedules.CosineDecay(cfg.fine_tune_lr, steps, alpha=0.05)
    top.compile(keras.optimizers.Adam(schedule), keras.losses.CategoricalCrossentropy(), metrics=["accuracy"])
    sw = np.array([cw[int(c)] for c in y_train], np.float32) if cw else np.ones(len(y_train), np.float32)
    ds = (
        tf.data.Dataset.from_tensor_slices((a_train, targets[y_train], sw))
        .shuffle(min(len(y_train), 20000), seed=cfg.seed)
        .batch(cfg.batch_size)
        .map(lambda a, y, w: (tf.cast(a, tf.float32), y, w))
        .prefetch(2)
    )
    best = BestOnValF1(
        top,
        lambda: top.predict(a_val.astype(np.float32), batch_size=64, verbose=0),
        y_val,
        cfg.patience,
        log,
        "fine-tune",
    )
    phase1_weights = [w.copy() for w in model.get_weights()]
    top.fit(ds, epochs=cfg.fine_tune_epochs, callbacks=[best], verbose=1 if os.isatty(1) else 2)
    if best.best >= head_f1:
        best.restore()
        log(
            f"phase 2 (fine-tune from {cfg.fine_tune_from}): best val macro-F1 {best.best:.4f} at epoch {best.best_epoch}"
        )
    else:  # fine-tuning did not beat the head alone: keep phase 1's weights
        model.set_weights(phase1_weights)
        log(f"phase 2 did not improve on phase 1 ({best.best:.4f} < {head_f1:.4f}); keeping the phase-1 weights")
    timings["fine_tune_s"] = round(time.time() - t0, 1)
    return list(best.history)


def _readable(splits, workers, log):
    """Drop the training and validation images that do not decode, logging each one."""

    def check(s):
        try:
            read_image(s.path)
        except ValueError as e:
            return s, str(e)
        return s, None

    kept, skipped = dict(splits), []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for part in ("train", "val"):
            kept[part] = []
            for s, err in pool.map(check, splits[part]):
                if err:
                    skipped.append((s.path, err))
                    log(f"skipping unreadable image: {err}")
                else:
                    kept[part].append(s)
    return kept, skipped


def _train_full(cfg, contract, splits, index, log, gpus):
    """End to end on every image, augmented afresh each epoch: the GPU path.

    Runs on whichever Keras backend is installed (TensorFlow, or JAX / PyTorch on a GPU server
    without TensorFlow): mixed precision (float16 under TensorFlow, bfloat16 elsewhere), and
    ``tf.distribute.MirroredStrategy`` across several GPUs under TensorFlow. The best weights so
    far are kept in ``best.weights.h5`` in the run folder: a run that is killed (a rented machine
    taken back, a power cut) loses at most the epochs since its last improvement.
    """
    import keras

    from bmc.train.model import build_classifier

    scope, replicas = _distribution(cfg, gpus, log)
    keras.utils.set_random_seed(cfg.seed)
    train_ds, val_ds, y_val, skipped = _full_batches(cfg, contract, splits, index, replicas, log)
    with scope():
        model = build_classifier(cfg.backbone, contract, cfg.weights, cfg.dropout)
        if cfg.init_from:
            init_from(model, cfg.init_from, contract, splits, log)
    history = []
    for phase, block, lr, epochs in (
        ("head", None, cfg.head_lr, min(cfg.head_epochs, cfg.full_head_epochs)),
        ("fine-tune", cfg.fine_tune_from, cfg.fine_tune_lr, cfg.fine_tune_epochs),
    ):
        if epochs > 0:
            history += _fit_phase(model, scope, phase, block, lr, epochs, train_ds, val_ds, y_val, cfg, log)
    return _plain_copy(model, cfg, contract), history, sorted(set(skipped + train_ds.skipped))


def _distribution(cfg, gpus, log):
    """Mixed precision and the device strategy of the full path: ``(scope, replicas)``."""
    import contextlib

    import keras

    backend = keras.backend.backend()
    if cfg.mixed_precision == "on" or (cfg.mixed_precision == "auto" and gpus):
        policy = "mixed_float16" if backend == "tensorflow" else "mixed_bfloat16"
        keras.mixed_precision.set_global_policy(policy)
        log(f"mixed precision: {policy}")
    if backend != "tensorflow":
        if cfg.strategy == "mirrored":
            raise TrainError(f"--strategy mirrored needs the TensorFlow backend (KERAS_BACKEND is {backend!r})")
        log(f"backend {backend}, one device")
        return contextlib.nullcontext, 1
    import tensorflow as tf

    if cfg.strategy == "mirrored" or (cfg.strategy == "auto" and len(gpus) > 1):
        strategy = tf.distribute.MirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    log(f"strategy {type(strategy).__name__} with {replicas} replica(s)")
    return strategy.scope, replicas


def _full_batches(cfg, contract, splits, index, replicas, log):
    """The readable images as augmented training batches and plain validation batches."""
    from bmc.train.batches import Batches

    workers = max(1, min(16, (os.cpu_count() or 2)))
    # unreadable images are found (and listed) here, once: the workers that augment are processes
    splits, skipped = _readable(splits, workers, log)
    y_train = np.array([index[s.label] for s in splits["train"]])
    y_val = np.array([index[s.label] for s in splits["val"]])
    cw = class_weight_for(y_train, contract.num_classes) if cfg.class_weights else None
    batch = cfg.batch_size * replicas
    targets = soft_targets(contract.labels, cfg.label_smoothing, cfg.neighbour_smoothing)
    train_ds = Batches(
        splits["train"], index, contract, batch, AugmentConfig(), cfg.seed, cw, workers=workers, targets=targets
    )
    val_ds = Batches(splits["val"], index, contract, batch, None, cfg.seed, workers=workers)
    return train_ds, val_ds, y_val, skipped


def _fit_phase(model, scope, phase, block, lr, epochs, train_ds, val_ds, y_val, cfg, log) -> list[dict]:
    """One phase of the full path (blocks from ``block`` on trainable, cosine decay to 5% over
    its epochs, as on the CPU path), ending on its best validation macro-F1's weights."""
    import keras

    from bmc.train.callbacks import BestOnValF1
    from bmc.train.model import set_trainable_from

    set_trainable_from(model, block)
    schedule = keras.optimizers.schedules.CosineDecay(lr, len(train_ds) * epochs, alpha=0.05)
    with scope():
        # smoothing is in the targets
        model.compile(keras.optimizers.Adam(schedule), keras.losses.CategoricalCrossentropy(), metrics=["accuracy"])
    best = BestOnValF1(
        model,
        lambda: model.predict(val_ds, verbose=0),
        y_val,
        cfg.patience,
        log,
        phase,
        Path(cfg.out) / "best.weights.h5",
    )
    t0 = time.time()
    model.fit(train_ds, epochs=epochs, callbacks=[best], verbose=1 if os.isatty(1) else 2)
    best.restore()
    log(f"{phase}: best val macro-F1 {best.best:.4f} at epoch {best.best_epoch} ({time.time() - t0:.0f} s)")
    return list(best.history)


def _plain_copy(model, cfg, contract):
    """The same weights in a fresh float32 graph with no optimizer state: what convert/ and the
    device expect of a model.keras (and a third of the size of a compiled model's file)."""
    import keras

    from bmc.train.model import build_classifier

    keras.mixed_precision.set_global_policy("float32")
    plain = build_classifier(cfg.backbone, contract, "none", cfg.dropout)
    plain.set_weights([np.asarray(w, np.float32) for w in model.get_weights()])
    return plain
