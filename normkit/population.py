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

__all__ = ["reestimate_population_statistics", "has_running_statistics"]


def has_running_statistics(layer):
    """Whether ``layer`` keeps running statistics that
    :func:`reestimate_population_statistics` can replace: a
    ``running_mean`` and a running spread (``running_var`` or
    ``running_std``, named by the layer's ``spread_name``) that are not
    None."""
    spread = getattr(layer, "spread_name", None)
    return (spread is not None and getattr(layer, "running_mean", None) is not None
            and getattr(layer, spread, None) is not None)


def _check_layer(layer, index):
    func = "reestimate_population_statistics"
    if getattr(layer, "spread_name", None) is None:
        raise TypeError(f"{func}: layers[{index}] must be a layer with running "
                        f"statistics (BatchNorm, BatchRenorm, InstanceNorm, "
                        f"...), got {type(layer).__name__}")
    if not has_running_statistics(layer):
        raise ValueError(f"{func}: layers[{index}] ({type(layer).__name__}) "
                         f"keeps no running statistics "
                         f"(track_running_stats=False)")


class _Accumulator:
    """Pooled sums over the batches that one layer sees.

    Per channel: ``values = sum_B m_B``, ``sum_x = sum_B m_B * mu_B``,
    ``sum_m2 = sum_B m_B * sigma_B^2`` and ``dof = sum_B (m_B - 1)``, where
    a "batch" is one statistics group of the view the layer normalizes with
    in training (the whole batch for BatchNorm and BatchRenorm, one sample
    for InstanceNorm, one virtual batch for Ghost BatchNorm).
    """

    def __init__(self, layer):
        self.layer = layer
        self.values = 0
        self.dof = 0
        self.groups = 0
        self.sum_x = np.zeros(layer.num_features)
        self.sum_m2 = np.zeros(layer.num_features)

    def add(self, x, saved):
        """Add the statistics groups of ``x`` in the view of ``saved``, the
        record of the layer's training-mode forward on ``x``."""
        view = saved.view
        if not saved.batch_stats or view.J != 1 or view.K != self.sum_x.size:
            raise ValueError(f"reestimate_population_statistics: "
                             f"{type(self.layer).__name__} must normalize "
                             f"with per-channel batch statistics in training "
                             f"mode, got the view {view}")
        mean, var = engine.moments(x, view)          # (P, C) each
        m = view.group_size
        self.values += m * view.P
        self.dof += (m - 1) * view.P
        self.groups += view.P
        self.sum_x += m * mean.sum(axis=0)
        self.sum_m2 += m * var.sum(axis=0)

    def estimate(self):
        """``(E[x], Var[x])`` pooled over every group seen."""
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
    runs as usual (in training mode) and the input's moments over the view
    it used are added afterwards.  The running buffers and the batch counter
    are put back after every call, so they stay as they were.
    """

    def __init__(self, accumulators):
        self.accumulators = accumulators

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
            y, saved = original(x)
            for name, value in zip(names, kept):
                getattr(layer, name)[...] = value
            layer.num_batches_tracked = count
            acc.add(x, saved)
            return y, saved

        return recording_forward


def reestimate_population_statistics(layers, batches, forward=None, *,
                                     sequential=False):
    """Replace running statistics by population estimates over ``batches``.

    For each layer, per channel, over every batch ``B`` of ``m_B`` values
    per channel that reaches it

    .. math::

        E[x] = \\frac{\\sum_B m_B \\mu_B}{\\sum_B m_B}, \\qquad
        \\operatorname{Var}[x] = \\frac{\\sum_B m_B \\sigma_B^2}
                                      {\\sum_B (m_B - 1)}

    with the batch mean ``mu_B`` and biased variance ``sigma_B^2`` from
    :func:`normkit.engine.moments` over the view the layer normalizes with
    in training: a "batch" is the whole batch for BatchNorm and
    BatchRenorm (``m_B = N * spatial``), each sample for InstanceNorm
    (``m_B = spatial``), each virtual batch for Ghost BatchNorm.  With equal
    batch sizes this is exactly the Batch Normalization paper's
    ``mean_B mu_B`` and ``m / (m - 1) * mean_B sigma_B^2``.  With unequal
    sizes the mean weighs each batch by its number of values (it is the
    mean of every value seen) and the variance by its degrees of freedom
    ``m_B - 1`` (the pooled unbiased within-batch variance), so a short
    last batch counts for what it holds.  ``running_var`` receives
    ``Var[x]``; BatchRenorm's ``running_std`` receives
    ``sqrt(Var[x] + eps)``, the spread its inference formula
    ``(x - running_mean) / running_std`` divides by, as BatchNorm's
    ``sqrt(running_var + eps)``.  Weights, biases and
    ``num_batches_tracked`` are never changed, and each layer ends in the
    training mode it started in.

    Parameters
    ----------
    layers : layer or sequence of layers
        Layers with per-channel running statistics
        (:func:`has_running_statistics`): :class:`~normkit.BatchNorm`,
        :class:`~normkit.BatchRenorm`, :class:`~normkit.InstanceNorm` with
        ``track_running_stats``, and schemes built the same way.
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
        order given, which must be the order of the network): in the pass
        for layer ``k`` the other listed layers run in inference mode, and
        layers ``0..k-1`` already hold their new population statistics, so
        layer ``k`` is estimated from the input it will see at inference.

    Returns
    -------
    list of dict
        Per layer, in order: ``running_mean`` and ``running_var`` (or
        ``running_std``) as written, ``batches`` (statistics groups pooled)
        and ``values`` (values per channel pooled).

    Raises
    ------
    TypeError, ValueError
        For a layer without running statistics, an empty ``layers``, a
        ``forward`` that is not callable, an iterator with
        ``sequential=True``, or a layer that received no input (and
        whatever a layer raises on its input); the running statistics
        of the layers not yet estimated are then unchanged (with
        ``sequential=True`` the layers before are already updated).

    Examples
    --------
    >>> import numpy as np
    >>> import normkit
    >>> bn = normkit.BatchNorm1d(3)
    >>> batches = [np.random.default_rng(i).normal(5.0, 2.0, (16, 3))
    ...            for i in range(4)]
    >>> info = normkit.reestimate_population_statistics([bn], batches)
    >>> bool(np.allclose(bn.running_mean, np.concatenate(batches).mean(axis=0)))
    True
    """
    func = "reestimate_population_statistics"
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers]
    if not layers:
        raise ValueError(f"{func}: layers must not be empty")
    for index, layer in enumerate(layers):
        _check_layer(layer, index)
        if any(layer is other for other in layers[:index]):
            raise ValueError(f"{func}: layers[{index}] is listed twice")
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
    accumulators = [_Accumulator(layer) for layer in layers]
    passes = ([[acc] for acc in accumulators] if sequential
              else [accumulators])
    modes = [layer.training for layer in layers]
    try:
        for recorded in passes:
            for layer in layers:
                layer.train(any(acc.layer is layer for acc in recorded))
            _run_pass(recorded, batches, forward)
            estimates = [acc.estimate() for acc in recorded]
            for acc, (mean, var) in zip(recorded, estimates):
                _write(acc.layer, mean, var)
    finally:
        for layer, mode in zip(layers, modes):
            layer.train(mode)
    return [{"running_mean": acc.layer.running_mean.copy(),
             acc.layer.spread_name: getattr(acc.layer, acc.layer.spread_name).copy(),
             "batches": acc.groups, "values": acc.values}
            for acc in accumulators]


def _run_pass(accumulators, batches, forward):
    """Run ``forward`` on every batch while ``accumulators`` record."""
    with _Recording(accumulators):
        for batch in batches:
            forward(batch)
    for acc in accumulators:
        if acc.groups == 0:
            raise ValueError(f"reestimate_population_statistics: "
                             f"{type(acc.layer).__name__} received no input; "
                             f"forward must call every listed layer")
