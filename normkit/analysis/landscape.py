"""Measurements of the optimization landscape along training (Santurkar,
Tsipras, Ilyas and Madry 2018, "How Does Batch Normalization Help
Optimization?").

Every measurement is taken on a copy of the network, on the batch of the
current step, in training mode (batch statistics, as the optimizer sees
them), so training itself is untouched.  ``L(w)`` is the batch's mean
softmax cross-entropy and ``g = grad L(w)`` its gradient over every
parameter of the network (weights, biases, the normalizers' ``gamma`` and
``beta``), flattened into one vector.

- :func:`gradient_direction`: for each step size ``eta``, the loss
  ``L(w - eta g)`` (its range over the step sizes is the *variation of the
  loss* along the gradient, the paper's Figure 4a), the gradient change
  ``||grad L(w - eta g) - g||`` (*gradient predictiveness*, Figure 4b) and
  the *effective beta-smoothness* ``max_eta ||grad L(w - eta g) - g|| /
  ||eta g||`` (Figure 4c).
- :func:`internal_covariate_shift`: the paper's Definition 2.1: for each
  dense layer ``i``, ``G_i`` is the gradient of the loss with respect to
  its weight at ``w_t``, and ``G'_i`` the same gradient once every layer
  before ``i`` has taken this step's optimizer update (``w_{t+1}``) while
  layer ``i`` and those after it keep ``w_t``; ICS is ``||G_i - G'_i||``
  and the cosine of the angle between them.
"""

import copy

import numpy as np

from . import trainer


def parameters(network):
    """The network's parameters as one float64 vector, in the order of
    ``network.parameters()``."""
    return np.concatenate([np.asarray(getattr(layer, name), np.float64).ravel()
                           for layer, name in network.parameters()])


def set_parameters(network, vector):
    """Write ``vector`` (as :func:`parameters` orders it) into the
    network's parameters, keeping each parameter's dtype and shape."""
    start = 0
    for layer, name in network.parameters():
        value = getattr(layer, name)
        size = np.size(value)
        setattr(layer, name, vector[start:start + size].reshape(
            np.shape(value)).astype(value.dtype))
        start += size


def loss_and_gradient(network, x, y):
    """``(L, g)`` of ``network`` in training mode on the batch ``(x, y)``:
    the mean cross-entropy and its gradient as one float64 vector.  Runs
    on ``network`` itself (pass a copy to leave the original alone: a
    normalizer's running statistics move)."""
    network.train()
    loss, grad = trainer.softmax_cross_entropy(network(x), y)
    network.backward(grad)
    return loss, np.concatenate(
        [np.asarray(layer.grads[name], np.float64).ravel()
         for layer, name in network.parameters()])


def _at(network, vector, x, y):
    """:func:`loss_and_gradient` of a copy of ``network`` whose parameters
    are ``vector``."""
    moved = copy.deepcopy(network)
    set_parameters(moved, vector)
    return loss_and_gradient(moved, x, y)


def gradient_direction(network, x, y, step_sizes):
    """The loss and its gradient along the gradient direction (module doc).

    Parameters
    ----------
    network : Sequential
        Left unchanged (every evaluation runs on a copy).
    x, y : arrays
        The batch.
    step_sizes : sequence of float
        The ``eta`` of ``w - eta g``, each > 0.

    Returns
    -------
    dict
        ``loss`` (``L(w)``), ``gradient_norm`` (``||g||``), ``losses``
        (``L(w - eta g)`` per step size), ``gradient_changes``
        (``||grad L(w - eta g) - g||`` per step size), ``beta``
        (``max_eta ||grad L(w - eta g) - g|| / ||eta g||``).
    """
    w = parameters(network)
    loss, g = _at(network, w, x, y)
    norm = float(np.linalg.norm(g))
    losses, changes = [], []
    for eta in step_sizes:
        moved_loss, moved = _at(network, w - eta * g, x, y)
        losses.append(float(moved_loss))
        changes.append(float(np.linalg.norm(moved - g)))
    beta = max(change / (eta * norm) if norm > 0 else 0.0
               for change, eta in zip(changes, step_sizes))
    return {"loss": float(loss), "gradient_norm": norm, "losses": losses,
            "gradient_changes": changes, "beta": float(beta)}


def _dense_gradient(network, index, x, y):
    network.train()
    _, grad = trainer.softmax_cross_entropy(network(x), y)
    network.backward(grad)
    return np.asarray(network.layers[index].grads["weight"], np.float64).ravel()


def internal_covariate_shift(network, optimizer, x, y):
    """Santurkar et al.'s internal covariate shift of every dense layer at
    this step (module doc).

    Parameters
    ----------
    network : Sequential
        Left unchanged, like ``optimizer``.
    optimizer : SGD
        Its update (learning rate, momentum, weight decay as they are now)
        gives ``w_{t+1}``.
    x, y : arrays
        The batch.

    Returns
    -------
    list of dict
        Per dense layer in network order: ``layer`` (its index among the
        dense layers), ``l2`` (``||G - G'||``), ``cosine`` (``<G, G'> /
        (||G|| ||G'||)``) and ``gradient_norm`` (``||G||``).
    """
    updated, stepper = copy.deepcopy((network, optimizer))
    loss_and_gradient(updated, x, y)
    stepper.step()
    dense = [i for i, layer in enumerate(network.layers)
             if isinstance(layer, trainer.Dense)]
    rows = []
    for number, index in enumerate(dense):
        before = _dense_gradient(copy.deepcopy(network), index, x, y)
        mixed = copy.deepcopy(network)
        for layer, new in zip(mixed.layers[:index], updated.layers[:index]):
            for name in ("weight", "bias"):
                if getattr(layer, name, None) is not None:
                    setattr(layer, name, getattr(new, name).copy())
        after = _dense_gradient(mixed, index, x, y)
        scale = np.linalg.norm(before) * np.linalg.norm(after)
        rows.append({"layer": number,
                     "l2": float(np.linalg.norm(before - after)),
                     "cosine": float(before @ after / scale) if scale > 0 else 1.0,
                     "gradient_norm": float(np.linalg.norm(before))})
    return rows
