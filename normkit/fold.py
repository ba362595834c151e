"""Folding inference-mode BatchNorm into the layer before it."""

import numpy as np

from .checks import check_axis, check_eps

__all__ = ["fold_batch_norm_weights"]


def fold_batch_norm_weights(weight, bias, running_mean, running_var,
                            gamma=None, beta=None, eps=1e-5, axis=0):
    """Fold an inference-mode BatchNorm into the convolution or dense layer
    that feeds it.

    With ``s = gamma / sqrt(running_var + eps)`` per output channel, the
    layer ``z = W x + b`` followed by ``y = (z - running_mean) * s + beta``
    equals ``y = W' x + b'`` with

    .. math::

        W'_c = s_c W_c, \\qquad b'_c = (b_c - \\mu_c) s_c + \\beta_c .

    The folded bias includes the BN scale ``s`` (a bias of the original
    layer is scaled too).  ``axis`` is the output-channel axis of
    ``weight``: 0 for ``torch.nn.Conv*d`` (grouped and depthwise included:
    their weight is ``(C_out, C_in / groups, *kernel)``) and
    ``torch.nn.Linear`` (``(out, in)``), the last axis for
    channels-last kernels such as Keras's ``(*kernel, C_in, C_out)``.
    Computed in float64 and returned in ``weight``'s dtype; the inputs are
    not modified.

    Parameters
    ----------
    weight : array
        The layer's weight.
    bias : array of shape (C,) or None
        The layer's bias (None: no bias, i.e. zeros).
    running_mean, running_var : array of shape (C,)
        The BatchNorm's running statistics.
    gamma, beta : array of shape (C,), optional
        The BatchNorm's affine parameters (default 1 and 0).
    eps : float, default 1e-5
    axis : int, default 0
        Output-channel axis of ``weight``.

    Returns
    -------
    weight, bias : array
        The folded weight (shape of ``weight``) and bias (``(C,)``).

    Examples
    --------
    >>> import numpy as np
    >>> import normkit
    >>> w, b = np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([1.0, -1.0])
    >>> fw, fb = normkit.fold_batch_norm_weights(
    ...     w, b, running_mean=np.array([1.0, 0.0]),
    ...     running_var=np.array([3.0, 0.0]), gamma=np.array([2.0, 1.0]),
    ...     beta=np.array([0.5, 0.0]), eps=1.0)
    >>> fw.tolist(), fb.tolist()
    ([[1.0, 2.0], [3.0, 4.0]], [0.5, -1.0])
    """
    weight = np.asarray(weight)
    if weight.dtype.kind != "f":
        raise TypeError(f"fold_batch_norm_weights: weight must be a float "
                        f"array, got {weight.dtype}")
    ax = check_axis(axis, weight.ndim, "fold_batch_norm_weights")
    eps = check_eps(eps, "fold_batch_norm_weights")
    C = weight.shape[ax]

    def channel(value, name, default):
        if value is None:
            if default is None:
                raise ValueError(f"fold_batch_norm_weights: {name} is required")
            return np.full(C, default)
        value = np.asarray(value, np.float64)
        if value.shape != (C,):
            raise ValueError(f"fold_batch_norm_weights: {name} must have shape "
                             f"({C},) (the channels on axis {axis} of weight), "
                             f"got {value.shape}")
        return value

    mean = channel(running_mean, "running_mean", None)
    var = channel(running_var, "running_var", None)
    scale = channel(gamma, "gamma", 1.0) / np.sqrt(var + eps)
    shape = [1] * weight.ndim
    shape[ax] = C
    folded_w = weight.astype(np.float64) * scale.reshape(shape)
    folded_b = ((channel(bias, "bias", 0.0) - mean) * scale
                + channel(beta, "beta", 0.0))
    return folded_w.astype(weight.dtype), folded_b.astype(weight.dtype)
