"""Population re-estimation of inference statistics (Ioffe and Szegedy 2015).

The running statistics that a layer accumulates during training are an
exponential (or cumulative) average of batch statistics taken while the
weights were still moving.  After training, Algorithm 2 of the Batch
Normalization paper replaces them by population estimates over a pass of
training batches with the weights frozen: for batches of ``m`` values per
channel,

.. math::

    E[x] = \\operatorname{mean}_B \\mu_B, \\qquad
    \\operatorname{Var}[x] = \\frac{m}{m - 1} \\operatorname{mean}_B \\sigma_B^2 ,

with ``sigma_B^2`` the biased batch variance.  :func:`reestimate_population_statistics`
does this for any number of layers of a network at once.
"""

import numpy as np

from . import engine
from .layers import BatchNorm, BatchRenorm, InstanceNorm

__all__ = ["reestimate_population_statistics"]


def _per_sample(layer, index):
    """Whether ``layer`` keeps statistics per sample (InstanceNorm)."""
    func = "reestimate_population_statistics"
    if isinstance(layer, InstanceNorm):
        if not layer.track_running_stats:
            raise ValueError(f"{func}: layers[{index}] is an InstanceNorm "
                             f"without running statistics "
                             f"(track_running_stats=False)")
        return True
    if isinstance(layer, BatchNorm):
        if not layer.track_running_stats:
            raise ValueError(f"{func}: layers[{index}] is a BatchNorm without "
                             f"running statistics (track_running_stats=False)")
        return False
    if isinstance(layer, BatchRenorm):
        return False
    raise TypeError(f"{func}: layers[{index}] must be a BatchNorm, BatchRenorm "
                    f"or InstanceNorm layer, got {type(layer).__name__}")


class _Accumulator:
    """Pooled sums over the batches that one layer sees.

    Per channel: ``values = sum_B m_B``, ``sum_x = sum_B m_B * mu_B``,
    ``sum_m2 = sum_B m_B * sigma_B^2`` and ``dof = sum_B (m_B - 1)``, where
    a "batch" is one statistics group of the layer's view (the whole batch
    for BatchNorm and BatchRenorm, one sample for InstanceNorm).
    """

    def __init__(self, layer, per_sample):
        self.layer = layer
        self.per_sample = per_sample
        self.values = 0
        self.dof = 0
        self.groups = 0
        self.sum_x = np.zeros(layer.num_features)
        self.sum_m2 = np.zeros(layer.num_features)

    def add(self, x):
        axis = self.layer.axis % x.ndim
        view = engine.channel_view(x.shape, axis, self.per_sample)
        mean, var = engine.moments(x, view)          # (P, C) each
        m = view.group_size
        self.values += m * view.P
        self.dof += (m - 1) * view.P
        self.groups += view.P
        self.sum_x += m * mean.sum(axis=0)
        self.sum_m2 += m * var.sum(axis=0)

    def estimate(self):
        """``(E[x], Var[x])`` pooled over every group seen."""
        if self.dof <= 0:
            raise ValueError(f"reestimate_population_statistics: "
                             f"{type(self.layer).__name__} saw "
                             f"{self.values} values per channel in "
                             f"{self.groups} batches; need at least one batch "
                             f"with more than one value per channel")
        return self.sum_x / self.values, self.sum_m2 / self.dof


def _write(layer, mean, var):
    """Store the estimates in the layer's running buffers, in place."""
    layer.running_mean[...] = mean
    if layer.spread_name == "running_std":
        layer.running_std[...] = np.sqrt(var + layer.eps)
    else:
        layer.running_var[...] = var


class _Recording:
    """Context: each listed layer records its input into its accumulator.

    The layer's ``_forward`` is shadowed on the instance, so ``layer(x)``
    runs as usual and the input's moments are added afterwards.  With
    ``freeze`` the running buffers and batch counter are put back after
    every call, so a training-mode forward leaves them as they were.
    """

    def __init__(self, accumulators, freeze):
        self.accumulators = accumulators
        self.freeze = freeze

    def __enter__(self):
        for acc in self.accumulators:
            acc.layer._forward = self._recorder(acc)
        return self

    def __exit__(self, *exc):
        for acc in self.accumulators:
            del acc.layer._forward

    def _recorder(self, acc):
        layer = acc.layer
        original = type(layer)._forward.__get__(layer)
        names = ("running_mean", layer.spread_name)

        def recording_forward(x):
            kept = [getattr(layer, name).copy() for name in names]
            count = layer.num_batches_tracked
            result = original(x)
            if self.freeze:
                for name, value in zip(names, kept):
                    getattr(layer, name)[...] = value
                layer.num_batches_tracked = count
            acc.add(x)
            return result

        return recording_forward


def reestimate_population_statistics(layers, batches, forward=None, *,
                                     sequential=False):
    """Replace running statistics by population estimates over ``batches``.

    For each layer, per channel, over every batch ``B`` of ``m_B`` values
    per channel that reaches it (``m_B = N * spatial`` for BatchNorm and
    BatchRenorm; for InstanceNorm each sample of each batch counts as a
    batch of ``m_B = spatial`` values)

    .. math::

        E[x] = \\frac{\\sum_B m_B \\mu_B}{\\sum_B m_B}, \\qquad
        \\operatorname{Var}[x] = \\frac{\\sum_B m_B \\sigma_B^2}
                                      {\\sum_B (m_B - 1)}

    with the batch mean ``mu_B`` and biased variance ``sigma_B^2`` from
    :func:`normkit.engine.moments`.  With equal batch sizes this is exactly
    the Batch Normalization paper's ``mean_B mu_B`` and
    ``m / (m - 1) * mean_B sigma_B^2``.  With unequal sizes the mean weighs
    each batch by its number of values (it is the mean of every value seen)
    and the variance by its degrees of freedom ``m_B - 1`` (the pooled
    unbiased within-batch variance), so a short last batch counts for what
    it holds.  ``running_var`` receives ``Var[x]``; BatchRenorm's
    ``running_std`` receives ``sqrt(Var[x] + eps)``, the spread its
    inference formula ``(x - running_mean) / running_std`` divides by, as
    BatchNorm's ``sqrt(running_var + eps)``.  Weights, biases and
    ``num_batches_tracked`` are never changed, and each layer ends in the
    training mode it started in.

    Parameters
    ----------
    layers : layer or sequence of layers
        :class:`~normkit.BatchNorm`, :class:`~normkit.BatchRenorm` or
        :class:`~normkit.InstanceNorm` (with ``track_running_stats``).
    batches : iterable
        Inputs handed to ``forward`` one at a time (a re-iterable sequence
        when ``sequential``).
    forward : callable, optional
        ``forward(batch)`` runs the whole model on one batch, calling the
        layers; its return value is ignored.  Default: every layer is
        called on the batch itself (one layer on its own data).
    sequential : bool
        How a layer's input depends on the layers before it.  False (the
        default, one pass, Algorithm 2 of the paper): every listed layer
        runs in training mode, as during training, with its running
        buffers held fixed, so each layer's statistics are those of the
        input it saw while training.  True (one pass per layer, in the
        order given, which must be the order of the network): all listed
        layers run in inference mode, and layer ``k`` is estimated from the
        input produced by layers ``0..k-1`` already holding their new
        population statistics, i.e. the input it will see at inference.

    Returns
    -------
    list of dict
        Per layer, in order: ``running_mean`` and ``running_var`` (or
        ``running_std``) as written, ``batches`` (statistics groups pooled)
        and ``values`` (values per channel pooled).
    """
    func = "reestimate_population_statistics"
    single = not isinstance(layers, (list, tuple))
    layers = [layers] if single else list(layers)
    if not layers:
        raise ValueError(f"{func}: layers must not be empty")
    accumulators = [_Accumulator(layer, _per_sample(layer, i))
                    for i, layer in enumerate(layers)]
    if forward is None:
        def forward(batch):
            for layer in layers:
                layer(batch)
    elif not callable(forward):
        raise TypeError(f"{func}: forward must be callable or None, got "
                        f"{type(forward).__name__}")
    if sequential and iter(batches) is batches:
        raise TypeError(f"{func}: sequential=True makes one pass per layer, "
                        f"so batches must be a re-iterable sequence, got the "
                        f"iterator {type(batches).__name__}")
    modes = [layer.training for layer in layers]
    try:
        if sequential:
            for layer in layers:
                layer.eval()
            for acc in accumulators:
                _run_pass([acc], batches, forward, freeze=False)
                _write(acc.layer, *acc.estimate())
        else:
            for layer in layers:
                layer.train()
            _run_pass(accumulators, batches, forward, freeze=True)
            for acc in accumulators:
                _write(acc.layer, *acc.estimate())
    finally:
        for layer, mode in zip(layers, modes):
            layer.train(mode)
    return [{"running_mean": acc.layer.running_mean.copy(),
             acc.layer.spread_name: getattr(acc.layer, acc.layer.spread_name).copy(),
             "batches": acc.groups, "values": acc.values}
            for acc in accumulators]


def _run_pass(accumulators, batches, forward, freeze):
    """Run ``forward`` on every batch while ``accumulators`` record."""
    with _Recording(accumulators, freeze):
        for batch in batches:
            forward(batch)
    for acc in accumulators:
        if acc.groups == 0:
            raise ValueError(f"reestimate_population_statistics: "
                             f"{type(acc.layer).__name__} received no input; "
                             f"forward must call every listed layer")
