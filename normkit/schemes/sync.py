"""Synchronized BatchNorm: the statistics of the global batch, split over
processes.

BatchNorm's view and running statistics (:class:`~normkit.BatchNorm`),
with the per-channel moments of every rank's slice merged through a
:class:`~normkit.distributed.Communicator`:

- forward: each rank's ``(n, mean, M2)`` per channel (its chunk partials
  merged, :func:`~normkit.engine.moment_partials`) in ONE all-gather, then
  Chan's merge in rank order (:func:`merge_ranks`), so every rank holds
  bit-identical global statistics and updates its running statistics
  identically;
- backward: the per-channel sums ``sum g*dy`` and ``sum g*dy*xhat``
  (:func:`~normkit.engine.backward_sums`) in ONE all-reduce, then
  :func:`~normkit.engine.dx_from_sums` with the global count.

Why an all-gather of the moments rather than an all-reduce of ``n``,
``n * mean`` and ``sum x**2``: the all-reduce of raw power sums is the
``E[x**2] - E[x]**2`` cancellation (a channel near 100 with standard
deviation 0.01 loses its variance in float32, digits of it in float64),
and re-centring the terms on the global mean needs that mean first (a
second collective).  The all-gather moves ``3 * C`` float64 values per
rank, merges them exactly with the engine's own formula, in a fixed order
independent of the transport's reduction tree, and a rank with 0 samples
simply contributes ``n = 0``.
"""

import numpy as np

from .. import backend, engine
from ..backend.protocol import channelwise, copy, inverse_std, merge_summaries
from ..distributed import check_communicator
from .base import cast, check_backward, normalize_with_statistics
from .batch import BatchNorm

__all__ = ["SyncBatchNorm", "sync_moments", "sync_gradients", "merge_ranks",
           "send_failure"]

#: Count a rank sends in place of its moments when its input was bad (its
#: error is raised there; the other ranks raise instead of waiting).
_FAILED = -1.0


@channelwise(outputs=2)
def _summary(mean, var, n):
    """A rank's ``(mean, M2)`` from its mean and biased variance (0 and 0
    for no values)."""
    if n == 0.0:
        return 0.0, 0.0
    return mean, var * n


@channelwise(outputs=2)
def _variance(m2, n, eps):
    """Biased variance ``M2 / n`` and ``1 / sqrt(var + eps)``."""
    var = m2 / n
    return var, 1.0 / (var + eps) ** 0.5


@channelwise
def _fill(like, value):
    return value


def merge_ranks(gathered, size):
    """Merge every rank's ``(n, mean, M2)`` rows in rank order.

    Parameters
    ----------
    gathered : array ``(size, 3, C)``
        What the all-gather of each rank's ``(3, C)`` summary returns
        (host or device float64).
    size : int

    Returns
    -------
    n, mean, m2 : flat ``(C,)`` float64 arrays on ``gathered``'s backend
    """
    n, mean, m2 = gathered[0, 0], gathered[0, 1], gathered[0, 2]
    for r in range(1, size):
        n, mean, m2 = merge_summaries(n, mean, m2, gathered[r, 0], gathered[r, 1],
                            gathered[r, 2])
    return n, mean, m2


def _failed_ranks(counts):
    return [r for r, n in enumerate(counts) if n < 0]


def _rows(arrays, device):
    """Stack flat per-channel arrays into a ``(len(arrays), C)`` float64
    array on the host, or on the device when ``device``."""
    if not device:
        return np.stack([backend.to_host(a).reshape(-1) for a in arrays]
                        ).astype(np.float64, copy=False)
    first = arrays[0]
    size = int(np.prod(first.shape))
    out = backend.backend_for(first).empty((len(arrays), size), np.float64)
    for i, a in enumerate(arrays):
        copy(a, out=out[i])
    return out


def sync_moments(x, view, communicator, func="sync_moments"):
    """Mean and biased variance of each channel over every rank's ``x``.

    One all-gather of each rank's ``(n, mean, M2)`` per channel (``3 * K``
    float64 values), merged in rank order, so every rank returns the same
    bits.  ``view`` must have ``P = 1`` (statistics over the batch); ``x``
    may hold no values on some ranks.

    Parameters
    ----------
    x : array
        This rank's slice (host or device).
    view : View
    communicator : Communicator
    func : str
        Name used in errors.

    Returns
    -------
    mean, var : ``(1, K)`` float64 arrays on ``x``'s backend (device
        arrays for device ``x``)
    count : float
        Values per channel over every rank.
    """
    mean, var, count, _ = _sync(x, view, communicator, None, func)
    return mean, var, count


def _sync(x, view, communicator, eps, func, sending=None):
    """One all-gather of moments; see :func:`sync_moments`.  Also returns
    ``1 / sqrt(var + eps)`` (None without values); ``sending()`` is called
    just before the collective."""
    K = view.K
    on_device = backend.is_device_array(x)
    device_comm = on_device and communicator.device_arrays
    n_local = float(view.group_size)
    if n_local > 0:
        mean_l, var_l = engine.merge_partials(engine.moment_partials(x, view))
        mean_l, m2_l = _summary(mean_l, var_l, n_local)
        counts_l = _fill(mean_l, n_local)
        payload = _rows([counts_l, mean_l, m2_l], device_comm)
    else:
        payload = np.zeros((3, K))
        if device_comm:
            payload = backend.to_device(payload)
    if sending is not None:
        sending()
    gathered = communicator.allgather(payload)
    counts = (gathered[:, 0, 0] if isinstance(gathered, np.ndarray)
              else [float(backend.to_host(gathered[r, 0, :1])[0])
                    for r in range(communicator.size)])
    failed = _failed_ranks(counts)
    if failed:
        raise RuntimeError(f"{func}: rank(s) {failed} of "
                           f"{communicator.size} failed this step (their "
                           f"error was raised there); nothing was updated")
    n, mean, m2 = merge_ranks(gathered, communicator.size)
    count = float(sum(float(c) for c in counts))
    rstd = None
    if count > 0:
        var, rstd = _variance(m2, count, 0.0 if eps is None else eps)
    else:
        var = m2
    if on_device and not device_comm:
        mean, var = backend.to_device(mean), backend.to_device(var)
        rstd = None if rstd is None else backend.to_device(rstd)
    mean, var = mean.reshape(1, K), var.reshape(1, K)
    return mean, var, count, None if rstd is None else rstd.reshape(1, K)


def send_failure(communicator, num_features, backward=False):
    """Take part in this step's collective for a rank whose input was bad,
    so that the others raise rather than wait: a ``(3, C)`` summary with
    count ``_FAILED`` for a forward, a flag for a backward."""
    if backward:
        payload = np.zeros(2 * num_features + communicator.size)
        payload[2 * num_features + communicator.rank] = 1.0
        communicator.allreduce(payload)
    else:
        communicator.allgather(np.full((3, num_features), _FAILED))


def sync_gradients(dy, x, saved, sending=None, *, dx_out=None):
    """Backward of a synchronized forward: ``(dx, dweight, dbias)``.

    One all-reduce of ``(sum g*dy, sum g*dy*xhat)`` per channel (and one
    flag per rank), then :func:`~normkit.engine.dx_from_sums` with the
    global count of the forward.  ``dweight`` and ``dbias`` are this rank's
    contributions (``sum dy * xhat`` and ``sum dy`` over its slice), as in
    PyTorch: sum them over ranks with the other parameters' gradients
    (what DistributedDataParallel does).  ``dx`` is written into
    ``dx_out`` when given.
    """
    comm = saved.extras["communicator"]
    count = saved.extras["count"]
    view = saved.view
    K = view.K
    weight = saved.weight
    gscale = None if weight is None else weight.reshape(weight.size)
    on_device = backend.is_device_array(x)
    device_comm = on_device and comm.device_arrays
    (s0, s1), (sum_dy, sum_dy_xhat) = engine.backward_sums(
        dy, x, view, saved.mean, saved.rstd, gscale)
    flags = np.zeros(comm.size)
    if device_comm:
        flags = backend.to_device(flags)
    payload = _concat([s0, s1, flags], device_comm)
    if sending is not None:
        sending()
    total = comm.allreduce(payload)
    flags = backend.to_host(total[2 * K:])
    failed = [r for r, f in enumerate(flags) if f != 0.0]
    if failed:
        raise RuntimeError(f"{saved.variant}.backward: rank(s) {failed} of "
                           f"{comm.size} failed this step (their error was "
                           f"raised there)")
    s0, s1 = total[:K], total[K:2 * K]
    if on_device and not device_comm:
        s0, s1 = backend.to_device(s0), backend.to_device(s1)
    dx = engine.dx_from_sums(dy, x, view, saved.mean, saved.rstd, gscale,
                             (s0.reshape(1, K), s1.reshape(1, K)), count,
                             out=dx_out)
    dweight = dbias = None
    if weight is not None:
        dweight = cast(sum_dy_xhat, weight.shape, weight.dtype)
    if saved.has_bias:
        shape = weight.shape if weight is not None else (K,)
        dtype = weight.dtype if weight is not None else x.dtype
        dbias = cast(sum_dy, shape, dtype)
    return dx, dweight, dbias


def _concat(arrays, device):
    """Flat float64 concatenation, on the host or (``device``) the device."""
    if not device:
        return np.concatenate([backend.to_host(a).reshape(-1) for a in arrays]
                              ).astype(np.float64, copy=False)
    sizes = [int(np.prod(a.shape)) for a in arrays]
    out = backend.backend_for(arrays[0]).empty((sum(sizes),), np.float64)
    start = 0
    for a, size in zip(arrays, sizes):
        copy(a.reshape(size), out=out[start:start + size])
        start += size
    return out


class SyncBatchNorm(BatchNorm):
    """Batch normalization over a batch split across processes.

    In training, each rank normalizes its slice with the mean and biased
    variance of the global batch (every rank's slice), and every rank
    updates its running statistics identically with the global unbiased
    variance; the result equals :class:`BatchNorm` on the concatenated
    batch.  One collective per training forward (an all-gather of ``3 *
    C`` float64 values per rank) and one per backward (an all-reduce of
    ``2 * C + size``), whatever ``C``.  Ranks may hold different numbers of
    samples, or none (an input of shape ``(0, C, ...)``); more than one
    value per channel is needed over all ranks.  Inference uses the
    running statistics (with ``track_running_stats=False``, the local
    batch's, as PyTorch does) and makes no collective.

    ``weight`` and ``bias`` gradients are this rank's contributions, as in
    PyTorch: sum (or average) them over ranks together with the rest of the
    model's gradients.

    Errors: an input this layer rejects (dtype, shape, channels) raises on
    its rank, which still takes part in the step's collective with a
    failure flag so that every other rank raises a RuntimeError naming it
    instead of waiting; nothing is updated anywhere.  A rank that never
    reaches the layer leaves the others waiting in the collective until the
    transport's timeout or the launcher's abort (see
    :func:`normkit.distributed.from_mpi`, :func:`~normkit.distributed.from_torch`).

    Parameters
    ----------
    num_features : int
        Channels ``C``.
    eps : float, default 1e-5
    momentum : float in [0, 1] or None, default 0.1
    affine : bool, default True
    track_running_stats : bool, default True
    axis : int, default 1
        Channel axis: 1 channels-first, -1 channels-last.
    communicator : Communicator, optional
        The processes sharing the batch
        (:func:`normkit.distributed.from_mpi`,
        :func:`~normkit.distributed.from_torch`); default
        :func:`~normkit.distributed.local`, one process.
    bias : bool, default True
        With ``affine``, a learnable bias besides the weight (as torch's
        ``bias=``).

    Examples
    --------
    >>> import numpy as np
    >>> import normkit
    >>> x = np.random.default_rng(0).normal(3.0, 2.0, (8, 4, 5))
    >>> sync = normkit.SyncBatchNorm(4)       # communicator=from_mpi() ...
    >>> bool(np.allclose(sync(x), normkit.BatchNorm1d(4)(x)))
    True
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, axis=1, communicator=None, *,
                 bias=True):
        super().__init__(num_features, eps, momentum, affine,
                         track_running_stats, axis, bias=bias)
        self.communicator = check_communicator(communicator, "SyncBatchNorm")
        self._owed = None

    def _syncing(self):
        return self.training and self.communicator.size > 1

    def forward(self, x, out=None):
        """Normalize this rank's slice ``x`` with the global statistics
        (written into ``out`` when given, as :meth:`Normalizer.forward
        <normkit.schemes.Normalizer.forward>`)."""
        if not self._syncing():
            return super().forward(x, out)
        self._owed = "forward"
        try:
            return super().forward(x, out)
        except Exception:
            if self._owed == "forward":
                send_failure(self.communicator, self.num_features)
            raise
        finally:
            self._owed = None

    __call__ = forward

    def backward(self, dy, dx_out=None):
        """Gradient with respect to this rank's slice (see
        :func:`sync_gradients`), written into ``dx_out`` when given."""
        tape = self._tape
        owes = (tape[1].extras.get("communicator") is not None
                if tape is not None else self._syncing())
        if not owes:
            return super().backward(dy, dx_out)
        self._owed = "backward"
        try:
            return super().backward(dy, dx_out)
        except Exception:
            if self._owed == "backward":
                send_failure(self.communicator, self.num_features, True)
            raise
        finally:
            self._owed = None

    def _forward(self, x, out=None):
        if not self.training:
            return super()._forward(x, out)
        view = self.view(x.shape)
        comm = self.communicator
        mean, var, count, rstd = _sync(x, view, comm, self.eps, self.label,
                                       self._paid)
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when "
                             f"training, got {count:g} over {comm.size} "
                             f"rank(s) (input size {tuple(x.shape)} here)")
        self.update_running_stats(mean, var, count)
        y, saved = normalize_with_statistics(x, view, mean, rstd, self.weight,
                                             self.bias, variant=self.label,
                                             out=out)
        return y, saved.replace(batch_stats=True, var=var,
                                extras={"communicator": comm, "count": count},
                                gradients=sync_gradients)

    def _paid(self):
        self._owed = None

    def _backward(self, dy, x, saved, dx_out=None):
        if saved.gradients is not sync_gradients:
            return super()._backward(dy, x, saved, dx_out)
        dy, x = check_backward(f"{self.label}.backward", dy, x, saved)
        dx, dweight, dbias = sync_gradients(dy, x, saved, self._paid,
                                            dx_out=dx_out)
        grads = {name: grad for name, grad in (("weight", dweight),
                                               ("bias", dbias))
                 if getattr(self, name) is not None}
        return dx, grads

    def extra_repr(self):
        return f"{super().extra_repr()}, communicator={self.communicator!r}"
