"""CUDA backend: ``numba.cuda`` kernels and their launch (optional extra
``cuda``).

Implements :class:`normkit.backend.protocol.Backend` for device arrays: the
same operations as :mod:`normkit.backend.cpu` over the same canonical view
``(P, A, K, J, B)`` (see :mod:`normkit.view`), written for the GPU rather
than ported from the CPU loops.  For one ``p`` the data is a matrix of ``A``
rows by ``W = K * L`` columns (``L = J * B``), row ``a`` starting at
``(p * A + a) * W``; group ``k`` owns columns ``[k * L, (k + 1) * L)``.

Tiles and launch configuration
------------------------------
Every kernel walks the same tiles, chosen from the shape by
:func:`normkit.backend.plan.grid_for` (the one place where launch
configuration is decided):

- *column tiles* (narrow groups, ``2 * L <= threads``, unless a single
  row holds a single group: channels-last BatchNorm / InstanceNorm /
  GroupNorm, tiny spatial extents, the affine sums of LayerNorm):
  a block covers ``k_per`` whole groups (``k_per * L <= threads`` adjacent
  columns) and a chunk of rows.  Thread ``t`` keeps column ``t % width`` and
  walks rows ``t // width, + threads // width, ...``, so a warp reads
  consecutive addresses of consecutive rows;
- *segment tiles* (everything else: channels-first BatchNorm and GroupNorm,
  InstanceNorm, LayerNorm): a block covers one group, a chunk of rows and a
  chunk of its ``L`` columns, and its threads walk that tile in row-major
  order, consecutive threads on consecutive addresses.

When there are fewer tiles than ``Settings.target_blocks`` (few channels
over a huge batch; one long row), each group's rows are split into chunks,
then, for segment tiles, its columns, as long as every thread keeps at least
``Settings.values_per_thread`` values.  Each block writes its own
partial ``(count, mean, M2)`` per group; partials are merged in chunk order
with the same Chan merge as the CPU partials
(:func:`normkit.backend.protocol.chan_merge`),
so a given shape and configuration gives the same bits on every run.

When no group is split (every block holds whole groups), the forward and
the batch-statistics backward are each one fused kernel: the block reduces
its tile, keeps the group results in shared memory and transforms the same
tile right away, so the second read comes from cache (L1/L2) rather than
device memory.  Otherwise the forward is a reduction, a merge and the
elementwise map (three passes over ``x``'s memory in all).

Precision
---------
Values are read in the storage dtype (float16, float32, float64) and
accumulated per thread in float32 (float64 for float64 input): moments as
sums of deviations from the thread's first value and of their squares (the
corrected two-pass formulas, exact when ``|mean| >> std``).  Thread summaries
are merged through shared memory in float64 (the simulator executes this
path; there is no warp-shuffle path), and partials, statistics and backward
sums are float64 device arrays.  Elementwise maps run in the accumulation
precision, with the mean split as on the CPU so that ``x - mean`` does not
cancel.

Nothing here copies data to the host: statistics, coefficients and the
per-channel arithmetic of the schemes (:func:`map_channels`, which compiles
:class:`~normkit.backend.protocol.channelwise` functions into kernels) stay
on the device.
"""

import contextlib
import contextvars
import functools
import math
import sys

import numpy as np
from numba import cuda, float64

from . import as_device_array, protocol
from .plan import MAX_THREADS, SETTINGS, Settings, ceil_div, grid_for  # noqa: F401

#: Reduction modes of the ``reduce`` kernel (``_kernels``).
MOMENTS, GRADS = 0, 1

#: Columns of the packed per-group coefficients of the elementwise map:
#: ``out = (x - mc) * (a*g + h) + dy * (e*g) + (beta + q*g + w)``.
N_PACKED = 6

#: The stream every launch and copy of this module is queued on (0: Numba's
#: default stream); set with :func:`launch_stream`.
_STREAM = contextvars.ContextVar("normkit_cuda_stream", default=0)


@contextlib.contextmanager
def launch_stream(stream):
    """Queue this backend's kernel launches, allocations and host <-> device
    copies on ``stream`` inside the ``with`` block.

    Outside any block they go to Numba's default stream, as before.  The
    setting is a context variable: it holds for the current thread (or
    asyncio task) only, and blocks nest.  ``normkit.torch`` runs its
    CUDA calls in ``launch_stream(numba.cuda.external_stream(
    torch.cuda.current_stream(device).cuda_stream))``, so that normkit's
    kernels are ordered with torch's work without synchronizing.

    Parameters
    ----------
    stream : numba.cuda stream or 0
        A stream of ``numba.cuda.stream()``, ``numba.cuda.external_stream``
        (a foreign stream, e.g. torch's), or 0 for the default stream.

    Examples
    --------
    >>> from numba import cuda                          # doctest: +SKIP
    >>> from normkit.backend.cuda import launch_stream  # doctest: +SKIP
    >>> stream = cuda.stream()                          # doctest: +SKIP
    >>> with launch_stream(stream):                     # doctest: +SKIP
    ...     y = normkit.layer_norm(cuda.to_device(x), 8)
    >>> stream.synchronize()                            # doctest: +SKIP
    """
    token = _STREAM.set(stream)
    try:
        yield stream
    finally:
        _STREAM.reset(token)


def current_stream():
    """The stream of :func:`launch_stream` in effect (0: the default)."""
    return _STREAM.get()


def _device_array(shape, dtype):
    """``cuda.device_array`` on the current stream."""
    return cuda.device_array(shape, dtype, stream=_STREAM.get())


def to_device(a):
    """A device copy of host array ``a`` on the current stream."""
    return cuda.to_device(np.ascontiguousarray(a), stream=_STREAM.get())


def to_host(a):
    """A host copy of device array ``a``, queued on the current stream (it
    returns once the copy, and the stream's work before it, is done)."""
    return as_device_array(a).copy_to_host(stream=_STREAM.get())


def _copy_into(target, source):
    """``target[...] = source`` on the device, on the current stream."""
    if hasattr(target, "setitem"):
        target.setitem(Ellipsis, source, stream=_STREAM.get())
    else:  # the simulator's arrays
        target[...] = source


def _pointer(a):
    """Address of the first element of device array ``a``."""
    iface = getattr(a, "__cuda_array_interface__", None)
    if iface is None:  # the simulator's arrays
        iface = a.__array_interface__
    return iface["data"][0]


def _output(out, flat):
    """The flat device array a kernel writes into: the caller's ``out``
    when it is C-contiguous (it has ``flat``'s dtype: the caller checked
    it), else a new array that :func:`_deliver` copies into ``out``.
    ``out`` may be the input itself: the elementwise kernels read and
    write each position once, in that order."""
    if out is not None:
        target = as_device_array(out)
        if target.is_c_contiguous():
            return target.reshape(target.size)
    return _device_array(flat.size, flat.dtype)


def _deliver(result, out, shape):
    """A kernel's flat ``result`` as ``shape``: ``out`` (written by the
    kernel, or copied into) when given."""
    if out is None:
        return result.reshape(shape)
    target = as_device_array(out)
    if result.size and _pointer(result) != _pointer(target):
        _copy_into(target, result.reshape(shape))
    return out


_chan_merge = cuda.jit(device=True)(protocol.chan_merge)
_dx_coefficients = cuda.jit(device=True)(protocol.dx_coefficients)
_inverse_sqrt = cuda.jit(device=True)(protocol.inverse_sqrt)


# --------------------------------------------------------------------------
# shared device functions
# --------------------------------------------------------------------------

@cuda.jit(device=True)
def _tile(A, K, L, columns, k_per, n_ktile, a_per, n_ach, l_per, n_lch):
    """This block's ``p``, first group ``k0``, rows ``[a0, a1)``, first
    column ``c0`` and ``width`` of its tile, its chunk index, and the number
    of threads that take part (whole rows of the tile for column tiles)."""
    block = cuda.blockIdx.x
    l_chunk = block % n_lch
    rest = block // n_lch
    a_chunk = rest % n_ach
    rest //= n_ach
    k0 = rest % n_ktile * k_per
    p = rest // n_ktile
    a0 = a_chunk * a_per
    l0 = l_chunk * l_per
    n_act = cuda.blockDim.x
    if columns:
        width = (min(K, k0 + k_per) - k0) * L
        n_act = n_act // width * width
    else:
        width = min(L, l0 + l_per) - l0
    return (p, k0, a0, min(A, a0 + a_per), k0 * L + l0, width,
            a_chunk * n_lch + l_chunk, n_act)


@cuda.jit(device=True)
def _combine(mode, s0, s1, s2, i, j):
    """Fold slot ``j`` of the shared scratch into slot ``i``."""
    if mode == MOMENTS:
        s0[i], s1[i], s2[i] = _chan_merge(s0[i], s1[i], s2[i], s0[j], s1[j],
                                          s2[j])
    else:
        s0[i] += s0[j]
        s1[i] += s1[j]


@cuda.jit(device=True)
def _block_reduce(mode, s0, s1, s2, columns, width, L, n_act):
    """Merge the block's thread summaries (in shared memory) per group.

    Column tiles first merge the rows of each column, then the ``L``
    columns of each group; segment tiles merge all threads.  Returns the
    thread's position in the first row and the group length in positions:
    slot ``t`` holds a group's result where ``row == 0`` and
    ``pos % span == 0``.
    """
    t = cuda.threadIdx.x
    row_width = width if columns else cuda.blockDim.x
    rows = n_act // row_width
    row = t // row_width
    pos = t % row_width
    span = L if columns else cuda.blockDim.x
    step = 1
    while step < rows:
        cuda.syncthreads()
        if row % (2 * step) == 0 and row + step < rows:
            _combine(mode, s0, s1, s2, t, t + step * row_width)
        step *= 2
    step = 1
    while step < span:
        cuda.syncthreads()
        j = pos % span
        if row == 0 and j % (2 * step) == 0 and j + step < span:
            _combine(mode, s0, s1, s2, t, t + step)
        step *= 2
    cuda.syncthreads()
    return row, pos, span


@cuda.jit(device=True)
def _column(k, col, L, J, B):
    """Affine index ``k * J + j`` of tile column ``col`` in group ``k``."""
    if J == 1:
        return k
    return k * J + (col - k * L) // B


@cuda.jit(device=True)
def _group_of_thread(P, K):
    """``(p, k)`` of this thread in a one-thread-per-group launch, ``p = -1``
    for threads past the last group."""
    i = cuda.grid(1)
    if i >= P * K:
        return -1, 0
    return i // K, i % K


@cuda.jit(device=True)
def _walk_start(a0, a1, width, n_act):
    """This thread's first ``(row, column)`` of a tile of ``width`` columns
    walked in row-major order, ``n_act`` values per step (``row = a1``:
    nothing to do), and the step in rows and columns."""
    t = cuda.threadIdx.x
    a = a0 + t // width if t < n_act else a1
    return a, t % width, n_act // width, n_act % width


@cuda.jit(device=True)
def _walk_next(a, c, step_a, step_c, width):
    """The next ``(row, column)`` of the walk of :func:`_walk_start`."""
    c += step_c
    a += step_a
    if c >= width:
        c -= width
        a += 1
    return a, c


@cuda.jit(device=True)
def _store_partial(part, p, chunk, k, s0, s1, s2, slot):
    """Copy the block result in ``slot`` of the shared scratch to
    ``part[p, chunk, k]``."""
    part[p, chunk, k, 0] = s0[slot]
    part[p, chunk, k, 1] = s1[slot]
    part[p, chunk, k, 2] = s2[slot]


@functools.lru_cache(maxsize=None)
def _kernels(acc):
    """The reduction, elementwise and fused kernels accumulating in ``acc``
    (``np.float32`` for float16/float32 storage, ``np.float64`` for
    float64), as a dict by name."""

    @cuda.jit(device=True)
    def accumulate(x, dy, mean, rstd, weight, mode, p, A, K, J, B,
                   stat_rows, stat_group, a0, a1, c0, width, n_act, s0, s1,
                   s2):
        """This thread's summary of its values of the tile, in slot ``t``.

        ``MOMENTS``: ``(count, mean, M2)`` of ``x``.  ``GRADS``: with
        ``xhat = (x - mean[ps, ks]) * rstd[ps, ks]`` and ``w = weight[k*J+j]``,
        ``(sum w*dy, sum w*dy*xhat, 0)``; the statistics row is ``ps = p``
        (``stat_rows == 0``) or ``(p*A + a) // stat_rows``, the statistics
        group ``ks = k // stat_group`` (a single row of statistics
        broadcasts over ``p``).
        """
        t = cuda.threadIdx.x
        L = J * B
        W = K * L
        a, c, step_a, step_c = _walk_start(a0, a1, width, n_act)
        k = (c0 + c) // L
        zero = acc(0.0)
        shift = zero
        sum1 = zero
        sum2 = zero
        count = 0
        if mode == MOMENTS and a < a1:
            shift = acc(x[(p * A + a) * W + c0 + c])
        while a < a1:
            i = (p * A + a) * W + c0 + c
            if mode == MOMENTS:
                d = acc(x[i]) - shift
                sum1 += d
                sum2 += d * d
            else:
                ps = p if stat_rows == 0 else (p * A + a) // stat_rows
                ks = k // stat_group
                m = mean[ps if mean.shape[0] > 1 else 0, ks]
                rs = rstd[ps if rstd.shape[0] > 1 else 0, ks]
                g = acc(weight[_column(k, c0 + c, L, J, B)]) * acc(dy[i])
                sum1 += g
                sum2 += g * (acc(x[i]) - acc(m)) * acc(rs)
            count += 1
            a, c = _walk_next(a, c, step_a, step_c, width)
        if mode == MOMENTS:
            n = float64(count)
            s0[t] = n
            s1[t] = 0.0
            s2[t] = 0.0
            if count > 0:
                d1 = float64(sum1)
                s1[t] = float64(shift) + d1 / n
                s2[t] = max(float64(sum2) - d1 * d1 / n, 0.0)
        else:
            s0[t] = float64(sum1)
            s1[t] = float64(sum2)
            s2[t] = 0.0

    @cuda.jit(device=True)
    def transform(x, dy, out, use_dy, gamma, has_gamma, beta, has_beta, p, A,
                  K, J, B, a0, a1, c0, width, n_act, mc, sx, h, e, q, w):
        """This thread's values of the tile through
        ``out = (x - mc) * (sx*g + h) + dy * (e*g) + (beta + q*g + w)``
        with per-(k, j) ``g = gamma`` and ``beta`` (1 and 0 when absent) and
        this thread's group's coefficients; the ``dy`` term only when
        ``use_dy``."""
        L = J * B
        W = K * L
        a, c, step_a, step_c = _walk_start(a0, a1, width, n_act)
        k = (c0 + c) // L
        while a < a1:
            i = (p * A + a) * W + c0 + c
            col = _column(k, c0 + c, L, J, B)
            g = acc(1.0)
            if has_gamma:
                g = acc(gamma[col])
            b = w + q * g
            if has_beta:
                b += acc(beta[col])
            value = (acc(x[i]) - mc) * (sx * g + h) + b
            if use_dy:
                value += acc(dy[i]) * (e * g)
            out[i] = value
            a, c = _walk_next(a, c, step_a, step_c, width)

    @cuda.jit(device=True)
    def packed(m, a_k, h, e, c):
        """The coefficients ``(mc, a, h, e, q, w)`` of :func:`transform`
        from float64 ``out = (x - m) * (a*g + h) + dy * (e*g) + (beta + c)``:
        ``mc`` is ``m`` rounded to the accumulation precision (so that
        ``x - mc`` does not cancel), and the rest of ``m`` is folded into
        ``q = -(m - mc) * a`` and ``w = c - (m - mc) * h``."""
        mc = acc(m)
        rest = m - float64(mc)
        return mc, acc(a_k), acc(h), acc(e), acc(-rest * a_k), acc(c - rest * h)

    @cuda.jit(device=True)
    def summarize(x, dy, mean, rstd, weight, mode, A, K, J, B, stat_rows,
                  stat_group, columns, k_per, n_ktile, a_per, n_ach, l_per,
                  n_lch, s0, s1, s2):
        """:func:`accumulate` over this block's tile and
        :func:`_block_reduce`; returns the tile (:func:`_tile`) and, for
        this thread, whether its slot holds a group's result, that group,
        and the slot of its own group's result."""
        t = cuda.threadIdx.x
        L = J * B
        p, k0, a0, a1, c0, width, chunk, n_act = _tile(
            A, K, L, columns, k_per, n_ktile, a_per, n_ach, l_per, n_lch)
        accumulate(x, dy, mean, rstd, weight, mode, p, A, K, J, B, stat_rows,
                   stat_group, a0, a1, c0, width, n_act, s0, s1, s2)
        row, pos, span = _block_reduce(mode, s0, s1, s2, columns, width, L,
                                       n_act)
        holder = row == 0 and pos % span == 0 and t < n_act
        own = (t % width) // L * L if columns else 0
        return (p, a0, a1, c0, width, chunk, n_act, holder, k0 + pos // span,
                own)

    @cuda.jit
    def reduce(x, dy, mean, rstd, weight, mode, A, K, J, B, stat_rows,
               stat_group, columns, k_per, n_ktile, a_per, n_ach, l_per,
               n_lch, part):
        """Partials ``part[p, chunk, k]`` of :func:`accumulate` over each
        block's tile."""
        s0 = cuda.shared.array(MAX_THREADS, float64)
        s1 = cuda.shared.array(MAX_THREADS, float64)
        s2 = cuda.shared.array(MAX_THREADS, float64)
        t = cuda.threadIdx.x
        p, _, _, _, _, chunk, _, holder, kk, _ = summarize(
            x, dy, mean, rstd, weight, mode, A, K, J, B, stat_rows,
            stat_group, columns, k_per, n_ktile, a_per, n_ach, l_per, n_lch,
            s0, s1, s2)
        if holder:
            _store_partial(part, p, chunk, kk, s0, s1, s2, t)

    @cuda.jit
    def apply(x, dy, out, use_dy, coef, gamma, has_gamma, beta, has_beta, A,
              K, J, B, columns, k_per, n_ktile, a_per, n_ach, l_per, n_lch):
        """:func:`transform` of every tile with the packed per-(p, k)
        coefficients ``coef`` (see ``pack``)."""
        L = J * B
        p, _, a0, a1, c0, width, _, n_act = _tile(
            A, K, L, columns, k_per, n_ktile, a_per, n_ach, l_per, n_lch)
        k = (c0 + cuda.threadIdx.x % width) // L
        transform(x, dy, out, use_dy, gamma, has_gamma, beta, has_beta, p, A,
                  K, J, B, a0, a1, c0, width, n_act, coef[p, k, 0],
                  coef[p, k, 1], coef[p, k, 2], coef[p, k, 3], coef[p, k, 4],
                  coef[p, k, 5])

    @cuda.jit
    def forward_fused(x, out, gamma, has_gamma, beta, has_beta, eps, A, K, J,
                      B, columns, k_per, n_ktile, a_per, n_ach, l_per, n_lch,
                      mean_out, var_out, rstd_out):
        """Moments and normalization of whole groups in one block: the
        tile is read a second time right after its reduction, from cache.
        Only for grids without splits (``n_chunks == 1``); writes the
        mean, the biased variance and ``rstd = 1 / sqrt(var + eps)``, the
        factor it normalized with, per ``(p, k)``."""
        s0 = cuda.shared.array(MAX_THREADS, float64)
        s1 = cuda.shared.array(MAX_THREADS, float64)
        s2 = cuda.shared.array(MAX_THREADS, float64)
        p, a0, a1, c0, width, _, n_act, holder, kk, own = summarize(
            x, x, mean_out, mean_out, gamma, MOMENTS, A, K, J, B, 0, 1,
            columns, k_per, n_ktile, a_per, n_ach, l_per, n_lch, s0, s1, s2)
        m = s1[own]
        var = s2[own] / s0[own]
        rs = _inverse_sqrt(var + eps)
        if holder:
            mean_out[p, kk] = m
            var_out[p, kk] = var
            rstd_out[p, kk] = rs
        mc, a_x, h_x, e_x, q_x, w_x = packed(m, rs, 0.0, 0.0, 0.0)
        transform(x, x, out, False, gamma, has_gamma, beta, has_beta, p, A, K,
                  J, B, a0, a1, c0, width, n_act, mc, a_x, h_x, e_x, q_x, w_x)

    @cuda.jit
    def backward_fused(x, dy, out, mean, rstd, weight, gscale, has_gscale,
                       scale_sums, n, centered, A, K, J, B, columns, k_per,
                       n_ktile, a_per, n_ach, l_per, n_lch, part):
        """Backward of batch statistics for whole groups in one block: the
        group sums of :func:`accumulate` (``GRADS``, also stored in
        ``part[p, 0, k]``), then ``dx`` of the same tile from cache.  Only
        for grids without splits (``n_chunks == 1``)."""
        s0 = cuda.shared.array(MAX_THREADS, float64)
        s1 = cuda.shared.array(MAX_THREADS, float64)
        s2 = cuda.shared.array(MAX_THREADS, float64)
        t = cuda.threadIdx.x
        p, a0, a1, c0, width, _, n_act, holder, kk, own = summarize(
            x, dy, mean, rstd, weight, GRADS, A, K, J, B, 0, 1, columns, k_per,
            n_ktile, a_per, n_ach, l_per, n_lch, s0, s1, s2)
        if holder:
            _store_partial(part, p, 0, kk, s0, s1, s2, t)
        k = (c0 + t % width) // (J * B)
        m = float64(mean[p if mean.shape[0] > 1 else 0, k])
        rs = float64(rstd[p if rstd.shape[0] > 1 else 0, k])
        f = float64(gscale[k]) if scale_sums else 1.0
        h, c = _dx_coefficients(rs, f * s0[own], f * s1[own], n, centered)
        mc, a_x, h_x, e_x, q_x, w_x = packed(m, 0.0, h, rs, c)
        transform(x, dy, out, True, gscale, has_gscale, gscale, False, p, A, K,
                  J, B, a0, a1, c0, width, n_act, mc, a_x, h_x, e_x, q_x, w_x)

    @cuda.jit
    def pack(backward, mean, scale, sum_g, sum_gx, gscale, scale_sums, n,
             centered, coef):
        """Packed coefficients (:func:`packed`) per ``(p, k)``.

        Forward: ``a = scale`` (``rstd``, or ``r / sigma``).  Backward:
        ``a = 0``, ``e = rstd`` and ``h``, ``c`` of :func:`normkit.backend.protocol.dx_coefficients` from
        the group sums ``sum_g``, ``sum_gx`` (times ``gscale[k]`` when
        ``scale_sums``); ``n = inf`` for fixed statistics (``h = c = 0``).
        ``mean`` and ``scale`` may have one row for all ``p``.
        """
        p, k = _group_of_thread(coef.shape[0], coef.shape[1])
        if p < 0:
            return
        m = float64(mean[p if mean.shape[0] > 1 else 0, k])
        rs = float64(scale[p if scale.shape[0] > 1 else 0, k])
        if not backward:
            values = packed(m, rs, 0.0, 0.0, 0.0)
        elif n < math.inf:
            f = float64(gscale[k]) if scale_sums else 1.0
            h, c = _dx_coefficients(rs, f * sum_g[p, k], f * sum_gx[p, k], n,
                                        centered)
            values = packed(m, 0.0, h, rs, c)
        else:
            values = packed(m, 0.0, 0.0, rs, 0.0)
        for i in range(N_PACKED):
            coef[p, k, i] = values[i]

    return {"reduce": reduce, "apply": apply, "pack": pack,
            "forward_fused": forward_fused, "backward_fused": backward_fused}


@cuda.jit
def _merge(part, mode, centered, out0, out1):
    """Merge partials ``(P, chunks, K, 3)`` in chunk order per ``(p, k)``:
    ``MOMENTS`` gives ``out0 = mean``, ``out1 = M2 / n`` (not ``centered``:
    ``0`` and the mean square ``M2 / n + mean**2``; NaN for a group of no
    values); ``GRADS`` the two sums."""
    p, k = _group_of_thread(part.shape[0], part.shape[2])
    if p < 0:
        return
    n = 0.0
    m = 0.0
    m2 = 0.0
    for ch in range(part.shape[1]):
        if mode == MOMENTS:
            n, m, m2 = _chan_merge(n, m, m2, part[p, ch, k, 0],
                                   part[p, ch, k, 1], part[p, ch, k, 2])
        else:
            n += part[p, ch, k, 0]
            m += part[p, ch, k, 1]
    if mode == MOMENTS and n == 0.0:  # an empty group: no statistics
        out0[p, k] = math.nan
        out1[p, k] = math.nan
    elif mode == MOMENTS and centered:
        out0[p, k] = m
        out1[p, k] = m2 / n
    elif mode == MOMENTS:
        out0[p, k] = 0.0
        out1[p, k] = m2 / n + m * m
    else:
        out0[p, k] = n
        out1[p, k] = m


@cuda.jit
def _settle_mean_squares(x, var, A, K, J, B):
    """Where a group's mean square ``var[p, k]`` came out of the merged
    moments as NaN (an infinite value leaves ``M2`` NaN), sum the group's
    squares again plainly in float64: +inf there, NaN only for a group
    that holds a NaN, as ``mean(x**2)`` (the CPU backend's
    ``_plain_mean_square``).  One thread per group; a loop over the
    group on that path alone."""
    p, k = _group_of_thread(var.shape[0], var.shape[1])
    if p < 0 or not math.isnan(var[p, k]):
        return
    L = J * B
    total = 0.0
    for a in range(A):
        start = ((p * A + a) * K + k) * L
        for i in range(start, start + L):
            value = float64(x[i])
            total += value * value
    var[p, k] = total / (A * L)


# --------------------------------------------------------------------------
# host drivers
# --------------------------------------------------------------------------

def _accumulator(dtype):
    """Per-thread accumulation type of a storage dtype."""
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def _flat(x):
    """``x`` (any device array) as a flat Numba device array: no copy when
    it is C-contiguous, else one copy on the device (Numba's strided
    assignment kernel), as the CPU backend copies other layouts once."""
    x = as_device_array(x)
    if not x.is_c_contiguous():
        contiguous = _device_array(x.shape, x.dtype)
        _copy_into(contiguous, x)
        x = contiguous
    return x.reshape(x.size)


def _optional(values):
    """``(array, present)`` kernel arguments for an optional array."""
    if values is None:
        return _placeholder(), False
    return _flat(values), True


@functools.lru_cache(maxsize=None)
def _placeholder():
    """A one-element stand-in for an absent optional kernel argument (never
    read: a flag or the mode tells the kernel it is absent).  Cached, so
    made outside any launch stream, once."""
    return cuda.device_array(1, np.float64)


def _launch(n):
    """``(blocks, threads)`` for a one-thread-per-item kernel."""
    threads = min(SETTINGS.threads, MAX_THREADS)
    return max(1, ceil_div(n, threads)), threads


def _no_values(view):
    """True for a view with a zero dimension: nothing is launched for it
    (results are empty, statistics NaN, sums zero)."""
    return math.prod(view.dims) == 0


def _filled(shape, value):
    """A new float64 device array of ``shape`` holding ``value``."""
    return to_device(np.full(shape, value))


def _reduce(x, dy, view, grid, mode, mean=None, rstd=None, weight=None,
            stat_rows=0, stat_group=1):
    """Partials ``(P, chunks, K, 3)`` of the ``reduce`` kernel."""
    reduce = _kernels(_accumulator(x.dtype))["reduce"]
    none = _placeholder()
    part = _device_array((view.P, grid.n_chunks, view.K, 3), np.float64)
    reduce[grid.blocks(view.P), grid.threads, _STREAM.get()](
        x, none if dy is None else dy,
        none.reshape(1, 1) if mean is None else mean,
        none.reshape(1, 1) if rstd is None else rstd,
        none if weight is None else weight, mode, view.A, view.K, view.J,
        view.B, stat_rows, stat_group, *grid.args(), part)
    return part


def _merged(part, mode, centered=True):
    """The ``_merge`` of partials ``part`` as two ``(P, K)`` arrays."""
    P, _, K, _ = part.shape
    out0 = _device_array((P, K), np.float64)
    out1 = _device_array((P, K), np.float64)
    _merge[_launch(P * K) + (_STREAM.get(),)](part, mode, centered, out0, out1)
    return out0, out1


def moments(x, view, centered=True):
    """Per-group mean and biased variance, ``(P, K)`` float64 device arrays
    (``centered=False``: zero and the mean square, as
    :func:`normkit.engine.moments`, summed again where it comes out NaN:
    ``_settle_mean_squares``)."""
    if _no_values(view):
        return (_filled((view.P, view.K), math.nan),
                _filled((view.P, view.K), math.nan))
    flat = _flat(x)
    mean, var = _merged(_reduce(flat, None, view, grid_for(view), MOMENTS),
                        MOMENTS, centered)
    if not centered:
        _settle_mean_squares[_launch(view.P * view.K) + (_STREAM.get(),)](
            flat, var, view.A, view.K, view.J, view.B)
    return mean, var


def _apply(flat, dy, view, grid, coef, gamma, beta, out=None):
    """The ``apply`` kernel over ``flat`` (and ``dy`` unless None), into
    ``out`` (a flat array) or a new array."""
    apply = _kernels(_accumulator(flat.dtype))["apply"]
    out = _output(out, flat)
    gamma, has_gamma = _optional(gamma)
    beta, has_beta = _optional(beta)
    apply[grid.blocks(view.P), grid.threads, _STREAM.get()](
        flat, flat if dy is None else dy, out, dy is not None, coef, gamma,
        has_gamma, beta, has_beta, view.A, view.K, view.J, view.B,
        *grid.args())
    return out


def _coefficients(dtype, view, mean, scale, backward=False, sums=None,
                  gscale=None, scale_sums=False, n=math.inf, centered=True):
    """Packed coefficients ``(P, K, 6)`` from the ``pack`` kernel."""
    acc = _accumulator(dtype)
    pack = _kernels(acc)["pack"]
    coef = _device_array((view.P, view.K, N_PACKED), acc)
    none = _placeholder()
    sum_g, sum_gx = (none.reshape(1, 1),) * 2 if sums is None else sums
    pack[_launch(view.P * view.K) + (_STREAM.get(),)](
        backward, mean, scale, sum_g, sum_gx,
        none if gscale is None else gscale, scale_sums, float(n), centered,
        coef)
    return coef


def _as_rows(values, view):
    """Per-group values as a ``(rows, K)`` device array (rows 1 or P)."""
    return _flat(values).reshape(-1, view.K)


def apply_affine(x, view, mean, alpha, gamma=None, beta=None, out=None):
    """Device version of :func:`normkit.engine.apply_affine`; ``mean`` and
    ``alpha`` are device arrays of ``P * K`` or ``K`` values."""
    if _no_values(view):
        return _device_array(x.shape, x.dtype) if out is None else out
    flat = _flat(x)
    grid = grid_for(view)
    coef = _coefficients(flat.dtype, view, _as_rows(mean, view),
                         _as_rows(alpha, view))
    y = _apply(flat, None, view, grid, coef, gamma, beta, out)
    return _deliver(y, out, x.shape)


def normalize_batch(x, view, gamma=None, beta=None, eps=1e-5, centered=True,
                    out=None):
    """Device version of :func:`normkit.engine.normalize_batch`: one fused
    kernel when every block holds whole groups (it writes ``rstd`` too),
    else moments, then the elementwise map."""
    if _no_values(view):
        mean, var = moments(x, view)
        return ((_device_array(x.shape, x.dtype) if out is None else out),
                mean, var, _inverse_std(var, eps))
    grid = grid_for(view)
    if grid.n_chunks > 1 or not centered:
        mean, var = moments(x, view, centered)
        rstd = _inverse_std(var, eps)
        return (apply_affine(x, view, mean, rstd, gamma, beta, out), mean, var,
                rstd)
    flat = _flat(x)
    fused = _kernels(_accumulator(flat.dtype))["forward_fused"]
    y = _output(out, flat)
    mean, var, rstd = (_device_array((view.P, view.K), np.float64)
                       for _ in range(3))
    gamma, has_gamma = _optional(gamma)
    beta, has_beta = _optional(beta)
    fused[grid.blocks(view.P), grid.threads, _STREAM.get()](
        flat, y, gamma, has_gamma, beta, has_beta, float(eps), view.A,
        view.K, view.J, view.B, *grid.args(), mean, var, rstd)
    return _deliver(y, out, x.shape), mean, var, rstd


def normalize_transformed(x, view, transform, args, gamma=None, beta=None,
                          centered=True, out=None):
    """Device version of :func:`normkit.engine.normalize_transformed`:
    moments, the transform, then the elementwise map
    (:func:`~normkit.backend.protocol.normalize_in_steps`; the fused
    kernel takes no transform)."""
    return protocol.normalize_in_steps(sys.modules[__name__], x, view,
                                       transform, args, gamma, beta, centered,
                                       out)


def _inverse_std(var, eps):
    """``1 / sqrt(var + eps)`` as a device array of ``var``'s shape."""
    return protocol.inverse_std(var, eps,
                                out=_device_array(var.shape, np.float64))


def _grad_inputs(dy, x, view, mean, rstd, centered):
    """Flat ``x`` and ``dy``, and the statistics as ``(rows, K)`` arrays
    (zero means when not ``centered``)."""
    mean = _as_rows(mean if centered else _constant(0.0, view.K), view)
    return _flat(x), _flat(dy), mean, _as_rows(rstd, view)


def backward(dy, x, view, mean, rstd, gscale=None, batch_stats=True,
             need_affine=True, centered=True, out=None, affine_out=None):
    """Device version of :func:`normkit.engine.backward`.

    The group sums are reduced with the ``gscale`` weights, except with one
    affine column per group (``J == 1``): then the unweighted per-(p, k)
    sums give both the group sums (times ``gscale[k]``) and the affine sums
    (summed over ``p``) from one pass.  Otherwise the affine sums are
    reduced over the view ``(1, P*A, K*J, 1, B)`` of the same data.  With
    batch statistics and blocks holding whole groups, sums and ``dx`` come
    from one fused kernel.  The affine sums are float64 whether or not
    ``affine_out`` is given (:func:`normkit.engine.backward` converts
    them into it).
    """
    if _no_values(view):
        kj = view.K * view.J
        dx = _device_array(x.shape, x.dtype) if out is None else out
        return ((dx, _filled(kj, 0.0), _filled(kj, 0.0)) if need_affine
                else (dx, None, None))
    flat_x, flat_dy, mean, rstd = _grad_inputs(dy, x, view, mean, rstd, centered)
    grid = grid_for(view)
    gscale = None if gscale is None else _flat(gscale)
    per_group = view.J == 1 or gscale is None
    weights = _constant(1.0, view.K * view.J) if per_group else gscale
    scale_sums = per_group and gscale is not None
    n = float(view.group_size) if batch_stats else math.inf
    part = None
    if batch_stats and grid.n_chunks == 1:
        dx, part = _backward_fused(flat_x, flat_dy, view, grid, mean, rstd,
                                   weights, gscale, scale_sums, n, centered,
                                   out)
    else:
        if batch_stats or (need_affine and view.J == 1):
            part = _reduce(flat_x, flat_dy, view, grid, GRADS, mean, rstd,
                           weights)
        sums = _merged(part, GRADS) if batch_stats else None
        coef = _coefficients(flat_x.dtype, view, mean, rstd, True, sums,
                             gscale, scale_sums, n, centered)
        dx = _apply(flat_x, flat_dy, view, grid, coef, gscale, None, out)
    dx = _deliver(dx, out, x.shape)
    if not need_affine:
        return dx, None, None
    sum_dy, sum_dy_xhat = _affine_sums(flat_x, flat_dy, view, grid, mean, rstd,
                                       part if view.J == 1 else None)
    return dx, sum_dy, sum_dy_xhat


def _affine_sums(flat_x, flat_dy, view, grid, mean, rstd, unit_part=None):
    """``(sum dy, sum dy*xhat)`` per ``(k, j)``: from ``unit_part``, group
    partials reduced with unit weights, when there is one column per group
    (``J == 1``), else reduced over the view ``(1, P*A, K*J, 1, B)`` of the
    same data."""
    if unit_part is not None:
        total = _merged(unit_part.reshape(1, -1, view.K, 3), GRADS)
    else:
        affine = type(view)(1, view.P * view.A, view.K * view.J, 1, view.B)
        total = _merged(_reduce(flat_x, flat_dy, affine, grid_for(affine),
                                GRADS, mean, rstd, _constant(1.0, view.K * view.J),
                                stat_rows=view.A, stat_group=view.J), GRADS)
    return total[0][0], total[1][0]


def _backward_fused(flat_x, flat_dy, view, grid, mean, rstd, weights, gscale,
                    scale_sums, n, centered, out=None):
    """``dx`` (flat, in ``out`` when it can be written directly) and the
    group partials ``(P, 1, K, 3)`` from the fused backward kernel."""
    fused = _kernels(_accumulator(flat_x.dtype))["backward_fused"]
    dx = _output(out, flat_x)
    part = _device_array((view.P, 1, view.K, 3), np.float64)
    gscale, has_gscale = _optional(gscale)
    fused[grid.blocks(view.P), grid.threads, _STREAM.get()](
        flat_x, flat_dy, dx, mean, rstd, weights, gscale, has_gscale,
        scale_sums, n, centered, view.A, view.K, view.J, view.B, *grid.args(),
        part)
    return dx, part


@functools.lru_cache(maxsize=64)
def _constant(value, n):
    """A cached float64 device array of ``n`` copies of ``value``: copied
    synchronously (not on the launch stream: it outlives the call), so it
    is complete before any stream reads it."""
    return cuda.to_device(np.full(n, value))


# --------------------------------------------------------------------------
# the rest of the protocol
# --------------------------------------------------------------------------

def moment_partials(x, view):
    """See :meth:`normkit.backend.protocol.Backend.moment_partials`."""
    if _no_values(view):  # one chunk of count 0 per group
        return _filled((view.P, 1, view.K, 3), 0.0)
    return _reduce(_flat(x), None, view, grid_for(view), MOMENTS)


def merge_partials(partials, centered=True):
    """See :meth:`normkit.backend.protocol.Backend.merge_partials`."""
    return _merged(as_device_array(partials), MOMENTS, centered)


def backward_sums(dy, x, view, mean, rstd, gscale=None, centered=True):
    """See :meth:`normkit.backend.protocol.Backend.backward_sums`; the group
    sums come as two ``(P, K)`` arrays, the affine sums as two ``(K*J,)``."""
    if _no_values(view):  # sums over no values
        kj = view.K * view.J
        return ((_filled((view.P, view.K), 0.0), _filled((view.P, view.K), 0.0)),
                (_filled(kj, 0.0), _filled(kj, 0.0)))
    flat_x, flat_dy, mean, rstd = _grad_inputs(dy, x, view, mean, rstd, centered)
    weights = _constant(1.0, view.K * view.J) if gscale is None else _flat(gscale)
    grid = grid_for(view)
    part = _reduce(flat_x, flat_dy, view, grid, GRADS, mean, rstd, weights)
    group = _merged(part, GRADS)
    unit = view.J == 1 and gscale is None
    affine = _affine_sums(flat_x, flat_dy, view, grid, mean, rstd,
                          part if unit else None)
    return group, affine


def dx_from_sums(dy, x, view, mean, rstd, gscale, group_sums, n, centered=True,
                 out=None):
    """See :meth:`normkit.backend.protocol.Backend.dx_from_sums`;
    ``group_sums`` is the pair of ``(P, K)`` arrays of :func:`backward_sums`."""
    if _no_values(view):
        return _device_array(x.shape, x.dtype) if out is None else out
    flat_x, flat_dy, mean, rstd = _grad_inputs(dy, x, view, mean, rstd, centered)
    sums = tuple(_as_rows(s, view) for s in group_sums)
    coef = _coefficients(flat_x.dtype, view, mean, rstd, True, sums, None,
                         False, float(n), centered)
    gscale = None if gscale is None else _flat(gscale)
    dx = _apply(flat_x, flat_dy, view, grid_for(view), coef, gscale, None,
                out)
    return _deliver(dx, out, x.shape)


def kernel_for(function, key):
    """The kernel of channelwise ``function`` for one pattern of arguments,
    ``key = ("cuda", scalars)`` (:func:`map_channels`) or ``("cuda-view",
    kinds)`` (:func:`map_view`): one thread per element, cached on the
    function.  The generated loop records ``key`` as ``__normkit_key__``
    (the PTX check recompiles every recorded launch from it)."""
    kernel = function.compiled.get(key)
    if kernel is None:
        if key[0] == "cuda":
            reads, params = protocol.plain_reads(key[1]), ""
        else:
            reads = [protocol.VIEW_READS[kind].format(n=n)
                     for n, kind in enumerate(key[1])]
            params = protocol.VIEW_PARAMS
        source = protocol.loop_source(
            function.arity, function.outputs, reads,
            "    i = cuda.grid(1)\n    if i < o0.size:\n", params)
        namespace = {"f": cuda.jit(device=True)(function.function),
                     "cuda": cuda, "float64": float64}
        exec(source, namespace)
        namespace["loop"].__normkit_key__ = key
        kernel = function.compiled[key] = cuda.jit(namespace["loop"])
    return kernel


def map_channels(function, args, out):
    """Run a :class:`~normkit.backend.protocol.channelwise` function over
    device arrays of one size."""
    scalars = tuple(protocol.is_number(a) for a in args)
    kernel = kernel_for(function, ("cuda", scalars))
    flat = [float(a) if scalar else _flat(a)
            for a, scalar in zip(args, scalars)]
    size = next(a.size for a, scalar in zip(flat, scalars) if not scalar)
    if out is None:
        out = tuple(_device_array(size, np.float64)
                    for _ in range(function.outputs))
    targets = [as_device_array(o).reshape(size) for o in out]
    kernel[_launch(size) + (_STREAM.get(),)](*flat, *targets)
    return out


def map_view(function, view, args, kinds, out):
    """Run a channelwise function over every element of an input of
    ``view`` (see :meth:`~normkit.backend.protocol.channelwise.over`)."""
    kernel = kernel_for(function, ("cuda-view", kinds))
    flat = [float(a) if kind == "scalar" else _flat(a)
            for a, kind in zip(args, kinds)]
    like = flat[kinds.index("full")]
    shape = args[kinds.index("full")].shape
    targets = [_output(o, like) for o in (out or (None,) * function.outputs)]
    kernel[_launch(like.size) + (_STREAM.get(),)](
        *flat, *targets, *protocol.view_params(view))
    if out is None:
        return tuple(t.reshape(shape) for t in targets)
    return tuple(_deliver(t, o, shape) for t, o in zip(targets, out))


def copy_into(out, a):
    """``out[...] = a`` on the device, on the current stream (same shape
    and dtype); returns ``out``."""
    _copy_into(as_device_array(out), as_device_array(a).reshape(out.shape))
    return out


def empty(shape, dtype):
    """``numba.cuda.device_array`` (on the stream of :func:`launch_stream`)."""
    return _device_array(shape, dtype)
