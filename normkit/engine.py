"""The normkit engine: one set of reductions behind every normalizer.

Every normalizer in the family computes statistics over some axes of its
input and normalizes with them.  For a C-contiguous array all of them are
free reshapes of one canonical five-dimensional view

.. code-block:: text

    x  ->  (P, A, K, J, B)
    statistics (mean, variance) per (P, K), reduced over (A, J, B)
    affine parameters (gamma, beta) per (K, J)   -- channel c = k * J + j

=============  ==============================  =============================
variant        channels-first (N, C, S...)     channels-last (N, S..., C)
=============  ==============================  =============================
BatchNorm      P=1, A=N, K=C, J=1, B=S         P=1, A=N*S, K=C, J=1, B=1
InstanceNorm   P=N, A=1, K=C, J=1, B=S         P=N, A=S, K=C, J=1, B=1
GroupNorm      P=N, A=1, K=G, J=C/G, B=S       P=N, A=S, K=G, J=C/G, B=1
LayerNorm      P=rows, A=1, K=1, J=D, B=1      same
=============  ==============================  =============================

A variant is therefore a :class:`View` plus what it does with the
statistics.  This module owns the dtype policy, the work plan and the
dispatch to the kernels; the kernels (:mod:`normkit._cpu`) see only
contiguous one-dimensional arrays and plain integers.

Memory: a C-contiguous float32 or float64 input is never copied; any other
layout is copied once into a contiguous array.  float16 input is widened to
float32 (one parallel copy) and the float32 result narrowed back to float16
(one more); statistics are accumulated in float32 within cache-sized tiles
and in float64 across them.
"""

from dataclasses import dataclass
import functools
import math
from typing import NamedTuple

import numba
import numpy as np

from . import _cpu, _device, _half

#: Items with fewer elements than this are not worth a thread of their own.
MIN_ITEM_ELEMENTS = 32768

#: Items per thread: more than one evens out unequal items.
ITEMS_PER_THREAD = 4

#: Values per item when groups are split into blocks: an item's data then
#: stays in a core's L2 cache between its statistics and its normalization.
FUSED_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class View:
    """Canonical view ``(P, A, K, J, B)`` of an input of ``P*A*K*J*B`` values.

    Statistics are per ``(p, k)`` over ``A * J * B`` values; affine
    parameters are per ``(k, j)``, ``K * J`` of them.

    Examples
    --------
    GroupNorm with 4 groups of an ``(N, C, H, W) = (2, 8, 3, 3)`` input:
    2 x 4 groups of 2 * 9 values, 8 affine parameters.

    >>> from normkit.engine import View
    >>> view = View(P=2, A=1, K=4, J=2, B=9)
    >>> view.group_size, view.K * view.J
    (18, 8)
    """

    P: int
    A: int
    K: int
    J: int
    B: int

    @property
    def group_size(self):
        """Values per statistics group, ``A * J * B``."""
        return self.A * self.J * self.B

    @property
    def dims(self):
        return self.P, self.A, self.K, self.J, self.B


@functools.lru_cache(maxsize=512)
def channel_view(shape, axis, per_sample, groups=None):
    """View for statistics per channel (or channel group) along ``axis``.

    Parameters
    ----------
    shape : tuple of int
        Input shape; ``axis`` has already been normalized to be >= 0.
    axis : int
        Channel axis.
    per_sample : bool
        Separate statistics for each index of axis 0 (instance and group
        normalization) instead of one set over the batch.
    groups : int, optional
        Channels are reduced in ``groups`` contiguous groups (GroupNorm).

    Returns
    -------
    View
    """
    channels = shape[axis]
    groups = channels if groups is None else groups
    inner = math.prod(shape[axis + 1:])
    if per_sample:
        return View(shape[0], math.prod(shape[1:axis]), groups,
                    channels // groups, inner)
    return View(1, math.prod(shape[:axis]), groups, channels // groups, inner)


@functools.lru_cache(maxsize=512)
def trailing_view(shape, n_trailing):
    """View for statistics over the last ``n_trailing`` axes (LayerNorm)."""
    return View(math.prod(shape[:len(shape) - n_trailing]), 1, 1,
                math.prod(shape[len(shape) - n_trailing:]), 1)


class Plan(NamedTuple):
    """How the work is split into items (passed to the kernels as is).

    Item ``i`` covers a block of ``p_per`` values of ``p``, a block of
    ``k_per`` groups, a chunk of ``a_per`` values of ``a`` and a chunk of
    ``l_per`` segment offsets; there are ``n_pblk * n_kblk * n_ach * n_lch``
    items.
    """

    p_per: int
    n_pblk: int
    k_per: int
    n_kblk: int
    a_per: int
    n_ach: int
    l_per: int
    n_lch: int

    @property
    def n_items(self):
        return self.n_pblk * self.n_kblk * self.n_ach * self.n_lch

    @property
    def n_chunks(self):
        """Pieces each group's reduced extent is split into."""
        return self.n_ach * self.n_lch

    @property
    def fused(self):
        """True when every item holds whole groups."""
        return self.n_chunks == 1


def make_plan(view, n_threads=None):
    """Split the work of ``view`` into items for ``n_threads`` (default:
    Numba's thread count).

    Items holding whole groups are preferred, so that the statistics and the
    normalization of a group happen while it is in cache: blocks of ``p``,
    or, for segment-shaped data (``B > 1``, e.g. channels-first BatchNorm),
    blocks of groups ``k`` of at most :data:`FUSED_ELEMENTS` values.  When
    there are too few groups to keep every thread busy (BatchNorm with few
    channels; one long LayerNorm row), the reduced extent is split instead:
    first along ``a``, then along the segment offsets ``l`` (only where
    ``B > 1``, or for one wide group, ``K == 1`` and ``J >= WIDE_GROUP``,
    which keeps every item's columns contiguous).  Partials are merged in a
    fixed order, so results depend only on the shape and the thread count.
    """
    return _plan(view, numba.get_num_threads() if n_threads is None else n_threads)


def _ceil_div(a, b):
    return -(-a // b)


def _enough(items, target, n_threads):
    """Whether ``items`` whole-group items keep ``n_threads`` evenly busy."""
    return items >= target or (items >= n_threads and items % n_threads == 0)


@functools.lru_cache(maxsize=512)
def _plan(view, n_threads):
    P, A, K, J, B = view.dims
    L = J * B
    total = P * A * K * L
    target = max(1, min(ITEMS_PER_THREAD * n_threads, total // MIN_ITEM_ELEMENTS))
    if _enough(P, target, n_threads):
        p_per = _ceil_div(P, min(P, target))
        return Plan(p_per, _ceil_div(P, p_per), K, 1, A, 1, L, 1)
    if B > 1 and _enough(P * K, target, n_threads):
        k_per = max(1, min(_ceil_div(K, _ceil_div(target, P)),
                           FUSED_ELEMENTS // (A * L)))
        return Plan(1, P, k_per, _ceil_div(K, k_per), A, 1, L, 1)
    per_p = _ceil_div(target, P)
    n_ach = min(A, per_p)
    a_per = _ceil_div(A, n_ach)
    n_ach = _ceil_div(A, a_per)
    n_lch = 1
    if (B > 1 or (K == 1 and J >= _cpu.WIDE_GROUP)) and n_ach < per_p:
        n_lch = min(L, _ceil_div(per_p, n_ach))
    l_per = _ceil_div(L, n_lch)
    return Plan(1, P, K, 1, a_per, n_ach, l_per, _ceil_div(L, l_per))


# --------------------------------------------------------------------------
# dtype policy
# --------------------------------------------------------------------------

def as_kernel_array(x):
    """Flat, C-contiguous float32/float64 data for the kernels.

    No copy for contiguous float32/float64; one copy for other layouts, and
    one parallel widening copy for float16 (:func:`normkit._half.widen`).
    """
    if x.dtype == np.float16:
        return _half.widen(x).reshape(-1)
    return np.ascontiguousarray(x).reshape(-1)


def from_kernel_array(flat, shape, dtype):
    """A kernel result in the caller's ``shape`` and ``dtype`` (float16 is
    narrowed in parallel by :func:`normkit._half.narrow`, else no copy)."""
    out = flat.reshape(shape)
    if dtype == np.float16 and out.dtype != np.float16:
        return _half.narrow(out)
    return out.astype(dtype, copy=False)


def _params(values, size, default, dtype=np.float64):
    """Affine parameters as a flat ``(size,)`` array of ``dtype``."""
    if values is None:
        return np.full(size, default, dtype=dtype)
    return np.ascontiguousarray(values, dtype=dtype).reshape(size)


# --------------------------------------------------------------------------
# engine entry points
# --------------------------------------------------------------------------

def _device_backend(x):
    """The CUDA backend (:mod:`normkit._cuda`, imported on first use) for
    arrays on a GPU, None for host arrays: the one backend dispatch."""
    return _device.cuda_backend() if _device.is_device_array(x) else None


def moments(x, view, centered=True):
    """Per-group mean and biased variance, both ``(P, K)`` float64.

    ``var = 1/n * sum (x - mean)**2`` over each group of ``n`` values.
    With ``centered=False`` the statistics are taken about zero instead:
    the mean returned is 0 and the "variance" is the mean square
    ``1/n * sum x**2``, computed as ``var + mean**2`` from the stable
    moments (a sum of two non-negative terms: no cancellation).
    For a CUDA device ``x`` both are float64 device arrays.
    """
    gpu = _device_backend(x)
    if gpu:
        return gpu.moments(x, view, centered)
    if not centered:
        mean, var = moments(x, view)
        return np.zeros_like(mean), var + mean * mean
    flat = as_kernel_array(x)
    plan = make_plan(view)
    shape = (view.P, plan.n_chunks, view.K)
    part_n = np.empty(shape)
    part_mean = np.empty(shape)
    part_m2 = np.empty(shape)
    _cpu.moments(flat, *view.dims, plan, part_n, part_mean, part_m2)
    return _cpu.merge_moments(part_n, part_mean, part_m2)


def apply_affine(x, view, mean, alpha, gamma=None, beta=None):
    """``y = (x - mean) * alpha * gamma + beta``, returned in ``x.dtype``.

    ``mean`` and ``alpha`` are per group ``(P, K)``; ``gamma`` and ``beta``
    per ``(K, J)`` (or None for 1 and 0).  Device arrays in, device
    array out.
    """
    gpu = _device_backend(x)
    if gpu:
        return gpu.apply_affine(x, view, mean, alpha, gamma, beta)
    flat = as_kernel_array(x)
    plan = make_plan(view)
    coef = np.zeros((view.P, view.K, _cpu.N_COEF))
    coef[..., _cpu.COEF_MEAN] = mean
    coef[..., _cpu.COEF_A] = alpha
    out = np.empty_like(flat)
    kj = view.K * view.J
    _cpu.apply(flat, flat, out, False, *view.dims, plan, coef,
               _params(gamma, kj, 1.0, flat.dtype), _params(beta, kj, 0.0, flat.dtype))
    return from_kernel_array(out, x.shape, x.dtype)


def normalize_batch(x, view, gamma=None, beta=None, eps=1e-5, centered=True):
    """Normalize with the statistics of ``x`` itself.

    ``y = (x - mean) / sqrt(var + eps) * gamma + beta`` per group, with the
    biased variance.  Groups that fit in one work item are reduced and
    normalized in one pass over memory.  ``centered=False`` normalizes by
    the root mean square instead, ``y = x / sqrt(mean(x**2) + eps) * gamma
    + beta`` (see :func:`moments`; the returned mean is 0 and var the mean
    square).

    Returns
    -------
    y : ndarray, same shape and dtype as ``x``
    mean, var : ndarray, ``(P, K)`` float64

    For a CUDA device ``x`` all three are device arrays.
    """
    gpu = _device_backend(x)
    if gpu:
        return gpu.normalize_batch(x, view, gamma, beta, eps, centered)
    flat = as_kernel_array(x)
    plan = make_plan(view)
    kj = view.K * view.J
    if plan.fused and centered:
        gamma = _params(gamma, kj, 1.0, flat.dtype)
        beta = _params(beta, kj, 0.0, flat.dtype)
        out = np.empty_like(flat)
        mean = np.empty((view.P, view.K))
        var = np.empty((view.P, view.K))
        _cpu.forward_fused(flat, out, *view.dims, plan, gamma, beta,
                           float(eps), mean, var)
        return from_kernel_array(out, x.shape, x.dtype), mean, var
    mean, var = moments(flat, view, centered)
    y = apply_affine(flat, view, mean, 1.0 / np.sqrt(var + eps), gamma, beta)
    return from_kernel_array(y, x.shape, x.dtype), mean, var


def backward(dy, x, view, mean, rstd, gscale=None, batch_stats=True,
             need_affine=True, centered=True):
    """Gradients of ``y = xhat * g + beta`` with ``xhat = (x - mean) * rstd``.

    Parameters
    ----------
    dy, x : ndarray
        Upstream gradient and the forward input, same shape.
    view : View
    mean, rstd : ndarray, ``(P, K)``
        The statistics the forward pass used.
    gscale : ndarray, ``(K * J,)``, optional
        Multiplier ``g`` of ``xhat`` in the output (the weight; Batch
        Renormalization passes ``weight * r``).  None means 1.
    batch_stats : bool
        True when ``mean`` and ``rstd`` were computed from ``x`` (training):
        ``dx = rstd * (g*dy - mean(g*dy) - xhat * mean(g*dy*xhat))`` per
        group.  False for fixed statistics: ``dx = g * dy * rstd``.
    need_affine : bool
        Also return the per-(k, j) sums ``sum dy`` and ``sum dy * xhat``.
    centered : bool
        False for statistics taken about zero (:func:`moments`): ``mean``
        is ignored (``xhat = x * rstd``) and, with ``batch_stats``, the
        mean term drops out, ``dx = rstd * (g*dy - xhat * mean(g*dy*xhat))``.

    Returns
    -------
    dx : ndarray, shape and dtype of ``x``
    sum_dy, sum_dy_xhat : ndarray ``(K * J,)`` float64, or None

    For a CUDA device ``x`` all arrays in and out are device arrays.
    """
    gpu = _device_backend(x)
    if gpu:
        return gpu.backward(dy, x, view, mean, rstd, gscale, batch_stats,
                            need_affine, centered)
    flat_x = as_kernel_array(x)
    flat_dy = as_kernel_array(dy).astype(flat_x.dtype, copy=False)
    plan = make_plan(view)
    kj = view.K * view.J
    gscale = _params(gscale, kj, 1.0)
    rstd = np.ascontiguousarray(rstd, dtype=np.float64)
    mean = (np.ascontiguousarray(mean, dtype=np.float64) if centered
            else np.zeros_like(rstd))
    dx = np.empty_like(flat_x)
    part_affine = np.empty((plan.n_items, 2, kj))
    if batch_stats and plan.fused and centered:
        _cpu.backward_fused(flat_dy, flat_x, dx, *view.dims, plan, mean, rstd,
                            gscale, part_affine)
    else:
        if batch_stats or need_affine:
            part_group = np.empty((view.P, plan.n_chunks, view.K, 2))
            _cpu.backward_reduce(flat_dy, flat_x, *view.dims, plan, mean, rstd,
                                 gscale, part_group, part_affine)
        if batch_stats:
            group_sums, n = part_group.sum(axis=1), float(view.group_size)
            if not centered:  # no mean: its gradient term drops out
                group_sums[..., 0] = 0.0
        else:  # fixed statistics: dx = g * dy * rstd, the sums drop out
            group_sums, n = np.zeros((view.P, view.K, 2)), np.inf
        coef = _cpu.backward_coefficients(group_sums, n, mean, rstd)
        _cpu.apply(flat_x, flat_dy, dx, True, *view.dims, plan, coef,
                   gscale.astype(flat_x.dtype), np.zeros(kj, flat_x.dtype))
    dx = from_kernel_array(dx, x.shape, x.dtype)
    if not need_affine:
        return dx, None, None
    sums = part_affine.sum(axis=0)
    return dx, sums[0], sums[1]
