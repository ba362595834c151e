"""A small NumPy trainer whose normalization layers are normkit's own.

Layers follow the normkit layer protocol (``y = layer(x)``,
``dx = layer.backward(dy)`` filling ``layer.grads``, ``train()`` /
``eval()``), so a :class:`Sequential` network mixes them freely with
normkit's normalizers: no deep-learning framework is involved.

The network of the study (:func:`build_network`) for 8x8 digits::

    conv 3x3, 1 -> 8, pad 1 -> norm -> ReLU -> 2x2 average pool
    -> dense 128 -> 32 -> norm -> ReLU -> dense 32 -> 10

trained with softmax cross-entropy and SGD with momentum (:class:`SGD`).
"""

import math

import numpy as np

from .variants import row as variant_row

DTYPE = np.float32


class _Layer:
    """Protocol shared by the trainer's own layers (no state by default)."""

    training = True

    def train(self, mode=True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)


class Conv2d(_Layer):
    """Convolution with zero padding ``kernel // 2`` and a stride, via im2col
    and one matrix product per call.

    ``cols[(c, i, j), (n, p)]`` holds input channel ``c`` at offset
    ``(i, j)`` of output position ``p`` of sample ``n``; then
    ``y = W @ cols + b`` with ``W`` of shape ``(out, in * k * k)``, and the
    backward is two products (``dW = dy @ cols.T``, ``dcols = W.T @ dy``)
    plus ``k * k`` strided additions back into the input (col2im).

    Parameters
    ----------
    in_channels, out_channels, kernel : int
    rng : numpy.random.Generator
        He-normal initialization of the weight; the bias starts at zero.
    input_grad : bool
        Whether :meth:`backward` returns the input gradient (False for a
        first layer, whose input needs none).
    stride : int
        Output ``(H + 2 * (k // 2) - k) // stride + 1`` rows (and columns).
    """

    def __init__(self, in_channels, out_channels, kernel, rng, input_grad=True,
                 stride=1):
        fan_in = in_channels * kernel * kernel
        self.kernel = kernel
        self.stride = stride
        self.weight = rng.normal(0.0, math.sqrt(2.0 / fan_in),
                                 (out_channels, fan_in)).astype(DTYPE)
        self.bias = np.zeros(out_channels, DTYPE)
        self.input_grad = input_grad
        self.grads = {}

    def output_size(self, size):
        """Output rows (or columns) for ``size`` input rows."""
        pad = self.kernel // 2
        return (size + 2 * pad - self.kernel) // self.stride + 1

    def __call__(self, x):
        N, C, H, W = x.shape
        k, s, pad = self.kernel, self.stride, self.kernel // 2
        Ho, Wo = self.output_size(H), self.output_size(W)
        xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        windows = np.lib.stride_tricks.sliding_window_view(
            xp, (k, k), axis=(2, 3))[:, :, ::s, ::s][:, :, :Ho, :Wo]
        # (N, C, Ho, Wo, k, k) -> (C, k, k, N, Ho, Wo): one copy
        cols = windows.transpose(1, 4, 5, 0, 2, 3).reshape(C * k * k, N * Ho * Wo)
        self._cols, self._shape = cols, x.shape
        y = self.weight @ cols + self.bias[:, None]
        return np.ascontiguousarray(
            y.reshape(-1, N, Ho, Wo).transpose(1, 0, 2, 3))

    def backward(self, dy):
        N, C, H, W = self._shape
        k, s, pad = self.kernel, self.stride, self.kernel // 2
        Ho, Wo = dy.shape[2:]
        dy = dy.transpose(1, 0, 2, 3).reshape(dy.shape[1], N * Ho * Wo)
        self.grads = {"weight": dy @ self._cols.T, "bias": dy.sum(axis=1)}
        if not self.input_grad:
            return None
        dcols = (self.weight.T @ dy).reshape(C, k, k, N, Ho, Wo)
        dxp = np.zeros((N, C, H + 2 * pad, W + 2 * pad), dy.dtype)
        for i in range(k):
            for j in range(k):
                dxp[:, :, i:i + s * Ho:s, j:j + s * Wo:s] += (
                    dcols[:, i, j].transpose(1, 0, 2, 3))
        return dxp[:, :, pad:pad + H, pad:pad + W]


class Dense(_Layer):
    """``y = x @ W.T + b`` (He-normal ``W``, zero ``b``)."""

    def __init__(self, in_features, out_features, rng):
        self.weight = rng.normal(0.0, math.sqrt(2.0 / in_features),
                                 (out_features, in_features)).astype(DTYPE)
        self.bias = np.zeros(out_features, DTYPE)
        self.grads = {}

    def __call__(self, x):
        self._x = x
        return x @ self.weight.T + self.bias

    def backward(self, dy):
        self.grads = {"weight": dy.T @ self._x, "bias": dy.sum(axis=0)}
        return dy @ self.weight


class ReLU(_Layer):
    def __call__(self, x):
        self._mask = x > 0
        return x * self._mask

    def backward(self, dy):
        return dy * self._mask


class AvgPool2(_Layer):
    """2x2 average pooling with stride 2 over (N, C, H, W), H and W even."""

    def __call__(self, x):
        N, C, H, W = x.shape
        return x.reshape(N, C, H // 2, 2, W // 2, 2).mean(axis=(3, 5))

    def backward(self, dy):
        return np.repeat(np.repeat(dy, 2, axis=2), 2, axis=3) * DTYPE(0.25)


class Flatten(_Layer):
    def __call__(self, x):
        self._shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        return dy.reshape(self._shape)


class GlobalAvgPool(_Layer):
    """Mean over the spatial axes: ``(N, C, H, W) -> (N, C)``."""

    def __call__(self, x):
        self._shape = x.shape
        return x.mean(axis=(2, 3))

    def backward(self, dy):
        N, C, H, W = self._shape
        return np.broadcast_to((dy / (H * W))[:, :, None, None],
                               self._shape).copy()


class Sequential:
    """Layers applied in order; the backward runs them in reverse."""

    def __init__(self, layers):
        self.layers = list(layers)

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def backward(self, dy):
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
            if dy is None:
                break

    def train(self, mode=True):
        for layer in self.layers:
            layer.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def parameters(self):
        """``(layer, name)`` of every weight and bias, normkit layers included."""
        found = []
        for layer in self.layers:
            for name in ("weight", "bias"):
                if getattr(layer, name, None) is not None:
                    found.append((layer, name))
        return found


def build_network(variant, rng, batch_size, image_shape=(1, 8, 8), width=8,
                  hidden=32, classes=10, network="small", last_stage=7):
    """The study's network with ``variant``'s normalizers, built for
    training batches of ``batch_size``: ``network="small"`` is the digits
    network of the module doc, ``"conv"`` the convolutional network of
    :func:`conv_stages` (``hidden`` unused there).

    Returns
    -------
    network : Sequential
    norms : list
        The normalization layers in network order (empty for ``"none"``).
    """
    if network == "conv":
        return _build_conv(variant, rng, batch_size, image_shape, width,
                           classes, last_stage)
    if network != "small":
        raise ValueError(f"unknown network {network!r}; choose small or conv")
    row = variant_row(variant)
    channels, height, width_px = image_shape
    conv_norm = row.conv((width, height, width_px), batch_size)
    dense_norm = row.dense((hidden,), batch_size)
    pooled = width * (height // 2) * (width_px // 2)
    layers = [Conv2d(channels, width, 3, rng, input_grad=False), conv_norm,
              ReLU(), AvgPool2(), Flatten(), Dense(pooled, hidden, rng),
              dense_norm, ReLU(), Dense(hidden, classes, rng)]
    norms = [layer for layer in (conv_norm, dense_norm) if layer is not None]
    return Sequential(layer for layer in layers if layer is not None), norms


#: Largest channel count of the convolutional network.
MAX_CHANNELS = 32


def conv_stages(image_size, last_stage=7, width=8):
    """The convolutions of the ``"conv"`` network as ``(in_channels,
    out_channels, stride, output_size)``.

    A 3x3 convolution with stride 1 to ``width`` channels, then 3x3
    convolutions with stride 2, each doubling the channels (at most
    :data:`MAX_CHANNELS`), until the feature maps are ``last_stage`` pixels
    wide or less: for 28x28 MNIST, 28 -> 14 -> 7 (``last_stage=7``), -> 4
    (4), -> 2 (2).  Every convolution is followed by the variant's
    normalizer and a ReLU; global average pooling and a linear classifier
    close the network.  A BatchNorm after a convolution whose output is
    ``size`` wide normalizes ``m = N * size * size`` values per channel.
    """
    if last_stage < 1 or last_stage > image_size:
        raise ValueError(f"last_stage must be in [1, {image_size}], got "
                         f"{last_stage}")
    stages = [(None, width, 1, image_size)]
    size, channels = image_size, width
    while size > last_stage:
        size = (size + 2 - 3) // 2 + 1
        out = min(2 * channels, MAX_CHANNELS)
        stages.append((channels, out, 2, size))
        channels = out
    return stages


def _build_conv(variant, rng, batch_size, image_shape, width, classes,
                last_stage):
    row = variant_row(variant)
    layers, norms = [], []
    for index, (in_channels, out, stride, size) in enumerate(
            conv_stages(image_shape[1], last_stage, width)):
        first = index == 0
        layers.append(Conv2d(image_shape[0] if first else in_channels, out, 3,
                             rng, input_grad=not first, stride=stride))
        norm = row.conv((out, size, size), batch_size)
        if norm is not None:
            layers.append(norm)
            norms.append(norm)
        layers.append(ReLU())
    channels = layers[-3 if norms else -2].weight.shape[0]
    layers += [GlobalAvgPool(), Dense(channels, classes, rng)]
    return Sequential(layers), norms


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy of ``softmax(logits)`` and its gradient.

    ``loss = mean_n (logsumexp(z_n) - z_n[y_n])``,
    ``dloss/dz = (softmax(z) - onehot(y)) / N``.
    """
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    total = exp.sum(axis=1, keepdims=True)
    rows = np.arange(len(labels))
    loss = float(np.mean(np.log(total[:, 0]) - shifted[rows, labels]))
    grad = exp / total
    grad[rows, labels] -= 1.0
    return loss, grad / len(labels)


class SGD:
    """SGD with momentum and weight decay on the weights.

    ``v <- mu * v + g + wd * w`` (weights; ``g`` alone for biases and
    normalizer parameters), ``w <- w - lr * v``, as PyTorch's SGD.
    """

    def __init__(self, parameters, lr, momentum=0.9, weight_decay=5e-4):
        self.parameters = parameters
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.velocity = [np.zeros_like(getattr(layer, name))
                         for layer, name in parameters]

    def step(self):
        for (layer, name), velocity in zip(self.parameters, self.velocity):
            value = getattr(layer, name)
            grad = layer.grads[name]
            if name == "weight" and isinstance(layer, (Conv2d, Dense)):
                grad = grad + self.weight_decay * value
            velocity *= self.momentum
            velocity += grad
            value -= self.lr * velocity


def accuracy(network, images, labels, batch=512):
    """Fraction of ``images`` classified as ``labels`` by ``network`` as it
    is (call ``network.eval()`` first for inference mode)."""
    correct = 0
    for start in range(0, len(labels), batch):
        logits = network(images[start:start + batch])
        correct += int((logits.argmax(axis=1) == labels[start:start + batch]).sum())
    return correct / len(labels)


class Sigmoid(_Layer):
    """``y = 1 / (1 + exp(-x))``; ``dx = dy * y * (1 - y)``."""

    def __call__(self, x):
        # exp(-log(1 + exp(-x))): no overflow for large negative inputs
        self._y = np.exp(-np.logaddexp(0, -x))
        return self._y

    def backward(self, dy):
        return dy * self._y * (1 - self._y)


#: Activation layers by name (the ``activation`` of :func:`build_mlp`).
ACTIVATIONS = {"relu": ReLU, "sigmoid": Sigmoid}


class StepNoise(_Layer):
    """Non-stationary noise after a normalizer: the control of Santurkar et
    al. (2018, section 2), whose "noisy BatchNorm" networks see each
    normalized unit's distribution move at every step.

    In training, step ``t`` (the attribute :attr:`step`, set before each
    step) multiplies unit ``j`` by ``a_j`` and adds ``b_j``, with ``a_j``
    uniform in ``[1, 1 + level]`` and ``b_j`` uniform in ``[-level,
    level]``, drawn afresh per step from ``(*seed, t)`` (``seed`` a tuple
    of integers; so every forward
    pass of one step sees the same noise); inference uses the noise's mean
    (``a = 1 + level / 2``, ``b = 0``).  ``dx = a * dy``.
    """

    def __init__(self, features, level, seed):
        self.features, self.level, self.seed = features, level, seed
        self.step = 0

    def coefficients(self):
        """``(a, b)`` of the current step (training) or their mean
        (inference)."""
        if not self.training:
            return 1.0 + self.level / 2, 0.0
        draw = np.random.default_rng([*self.seed, self.step])
        a = 1.0 + self.level * draw.random(self.features)
        b = self.level * (2.0 * draw.random(self.features) - 1.0)
        return a, b

    def __call__(self, x):
        a, b = self.coefficients()
        self._a = np.asarray(a, x.dtype)
        return x * self._a + np.asarray(b, x.dtype)

    def backward(self, dy):
        return dy * self._a


def build_mlp(variant, rng, batch_size, in_features, width=100, depth=3,
              classes=10, activation="sigmoid", placement="before",
              noise=0.0, seed=0):
    """The fully connected network of Ioffe and Szegedy's MNIST experiment
    (2015, section 4.1: three hidden layers of 100 sigmoid units) with
    ``variant``'s normalizer on every hidden layer::

        [dense in -> width -> norm -> activation] x depth -> dense -> classes

    ``placement="before"`` normalizes the dense output (the paper's
    choice), ``"after"`` the activation's output (``dense -> activation ->
    norm``).  With ``noise > 0`` a :class:`StepNoise` of that level
    follows every normalizer (seeded by ``seed`` and the layer's index).

    Returns
    -------
    network : Sequential
    norms : list
        The normalization layers in network order (empty for ``"none"``).
    noises : list
        The :class:`StepNoise` layers (empty without noise).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, "
                         f"got {activation!r}")
    if placement not in ("before", "after"):
        raise ValueError(f"placement must be 'before' or 'after', got "
                         f"{placement!r}")
    row = variant_row(variant)
    layers, norms, noises = [], [], []
    features = in_features
    for index in range(depth):
        block = [Dense(features, width, rng)]
        norm = row.dense((width,), batch_size)
        normalize = [] if norm is None else [norm]
        if norm is not None:
            norms.append(norm)
            if noise > 0:
                noises.append(StepNoise(width, noise, (seed, index)))
                normalize.append(noises[-1])
        act = [ACTIVATIONS[activation]()]
        block += normalize + act if placement == "before" else act + normalize
        layers += block
        features = width
    layers.append(Dense(features, classes, rng))
    return Sequential(layers), norms, noises
