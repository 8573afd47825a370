"""Training inputs: split rows -> preprocessed uint8 arrays (the shared preprocessing) -> tf.data.

Images are decoded once into memory (a few hundred MB at most for datasets of this size), so every
epoch costs only augmentation and the model.
"""
from __future__ import annotations

import logging
import random
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from edge_runtime.preprocess import ImageError, preprocess_file

log = logging.getLogger("train.data")


@dataclass
class ArraySet:
    """Preprocessed images of one split for one stage view."""
    x: np.ndarray            # N x H x W x 3 uint8
    labels: list[str]        # class name per image
    paths: list[str]

    def targets(self, classes: list[str]) -> np.ndarray:
        index = {c: i for i, c in enumerate(classes)}
        return np.array([index[label] for label in self.labels], dtype=np.int32)


def limit_per_class(rows: list[tuple[str, str]], max_per_class: int, seed: int) -> list[tuple[str, str]]:
    """Deterministic per-class subsample (0 = keep all)."""
    if max_per_class <= 0:
        return rows
    by_class: dict[str, list] = defaultdict(list)
    for row in rows:
        by_class[row[1]].append(row)
    rng = random.Random(seed)
    kept = []
    for label in sorted(by_class):
        items = sorted(by_class[label])
        rng.shuffle(items)
        kept.extend(items[:max_per_class])
    return sorted(kept)


def load_arrays(rows: list[tuple[str, str]], image_size: int, workers: int = 4) -> ArraySet:
    """Decode + preprocess every (path, label) row; unreadable files are logged and left out."""
    def one(row):
        try:
            return row, preprocess_file(row[0], image_size)
        except ImageError as exc:
            log.warning("skipping %s: %s", row[0], exc)
            return row, None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(one, rows))
    kept = [(row, arr) for row, arr in results if arr is not None]
    x = np.stack([arr for _, arr in kept]) if kept else np.zeros((0, image_size, image_size, 3), np.uint8)
    return ArraySet(x=x, labels=[row[1] for row, _ in kept], paths=[row[0] for row, _ in kept])


def build_augmenter(seed: int):
    """Augmentation for the training split only: geometry as the study (rotation, zoom, flips) plus
    SEM-realistic brightness/contrast, blur and shot-like noise. Works on float pixels 0..255."""
    import keras
    import tensorflow as tf
    from keras import layers

    geometric = keras.Sequential([
        layers.RandomFlip("horizontal_and_vertical", seed=seed),
        layers.RandomRotation(0.05, fill_mode="reflect", seed=seed + 1),
        layers.RandomZoom((-0.15, 0.15), fill_mode="reflect", seed=seed + 2),
        layers.RandomBrightness(0.2, value_range=(0.0, 255.0), seed=seed + 3),
        layers.RandomContrast(0.3, seed=seed + 4),
    ], name="augment")

    def augment(x, y):
        x = tf.cast(x, tf.float32)
        # SEM gratings run either way: quarter turns are free, label-preserving variety.
        x = tf.image.rot90(x, k=tf.random.uniform([], 0, 4, dtype=tf.int32))
        x = geometric(x, training=True)
        # Beam defocus: blur about a third of the batches a little.
        blurred = tf.nn.avg_pool2d(x, 3, 1, "SAME")
        x = tf.where(tf.random.uniform([]) < 0.3, blurred, x)
        # Detector noise, per image strength.
        sigma = tf.random.uniform([tf.shape(x)[0], 1, 1, 1], 0.0, 8.0)
        x = x + tf.random.normal(tf.shape(x)) * sigma
        return tf.clip_by_value(x, 0.0, 255.0), y

    return augment


def make_dataset(x: np.ndarray, y: np.ndarray, batch_size: int, *, training: bool, seed: int):
    """Efficient tf.data pipeline: in-memory slices -> shuffle -> batch -> augment (train only) -> prefetch."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if training:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if training:
        ds = ds.map(build_augmenter(seed), num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.map(lambda a, b: (tf.cast(a, tf.float32), b), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
