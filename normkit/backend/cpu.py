"""CPU backend: Numba kernels (``parallel=True``) and their launch.

Implements :class:`normkit.backend.protocol.Backend` for NumPy arrays.
Every kernel works on the canonical view ``(P, A, K, J, B)`` of a
contiguous, flattened array (see :mod:`normkit.view`): statistics are per
``(p, k)`` and reduced over ``(a, j, b)``; the affine parameters are per
``(k, j)``.  With ``L = J * B`` the data of one ``(p, a, k)`` is the
contiguous segment that starts at ``((p * A + a) * K + k) * L``.

Work is split into *items* by a :class:`~normkit.backend.plan.Plan`: an item
is a block of ``p`` values, a block of groups, a chunk of ``a`` values and
a chunk of ``l`` offsets.  The kernels take a plan's fields as a plain
tuple (``tuple(plan)``), which Numba's dispatcher types in C; it types a
NamedTuple with Python code, which costs more on every call, most of all
after a pass over a large input has evicted that code from the caches.
Each item writes its own partial results (never into a slot that another
item writes), and partials are merged afterwards with Chan's formula, in a
fixed order, so a given shape and thread count gives the same bits on
every run of the same compiled kernels (a process that compiles a
kernel can round differently, in the last bits, from those that load it
from Numba's on-disk cache: the user guide's *Reproducibility*).  Where
a group spans items (BatchNorm),
a pass takes two parallel launches with a merge between them; a compiled
driver (:func:`normalize_two_pass`, :func:`backward_two_pass`) runs them
as one call from Python.

Moments are sums over tiles of at most :data:`TILE` elements of the
deviations from a provisional center and of their squares (the shifted
form of the corrected two-pass algorithm), in the input's precision, which
vectorises twice as wide for float32: the center of a group's first tile
is the mean of its first :data:`CENTER_HEAD` values, every later tile's
the running mean of the tiles before it, one pass each; a first tile
whose sums show its center far from its mean (:data:`MAX_SHIFT_SHARE`)
is summed again, still in cache, about its own mean.  Tile
summaries are merged in float64 with Chan's formula, so the variance never
suffers the E[x^2] - E[x]^2 cancellation and is never negative.  Segments
of a few dozen values (channels-first BatchNorm over a few pixels) are
gathered, in memory order, into tiles of up to :data:`SHORT_TILE` values
of one group, each segment's sums added in float64; there a group's
first tile is still centered on its own mean, in a pass of its own (a
head's center gained nothing measurable there).  The row tiles of
channels-last inputs (``_rows_moments``) are centered as contiguous
tiles are, on the mean of their first :data:`ROW_STEP` rows, and summed
again where some column's center lies far off: a chunk of wide rows holds
few tiles, and a pass of its own over the first one read up to a quarter
of the chunk again.  The
backward sums of contiguous segments are tiled the same way, their
products and tile sums in float64, or in float32 for 16-bit storage
(:func:`~normkit.backend.storage.product_zero`), the tiles added in
float64.

Dtype policy: a C-contiguous input is never copied (any other layout is
copied once).  float16 and bfloat16 are read and written by the kernels
themselves, one element at a time, through :mod:`normkit.backend.storage`,
and computed in float32: no widened copy of the input, no narrowed copy of
the output.  The kernels are specialised by Numba for each storage type.
Their loops along a row read the per-column parameters with no test in
the loop (a missing one from a block of ones or zeros,
``_param_block``): a 16-bit read behind a test needs masked loads to
vectorise, which AVX2 lacks.
"""

import functools
import hashlib
import importlib.util
import inspect
import math
import os
import sys

import numba
import numpy as np
from numba import njit, prange, vectorize
from numba.extending import overload
from numba.np.numpy_support import as_dtype

from . import protocol, storage
from .storage import (compute_dtype, compute_empty, compute_zero, load,
                      product_zero, store, storage_view, stream,
                      stream_fence)
from .plan import (WIDE_GROUP, affine_partials_fit, affine_slots,
                   column_sums, make_plan, reduction_plan, thread_blocks,
                   thread_count)

#: Fast-math flags: reassociation lets LLVM vectorise the reductions.  The
#: flags ``nnan`` and ``ninf`` are deliberately absent so that NaN and Inf
#: propagate exactly as in plain IEEE arithmetic.
FASTMATH = {"nsz", "arcp", "contract", "reassoc"}

#: Elements per tile of the segment moments.  Every tile takes one pass
#: about a provisional center (a group's first tile now and then two, see
#: :data:`MAX_SHIFT_SHARE`).  Smaller tiles hand more of the sum to the
#: float64 merge: for one group of 200704 float32 values of mean 1e4 and
#: std 1, the variance's relative error was 3.5e-7 with tiles of 4096 and
#: is 3.4e-8; no clear difference in speed was measured (old and new
#: alternating).
TILE = 1024

#: Most elements per tile of ``_short_segment_moments``, which gathers
#: short segments of a group (channels-first BatchNorm over a few pixels)
#: into one tile: one float64 merge per tile, not per segment (the
#: moments of float32 (32, 1024, 4, 4) took 0.18 ms with a merge per
#: segment and 0.13 with these tiles; 1024 gave no more).  Each segment's
#: sums stay in the input's precision and are added in float64, so float32
#: variances keep their errors (2e-8 to 8e-8 relative over 2x2 to 14x14
#: pixels, mean 0 or 1e4); what the tile size bounds is how long a tile
#: keeps its center while the data drift.
SHORT_TILE = 256

#: Elements per tile of rows in the channels-last moments, where every tile
#: takes one pass (the first now and then two, see ``_rows_moments``):
#: large enough that the per-column float64 merge after each tile costs
#: little next to the tile's own sums.
ROW_TILE = 16384

#: Fewest rows per tile of the channels-last moments, however wide the
#: rows: the float64 merge after each tile costs about as much per column
#: as summing a few rows, so wide rows need tiles of many of them.  With
#: :data:`ROW_TILE` alone, rows of 4096 took tiles of 4 rows, and the
#: moments of ``(256, 4096)`` float32 (BatchNorm1d) took 0.43 ms over two
#: chunks (a copy: 0.12 to 0.15 ms); with tiles of at least 32 rows, 0.15.
MIN_TILE_ROWS = 32

# The kernels widen a value to float64 with np.float64(v), not float(v):
# Numba's float() returns a float32 as a float32, so float(a) + float(b)
# of two float32 values is a float32 sum.

# Columns of the per-(p, k) coefficient table used by the elementwise kernel.
COEF_MEAN, COEF_A, COEF_H, COEF_E, COEF_C = 0, 1, 2, 3, 4
N_COEF = 5

#: Division by zero gives inf / NaN as in NumPy (never an exception).
_inner = njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
#: As ``_inner``, inlined by Numba into every caller: the tile loops of
#: :func:`_segment_moments` ran about half as fast when called as a
#: separate function from :func:`_p_moments`, one call per LayerNorm row.
_inlined = njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy",
                inline="always")
#: As ``_inner``, compiled without reference counting (Numba's ``_nrt``
#: option off), for the loops that take a slice per row or segment: a
#: slice is then a pointer and a length.  With it, every slice calls
#: Numba's runtime twice, to add one to its parent's count and to take it
#: off again.  Inside a kernel's parallel loop the arrays come without a
#: counter (Numba's gufunc), so each call only finds none, but a call per
#: slice still cost as much as mapping a short row: the fused float16
#: LayerNorm forward over rows of 64 values took 1.71 ns a value that
#: way and 0.84 without, over rows of 1024 0.32 and 0.26 (one thread).
#: Such a function allocates nothing and returns no array (Numba refuses
#: to compile either without reference counting), and is called only
#: inside the kernels' parallel loops.
_uncounted = njit(cache=True, fastmath=FASTMATH, nogil=True,
                  error_model="numpy", _nrt=False)
_kernel = njit(cache=True, fastmath=FASTMATH, parallel=True, nogil=True,
               error_model="numpy")


_chan_merge = _inner(protocol.chan_merge)
_dx_coefficients = _inner(protocol.dx_coefficients)


@_inner
def _item_bounds(item, P, A, K, L, plan):
    """One item's ``p0, p1``, its other ranges ``r = (a0, a1, k0, k1, l0,
    l1)`` and the index of its chunk of the reduced extent."""
    p_per, _, k_per, n_kblk, a_per, n_ach, l_per, n_lch = plan
    l_chunk = item % n_lch
    rest = item // n_lch
    a_chunk = rest % n_ach
    rest //= n_ach
    k_block = rest % n_kblk
    p0 = rest // n_kblk * p_per
    a0 = a_chunk * a_per
    k0 = k_block * k_per
    l0 = l_chunk * l_per
    r = (a0, min(A, a0 + a_per), k0, min(K, k0 + k_per), l0,
         min(L, l0 + l_per))
    return p0, min(P, p0 + p_per), r, a_chunk * n_lch + l_chunk


@_inner
def _rows_style(A, B):
    """True where moments reduce across rows of ``K * J`` values (``B == 1``
    and ``A > 1``, the channels-last style): they then need per-column
    scratch."""
    return B == 1 and A > 1


@_inner
def _narrow_groups(J, B):
    """True where the elementwise map and the backward sums use per-column
    scratch (``B == 1`` and groups narrower than :data:`WIDE_GROUP`)."""
    return B == 1 and J < WIDE_GROUP


@_inner
def _n_items(plan):
    _, n_pblk, _, n_kblk, _, n_ach, _, n_lch = plan
    return n_pblk * n_kblk * n_ach * n_lch


@_inner
def _n_chunks(plan):
    _, _, _, _, _, n_ach, _, n_lch = plan
    return n_ach * n_lch


@_inner
def _column_range(r, J):
    """Columns ``[c0, c1)`` of a row of ``K * J`` values (``B == 1``)
    covered by the ranges ``r = (a0, a1, k0, k1, l0, l1)``: ``c0 = k0 * J +
    l0``, ``c1 = (k1 - 1) * J + l1``.

    With ``B == 1`` the plan splits offsets (``[l0, l1) != [0, J)``) only
    for ``K == 1`` and wide groups, and groups only where every row of them
    stays in the item, so the covered columns are one contiguous range.
    """
    return r[2] * J + r[4], (r[3] - 1) * J + r[5]


@_inlined
def _unsigned(c0, c1):
    """``c0, c1`` as unsigned integers, the bounds of loops over columns
    that may not start at 0.  Numba reads ``a[i]`` for a signed ``i``
    through a test for a negative index (counted from the end), which
    LLVM drops where ``i`` runs from 0 but not from a variable start,
    and then does not vectorise the loop: column sums over ``(64, 4096)``
    float32 rows took 223 us from a variable column, 22 from 0 or
    unsigned."""
    return np.uint64(c0), np.uint64(c1)


@_inlined
def _float64_sums(a, b):
    """``(sum(a), sum(b))`` in float64 of two 1-D vectors of one size,
    read from index 0: slices, not a signed range from a variable start,
    whose test for a negative index kept such a loop from vectorising
    (see ``_unsigned``)."""
    total_a = 0.0
    total_b = 0.0
    for i in range(a.size):
        total_a += np.float64(a[i])
        total_b += np.float64(b[i])
    return total_a, total_b


#: Values of the groups a fused kernel takes at once where groups are
#: segments (``B > 1``, see ``_group_step``) and those a fused forward
#: takes at once where each group is one run (``_item_step``).
GROUP_STEP_VALUES = 32768


@_inner
def _group_step(r, L, B):
    """How many groups of an item's ranges ``r`` (whole groups, segments of
    ``L`` values) a fused kernel takes at once: for segments (``B > 1``)
    as many as hold :data:`GROUP_STEP_VALUES` values, one at least, so that
    they stay in cache between their reduction and their elementwise pass
    (the item's groups together can exceed the L2 cache) while short
    segments are read in memory order, the block's segments of each ``a``
    one after the other, not each group's ``A`` segments a row apart; all
    of them otherwise (``B == 1``: rows of ``K * J`` values, which the
    kernels take whole)."""
    if B == 1:
        return max(1, r[3] - r[2])
    return max(1, GROUP_STEP_VALUES // ((r[1] - r[0]) * L))


@_inner
def _groups(r, k, step):
    """The ranges ``r`` restricted to the groups ``[k, k + step)``."""
    return (r[0], r[1], k, min(r[3], k + step), r[4], r[5])


# --------------------------------------------------------------------------
# moments
# --------------------------------------------------------------------------

def _cast_like(value, like):
    """``value`` converted to the type of ``like`` (usable inside kernels)."""
    return type(like)(value)


@overload(_cast_like)
def _cast_like_impl(value, like):
    target = like

    def impl(value, like):
        return target(value)
    return impl


@_inner
def _param(values, index, default):
    """Element ``index`` of per-column parameters read with ``load``, or
    ``default`` when ``values`` is empty (no parameter: no array of the
    parameters' size is made for it)."""
    if values.size == 0:
        return _cast_like(default, compute_zero(values))
    return load(values, index)


@_inner
def _param_defaults(gamma, beta):
    """The values of a missing scale and shift, stored as ``gamma`` and
    ``beta`` are (one dtype): a ``(2, TILE)`` array whose row 0 holds 1 and
    row 1 holds 0, from which :func:`_param_block` hands out blocks (no
    columns where both are given).  Made once per work item."""
    missing = gamma.size == 0 or beta.size == 0
    defaults = np.empty((2, TILE if missing else 0), gamma.dtype)
    ones = defaults[0]
    zeros = defaults[1]
    for i in range(ones.size):
        store(ones, i, 1.0)
        store(zeros, i, 0.0)
    return defaults


@_inlined
def _param_block(values, lo, hi, default):
    """Per-column parameters ``lo .. hi`` (at most :data:`TILE` of them
    where ``values`` is empty), never empty: ``values[lo:hi]``, or that
    many of the missing parameter's ``default`` (a row of
    :func:`_param_defaults`).

    The hot loops read them with ``load``, never behind the test of
    :func:`_param`: without AVX-512, a loop that reads 16-bit values
    behind a test is not vectorised (it would need masked 16-bit loads,
    which AVX2 lacks), and on an AMD Zen 3 the map of a float16
    LayerNorm over rows of 1024 took 2.0 ns a value that way against 0.4
    for float32, its backward 14 against 0.8.
    """
    if values.size == 0:
        return default[:hi - lo]
    return values[lo:hi]


@_inlined
def _param_step(gamma, beta, n):
    """Values per block in which :func:`_map_segment` takes a segment of
    ``n``: all at once where both parameters are given, else
    :data:`TILE` (the length of a default block)."""
    if gamma.size > 0 and beta.size > 0:
        return max(n, 1)
    return TILE


@_inner
def _tile_summary(n, center, s1, sq):
    """(mean, M2) of a tile from sums about a provisional ``center``:
    ``s1 = sum(x - center)`` and ``sq = sum((x - center)**2)`` (the corrected
    two-pass formulas; ``center`` close to the mean keeps them exact)."""
    s1 = np.float64(s1)
    return center + s1 / n, max(np.float64(sq) - s1 * s1 / n, 0.0)


#: Values at the head of a group's first tile whose mean centers its sums.
CENTER_HEAD = 16

#: Most share ``(sum d)**2 / n`` of ``sum d**2`` (``d`` the deviations of a
#: group's first tile from its center) that the tile's one pass keeps: its
#: M2, the difference of the two, is then at least a quarter of ``sum
#: d**2`` (at most two bits of it lost to the subtraction); above that
#: share the tile is summed again about its own mean.  Where a whole group
#: is one tile (LayerNorm and RMSNorm rows of up to :data:`TILE` values) the
#: forward then reads each row twice instead of three times: the float16
#: LayerNorm ``(8192, 1024)`` forward went from 1.44 to 1.46 ms to 1.26 to
#: 1.33 (old and new checkouts alternating, two runs each), where a
#: center pass over the whole tile came first.
MAX_SHIFT_SHARE = 0.75


@_inlined
def _segment_moments(x, start, stop, n, mean, m2):
    """``(count, mean, M2)`` of ``x[start:stop]`` merged into the running
    summary ``(n, mean, m2)`` (zeros for none yet).

    Tiles are summed in the input's precision about a provisional center,
    then merged in float64: the first tile of a summary about the mean of
    its first :data:`CENTER_HEAD` values (summed again about its own mean,
    in cache, when :data:`MAX_SHIFT_SHARE` says that center was far from
    it), every later one about the running mean, which is already close
    to the tile's mean, as in ``_rows_moments``.  A tile far from that
    center (data that drifts) loses only digits that are small next to the
    spread between tiles, which the float64 merge adds exactly.
    """
    zero = compute_zero(x)
    for t0 in range(start, stop, TILE):
        tile = x[t0:min(t0 + TILE, stop)]
        if n == 0.0:
            head = min(tile.size, CENTER_HEAD)
            total = zero
            for i in range(head):
                total += load(tile, i)
            center = _cast_like(np.float64(total) / head, zero)
        else:
            center = _cast_like(mean, zero)
        for attempt in range(2):
            s1 = zero
            sq = zero
            for i in range(tile.size):
                d = load(tile, i) - center
                s1 += d
                sq += d * d
            if attempt == 1 or n != 0.0 or np.float64(s1) * np.float64(s1) <= (
                    MAX_SHIFT_SHARE * tile.size) * np.float64(sq):
                break
            # the head's mean lay far from the tile's: sum again about the
            # tile's own mean, now known
            center = _cast_like(np.float64(center)
                                + np.float64(s1) / tile.size, zero)
        t_mean, t_m2 = _tile_summary(tile.size, float(center), s1, sq)
        n, mean, m2 = _chan_merge(n, mean, m2, float(tile.size), t_mean, t_m2)
    return n, mean, m2


#: Rows a column sum over a tile takes per step (see ``_column_sums``).
ROW_STEP = 8


@_inner
def _column_sums(tile, c0, c1, center, s1, sq):
    """``s1[c] += sum_r (tile[r, c] - center[c])`` and ``sq[c] += sum_r
    (tile[r, c] - center[c])**2`` over the rows of a 2-D ``tile``, for the
    columns ``c`` in ``[c0, c1)``.

    :data:`ROW_STEP` rows at a time: the sums of a column then wait on one
    addition through memory per eight rows, not per row, which is what
    bounds a row-by-row loop over narrow rows held in cache.  Eight rows
    rather than four: the moments of channels-last GroupNorm ``(32, 56, 56,
    64)`` float32 ran at the speed of the channels-first ones (Numba loop of
    this shape, both threads, median of 60: 529 us for eight rows, 835 for
    four), and no shape tried was slower.
    """
    n_rows = tile.shape[0]
    u0, u1 = _unsigned(c0, c1)
    whole = n_rows - n_rows % ROW_STEP
    for r in range(0, whole, ROW_STEP):
        for c in range(u0, u1):
            m = center[c]
            d0 = load(tile, (r, c)) - m
            d1 = load(tile, (r + 1, c)) - m
            d2 = load(tile, (r + 2, c)) - m
            d3 = load(tile, (r + 3, c)) - m
            d4 = load(tile, (r + 4, c)) - m
            d5 = load(tile, (r + 5, c)) - m
            d6 = load(tile, (r + 6, c)) - m
            d7 = load(tile, (r + 7, c)) - m
            s1[c] += ((d0 + d1) + (d2 + d3)) + ((d4 + d5) + (d6 + d7))
            sq[c] += (((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3))
                      + ((d4 * d4 + d5 * d5) + (d6 * d6 + d7 * d7)))
    for r in range(whole, n_rows):
        for c in range(u0, u1):
            d = load(tile, (r, c)) - center[c]
            s1[c] += d
            sq[c] += d * d


@_inner
def _rows_moments(rows, c0, c1, col_mean, col_m2, center, s1, sq):
    """Per-column (mean, M2) over the rows of a C-contiguous 2-D ``rows``,
    for the columns ``c`` in ``[c0, c1)`` (``col_mean[c]``, ...); returns
    the common count.

    Rows are taken in tiles of about :data:`ROW_TILE` elements and at
    least :data:`MIN_TILE_ROWS` rows, vectorised across columns
    (``center``, ``s1``, ``sq`` are per-column scratch in the input's
    dtype): sums of deviations from a provisional center and of their
    squares, then a float64 Chan merge into the running column summaries.
    The first tile's center is the mean of its first :data:`ROW_STEP`
    rows, and the tile is summed again about its own mean, in cache, when
    some column's center lay far from it (:data:`MAX_SHIFT_SHARE`, as in
    :func:`_segment_moments`); every later tile's center is the running
    column mean of the tiles before it, which is already close to the
    tile's mean, so one pass suffices.  A tile far from that center (data
    that drifts along the rows) loses only digits that are small next to
    the spread between tiles, which the float64 merge adds exactly.
    """
    n_rows = rows.shape[0]
    u0, u1 = _unsigned(c0, c1)
    rows_per_tile = max(MIN_TILE_ROWS, ROW_TILE // (c1 - c0))
    n = 0.0
    for r0 in range(0, n_rows, rows_per_tile):
        tile = rows[r0:min(r0 + rows_per_tile, n_rows)]
        nt = tile.shape[0]
        if n == 0.0:
            head = tile[:min(nt, ROW_STEP)]
            center[c0:c1] = 0.0
            s1[c0:c1] = 0.0
            _column_sums(head, c0, c1, center, s1, sq)  # sq: unused
            for c in range(u0, u1):
                center[c] = _cast_like(float(s1[c]) / head.shape[0], center[c])
        else:
            for c in range(u0, u1):
                center[c] = _cast_like(col_mean[c], center[c])
        for attempt in range(2):
            s1[c0:c1] = 0.0
            sq[c0:c1] = 0.0
            _column_sums(tile, c0, c1, center, s1, sq)
            if attempt == 1 or n != 0.0 or _centers_near(s1[c0:c1],
                                                          sq[c0:c1], nt):
                break
            # some column's head mean lay far from its tile mean: sum the
            # tile again about its own means, now known
            for c in range(u0, u1):
                center[c] = _cast_like(float(center[c]) + float(s1[c]) / nt,
                                       center[c])
        frac = nt / (n + nt)
        for c in range(u0, u1):
            t_mean, t_m2 = _tile_summary(nt, float(center[c]), s1[c], sq[c])
            if n == 0.0:
                col_mean[c] = t_mean
                col_m2[c] = t_m2
            else:
                delta = t_mean - col_mean[c]
                col_mean[c] += delta * frac
                col_m2[c] += t_m2 + delta * delta * n * frac
        n += nt
    return n


@_inner
def _centers_near(s1, sq, n):
    """Whether every column's sums about its center keep its M2 to within
    two bits (``s1**2 <= MAX_SHIFT_SHARE * n * sq``, see
    :data:`MAX_SHIFT_SHARE`); NaN sums count as near (summing again would
    not change them)."""
    for c in range(s1.size):
        d = np.float64(s1[c])
        if d * d > (MAX_SHIFT_SHARE * n) * np.float64(sq[c]):
            return False
    return True


@_inlined
def _row_block(x, p, a0, a1, A, width):
    """Rows ``a0 .. a1`` of sample ``p`` as a C-contiguous 2-D view."""
    return x[(p * A + a0) * width:(p * A + a1) * width].reshape(a1 - a0, width)


@_inner
def _p_moments(x, p, r, A, K, J, B, out_n, out_mean, out_m2, scratch):
    """(count, mean, M2) per group ``k`` in ``[k0, k1)`` of one ``p`` over
    ``a`` in ``[a0, a1)`` and segment offsets ``[l0, l1)`` (``r``); written
    to ``out_*[k]``.  ``scratch`` holds at least ``2 * K * J`` float64
    values.
    """
    a0, a1, k0, k1, l0, l1 = r
    L = J * B
    if B == 1 and A > 1:
        # Channels-last style: rows of K*J values, reduce across rows the
        # columns of the ranges.
        width = K * J
        c0, c1 = _column_range(r, J)
        col_mean = scratch[:width]
        col_m2 = scratch[width:2 * width]
        n = _rows_moments(_row_block(x, p, a0, a1, A, width), c0, c1,
                          col_mean, col_m2, compute_empty(x, width),
                          compute_empty(x, width), compute_empty(x, width))
        for k in range(k0, k1):
            gn, gmean, gm2 = 0.0, 0.0, 0.0
            for j in range(k * J + l0, k * J + l1):
                gn, gmean, gm2 = _chan_merge(gn, gmean, gm2, n, col_mean[j],
                                             col_m2[j])
            out_n[k], out_mean[k], out_m2[k] = gn, gmean, gm2
        return
    out_n[k0:k1] = 0.0
    out_mean[k0:k1] = 0.0
    out_m2[k0:k1] = 0.0
    # a group of one segment (A == 1) takes the loop below, whatever its
    # length: _segment_moments, as the fused forward's _step_moments
    if A > 1 and 2 * (l1 - l0) <= SHORT_TILE:
        if l0 == 0 and l1 == L and a1 - a0 >= ROW_STEP:
            _segment_rows_moments(x, p, r, A, K, L, out_n, out_mean, out_m2)
        else:
            _short_segment_moments(x, p, r, A, K, L, out_n, out_mean, out_m2)
        return
    for a in range(a0, a1):
        for k in range(k0, k1):
            start = ((p * A + a) * K + k) * L
            out_n[k], out_mean[k], out_m2[k] = _segment_moments(
                x, start + l0, start + l1, out_n[k], out_mean[k], out_m2[k])


@_inner
def _short_segment_moments(x, p, r, A, K, L, out_n, out_mean, out_m2):
    """:func:`_p_moments` of segments of at most ``SHORT_TILE / 2``
    values, several to a group (``A > 1``: channels-first BatchNorm over a
    small spatial extent), where :func:`_segment_rows_moments` does not
    apply (fewer than :data:`ROW_STEP` rows, or parts of segments).  A
    group of one segment takes :func:`_segment_moments` instead, as the
    fused forward does: per LayerNorm row of 64 values this function's
    setup (four arrays) made ``engine.moments`` over ``(262144, 64)``
    take twice as long.  A tile
    of group ``k`` gathers its segments of consecutive ``a``, up to
    :data:`SHORT_TILE` values, about one center; each segment is summed in
    the input's precision, its sums added in float64, and the tile merged
    once, where a tile per segment spent most of its time in the merges.
    The segments are read in memory order (``a``, then ``k``), each
    group's open tile kept in per-group sums.  A group's first tile is
    centered on its first segment's mean, every later one on the running
    mean, as in :func:`_segment_moments`."""
    a0, a1, k0, k1, l0, l1 = r
    width = l1 - l0
    zero = compute_zero(x)
    center = compute_empty(x, K)
    s1 = np.empty(K)
    sq = np.empty(K)
    count = np.zeros(K, np.int64)
    for a in range(a0, a1):
        for k in range(k0, k1):
            lo = ((p * A + a) * K + k) * L + l0
            seg = x[lo:lo + width]
            if count[k] == 0:
                if out_n[k] == 0.0:
                    total = zero
                    for i in range(width):
                        total += load(seg, i)
                    center[k] = _cast_like(float(total) / width, zero)
                else:
                    center[k] = _cast_like(out_mean[k], zero)
                s1[k] = 0.0
                sq[k] = 0.0
            c = center[k]
            t1 = zero
            t2 = zero
            for i in range(width):
                d = load(seg, i) - c
                t1 += d
                t2 += d * d
            s1[k] += np.float64(t1)
            sq[k] += np.float64(t2)
            count[k] += width
            if count[k] + width > SHORT_TILE or a == a1 - 1:
                t_mean, t_m2 = _tile_summary(count[k], float(c), s1[k], sq[k])
                out_n[k], out_mean[k], out_m2[k] = _chan_merge(
                    out_n[k], out_mean[k], out_m2[k], float(count[k]), t_mean,
                    t_m2)
                count[k] = 0


#: Rows per tile of ``_segment_rows_moments``: each column sums this
#: many deviations in the input's precision, and each tile ends in a
#: float64 fold of its columns and a merge per group, then a new center.
#: ``engine.moments`` over float32 ``(32, 160, 7, 7)`` on one thread, in
#: cache (a scratch script, medians of 61): 0.37 ns a value a segment at
#: a time, 0.30 in tiles of 8 rows, 0.22 of 16 and 0.21 of 32; the
#: largest relative error of the variances of ``(32, 2048, 7, 7)`` drawn
#: about 1e4 with spread 1 against float64 was 7.3e-8 a segment at a
#: time, 1.0e-8 in tiles of 8 rows, 6.9e-8 of 16 and 2.6e-7 of 32.
SEGMENT_TILE_ROWS = 16


@_inner
def _segment_rows_moments(x, p, r, A, K, L, out_n, out_mean, out_m2):
    """:func:`_p_moments` of whole short segments (``B > 1``, ``L <=
    SHORT_TILE / 2``) over at least :data:`ROW_STEP` rows ``a``, read as
    rows: for each ``a`` the segments of groups ``k0 .. k1`` are one
    contiguous run of ``(k1 - k0) * L`` values, and each column of those
    runs is summed down tiles of :data:`SEGMENT_TILE_ROWS` rows,
    :data:`ROW_STEP` at a time (deviations from its group's center, in
    the input's precision; each row read as a slice of its own, which
    vectorises where a strided 2-D view did not).  Each tile of rows is
    folded per group in float64 and merged into the group's summary, and
    the next tile is centered on the running mean, as
    :func:`_short_segment_moments` does with its tiles; a group's first
    tile is centered on the mean of its first segment.  Summing a segment
    at a time paid a loop's setup, its remainder and two horizontal sums
    for every few dozen values.

    Each group's fold sums slices of its columns (``_float64_sums``):
    from a signed start (``range(lo, lo + L)``) the two float64 sums did
    not vectorise.  Old and new checkouts in one process,
    alternating (medians of 51, three rounds, an unchanged copy within
    0.97 to 1.05), new over old time of the BatchNorm forward: ``(32,
    512, 7, 7)`` float32 0.93 to 0.96, ``(64, 256, 8, 8)`` 0.87 to 0.93,
    ``(256, 64, 4, 4)`` 0.90 to 0.95, ``(32, 1024, 7, 7)`` float16 0.84
    to 0.87; the outputs were the same bits."""
    a0, a1, k0, k1, _, _ = r
    width = (k1 - k0) * L
    stride = K * L
    zero = compute_zero(x)
    center = compute_empty(x, width)
    s1 = compute_empty(x, width)
    sq = compute_empty(x, width)
    for k in range(k0, k1):
        if out_n[k] == 0.0:
            lo = ((p * A + a0) * K + k) * L
            total = zero
            for i in range(L):
                total += load(x, lo + i)
            c = _cast_like(np.float64(total) / L, zero)
        else:
            c = _cast_like(out_mean[k], zero)
        center[(k - k0) * L:(k - k0 + 1) * L] = c
    for t0 in range(a0, a1, SEGMENT_TILE_ROWS):
        t1 = min(t0 + SEGMENT_TILE_ROWS, a1)
        s1[:] = zero
        sq[:] = zero
        whole = t0 + (t1 - t0) // ROW_STEP * ROW_STEP
        for b0 in range(t0, whole, ROW_STEP):
            first = ((p * A + b0) * K + k0) * L
            x0 = x[first:first + width]
            x1 = x[first + stride:first + stride + width]
            x2 = x[first + 2 * stride:first + 2 * stride + width]
            x3 = x[first + 3 * stride:first + 3 * stride + width]
            x4 = x[first + 4 * stride:first + 4 * stride + width]
            x5 = x[first + 5 * stride:first + 5 * stride + width]
            x6 = x[first + 6 * stride:first + 6 * stride + width]
            x7 = x[first + 7 * stride:first + 7 * stride + width]
            for i in range(width):
                m = center[i]
                d0 = load(x0, i) - m
                d1 = load(x1, i) - m
                d2 = load(x2, i) - m
                d3 = load(x3, i) - m
                d4 = load(x4, i) - m
                d5 = load(x5, i) - m
                d6 = load(x6, i) - m
                d7 = load(x7, i) - m
                s1[i] += ((d0 + d1) + (d2 + d3)) + ((d4 + d5) + (d6 + d7))
                sq[i] += (((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3))
                          + ((d4 * d4 + d5 * d5) + (d6 * d6 + d7 * d7)))
        for a in range(whole, t1):
            start = ((p * A + a) * K + k0) * L
            row = x[start:start + width]
            for i in range(width):
                d = load(row, i) - center[i]
                s1[i] += d
                sq[i] += d * d
        n_tile = np.float64((t1 - t0) * L)
        for k in range(k0, k1):
            lo = (k - k0) * L
            g1, g2 = _float64_sums(s1[lo:lo + L], sq[lo:lo + L])
            t_mean, t_m2 = _tile_summary(n_tile, np.float64(center[lo]), g1,
                                         g2)
            out_n[k], out_mean[k], out_m2[k] = _chan_merge(
                out_n[k], out_mean[k], out_m2[k], n_tile, t_mean, t_m2)
            center[lo:lo + L] = _cast_like(out_mean[k], zero)


@_kernel
def moments_kernel(x, P, A, K, J, B, plan, part):
    """Partial moments ``part[p, chunk, k] = (count, mean, M2)`` for every
    item of ``plan``."""
    L = J * B
    for item in prange(_n_items(plan)):
        p0, p1, r, chunk = _item_bounds(item, P, A, K, L, plan)
        scratch = np.empty(2 * K * J if _rows_style(A, B) else 0)
        for p in range(p0, p1):
            summary = part[p, chunk]
            _p_moments(x, p, r, A, K, J, B, summary[:, 0], summary[:, 1],
                       summary[:, 2], scratch)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _merge(part, centered):
    """Merge partials ``(P, chunks, K, 3)`` in chunk order into ``(mean,
    var)`` of shape ``(P, K)``; ``var`` is the biased variance M2 / n (the
    mean square ``var + mean**2``, and mean 0, when not ``centered``); both
    are NaN for a group of no values.

    Chunk by chunk, every group of a ``p`` at once: each group's merges
    keep their order, and the groups' merges, independent of each other,
    overlap in the processor instead of each waiting on the division of
    the one before (group by group, the merge of BatchNorm1d's eight
    chunks over ``(256, 1024)`` took 27 us, chunk by chunk 17).
    """
    P, n_chunks, K, _ = part.shape
    mean = np.zeros((P, K))
    var = np.zeros((P, K))
    count = np.empty(K)
    for p in range(P):
        m = mean[p]
        m2 = var[p]
        count[:] = 0.0
        for ch in range(n_chunks):
            for k in range(K):
                count[k], m[k], m2[k] = _chan_merge(
                    count[k], m[k], m2[k], part[p, ch, k, 0],
                    part[p, ch, k, 1], part[p, ch, k, 2])
        for k in range(K):
            if count[k] == 0.0:  # an empty group: no statistics (as np.mean)
                m[k] = np.nan
                m2[k] = np.nan
            else:
                m[k], m2[k] = _statistics(count[k], m[k], m2[k], centered)
    return mean, var


@_inlined
def _statistics(n, mean, m2, centered):
    """The ``(mean, var)`` a forward normalizes with, from a group's
    ``(count, mean, M2)``: the mean and the biased variance ``M2 / n``, or,
    when not ``centered``, 0 and the mean square ``M2 / n + mean**2``
    (NaN where an infinite value leaves ``M2`` NaN: see
    ``_plain_mean_square``)."""
    if centered:
        return mean, m2 / n
    return 0.0, m2 / n + mean * mean


@_inner
def _plain_mean_square(x, p, k, A, K, J, B):
    """``mean(x**2)`` over group ``(p, k)``, summed plainly in float64: the
    mean square where the moments' ``(mean, M2)`` gave NaN, which an
    infinite value does (the fused forward and :func:`moments_of` call it
    there alone, a second pass over that group).

    It is +inf for an infinite value and NaN only where the group holds a
    NaN, as ``mean(x**2)`` is in the float64 reference and in PyTorch's
    ``rms_norm``: such a group then normalizes by ``rstd = 0``, its finite
    values to the bias and an infinite one to NaN, not to NaN throughout.
    (Squares past the range of the tile sums, float32 values beyond about
    1.8e19, leave the moments' mean square infinite, and so ``rstd = 0``,
    as PyTorch's float32 sums do.)"""
    L = J * B
    total = 0.0
    for a in range(A):
        start = ((p * A + a) * K + k) * L
        for i in range(start, start + L):
            value = np.float64(load(x, i))
            total += value * value
    return total / (A * L)


# --------------------------------------------------------------------------
# elementwise: out = (x - m) * (a*g + h) + dy * (e*g) + (beta + c)
# --------------------------------------------------------------------------

@_inner
def _coefficients(coef, k):
    """``(m, a, h, e, c)`` of group ``k`` from a coefficient table."""
    return (coef[k, COEF_MEAN], coef[k, COEF_A], coef[k, COEF_H],
            coef[k, COEF_E], coef[k, COEF_C])


@_uncounted
def _p_apply(x, dy, out, use_dy, p, r, A, K, J, B, coef, gamma, beta,
             scratch, defaults):
    """Elementwise map for one ``p`` over the ranges ``r = (a0, a1, k0, k1,
    l0, l1)``.

    With per-(p, k) coefficients ``coef[k] = (m, a, h, e, c)`` (float64) and
    per-(k, j) ``gamma``, ``beta``::

        out = (x - m) * (a * gamma + h) + dy * (e * gamma) + (beta + c)

    (the ``dy`` term only when ``use_dy``).  The forward pass is
    ``a = rstd`` (``h = e = c = 0``); the backward pass is ``a = 0`` and
    ``beta = 0`` with ``h, e, c`` from the group sums.

    Arithmetic runs in the input's precision, which vectorises twice as wide
    for float32, without the cancellation that a large mean would cause:
    ``m`` is split into ``mc``, ``m`` rounded to that precision (so
    ``x - mc`` is exact where it matters), and the remainder ``m - mc``,
    which is folded into the constant term in float64::

        out = (x - mc) * sx + dy * sd + s0,
        sx = a*gamma + h,  sd = e*gamma,  s0 = beta + c - (m - mc) * sx

    ``gamma`` and ``beta`` are read with ``_param`` (empty: 1 and 0), or
    along wide groups in blocks of :func:`_param_block` (``defaults`` from
    :func:`_param_defaults`); ``scratch`` has the compute dtype and
    :func:`_map_scratch`'s size.  Compiled without reference counting
    (``_uncounted``): every segment is a slice.
    """
    a0, a1, k0, k1, l0, l1 = r
    L = J * B
    if B == 1 and J >= WIDE_GROUP:
        # Wide groups: per-k scalars, gamma and beta read along the row.
        width = K * J
        c0, c1 = _column_range(r, J)
        for k in range(k0, k1):
            lo = max(c0, k * J)
            hi = min(c1, (k + 1) * J)
            m, a_k, h, e, c = _coefficients(coef, k)
            mc, a_x, h_x, e_x, q_x, w_x = _wide_coefficients(
                m, a_k, h, e, c, compute_zero(x))
            gs = gamma[lo:hi]
            bs = beta[lo:hi]
            for row in range(p * A + a0, p * A + a1):
                start = row * width
                _map_segment(x[start + lo:start + hi], dy[start + lo:start + hi],
                             out[start + lo:start + hi], use_dy, gs, bs,
                             mc, a_x, h_x, e_x, q_x, w_x, defaults)
        return
    if B == 1:
        # Narrow groups: per-column coefficient vectors for this p, over
        # the columns of groups k0 .. k1 (whole rows, or every row's part).
        width = K * J
        c0, c1 = k0 * J, k1 * J
        mc_c = scratch[:width]
        sx_c = scratch[width:2 * width]
        sd_c = scratch[2 * width:3 * width]
        s0_c = scratch[3 * width:4 * width]
        # one loop over the columns, group k's coefficients read where its
        # columns start: a loop per group was a loop of one column per
        # group for BatchNorm (J == 1), whose setup cost more than the
        # column (4096 columns: 12.9 us, now 9.3); column c0 + i at i of
        # slices from c0 (an index from 0, see _unsigned)
        mc_b, sx_b = mc_c[c0:c1], sx_c[c0:c1]
        sd_b, s0_b = sd_c[c0:c1], s0_c[c0:c1]
        gs, bs = gamma[c0:c1], beta[c0:c1]
        k = k0
        end = J
        m, a_k, h, e, c = _coefficients(coef, k)
        mc = _cast_like(m, compute_zero(x))
        for i in range(c1 - c0):
            if i == end:
                k += 1
                end += J
                m, a_k, h, e, c = _coefficients(coef, k)
                mc = _cast_like(m, compute_zero(x))
            mc_b[i] = mc
            sx_b[i], sd_b[i], s0_b[i] = _column_coefficients(
                m, a_k, h, e, c, _param(gs, i, 1.0), _param(bs, i, 0.0), mc)
        if _streams(out, c0, c1, width):
            _stream_rows(x, dy, out, use_dy, p, a0, a1, A, width, scratch)
            return
        x2 = _row_block(x, p, a0, a1, A, width)
        o2 = _row_block(out, p, a0, a1, A, width)
        u0, u1 = _unsigned(c0, c1)
        if use_dy:
            d2 = _row_block(dy, p, a0, a1, A, width)
            for row in range(x2.shape[0]):
                for col in range(u0, u1):
                    store(o2, (row, col),
                          (load(x2, (row, col)) - mc_c[col]) * sx_c[col]
                          + load(d2, (row, col)) * sd_c[col] + s0_c[col])
        else:
            for row in range(x2.shape[0]):
                for col in range(u0, u1):
                    store(o2, (row, col),
                          (load(x2, (row, col)) - mc_c[col]) * sx_c[col] + s0_c[col])
        return
    if l0 == 0 and l1 == L and 2 * L <= TILE and (
            (k1 - k0) * L <= SHORT_MAP_VALUES
            or (L < BLOCK_MAP_SEGMENT and L < 2 * (a1 - a0))):
        # whole short groups, a block of at most SHORT_MAP_VALUES values
        # per row at a time
        step = max(1, SHORT_MAP_VALUES // L)
        for first in range(k0, k1, step):
            _map_block_rows(x, dy, out, use_dy, p, _groups(r, first, step), A,
                            K, J, B, coef, gamma, beta, scratch)
        return
    _map_rows_of_segments(x, dy, out, use_dy, p, r, A, K, J, B, coef, gamma,
                          beta, scratch)


#: Outputs of at least this many bytes are written by the narrow-groups
#: map and by the fused forward over rows (``_map_streamed``) with
#: streaming stores (:func:`~normkit.backend.storage.stream`):
#: half the L3 cache of the machines measured, beyond which the output
#: goes on to memory anyway.
STREAM_BYTES = 16 * 2 ** 20

#: Shortest row, in bytes, that the fused forward streams out
#: (``_map_streamed``): LayerNorm over float32 rows of 256 values
#: streamed took 0.88 to 0.90 of the time of ordinary stores, over rows
#: of 64 (256 bytes, most of them in lines shared with the neighbouring
#: rows, copied the ordinary way) 1.26 to 1.29.
STREAM_SEGMENT_BYTES = 1024

#: Values that the narrow-groups map (whole rows, of the compute type)
#: and the fused forward over rows (a block of a row, of the output's
#: type) compute into scratch before they stream them out: 2 KiB of
#: float32.  Blocks of 2048 values made the map alone over float32
#: LayerNorm rows of 4096 to 65536 values 1.07 to 1.22 times as slow as
#: ordinary stores (its input, parameters and scratch filled the L1
#: cache), blocks of 512 0.98 to 1.13.
STREAM_VALUES = 512


@_inlined
def _large_output(out):
    """Whether ``out`` may be written with streaming stores: float32 or
    float64 (stored in the compute type) of at least
    :data:`STREAM_BYTES`."""
    return out.itemsize >= 4 and out.size * out.itemsize >= STREAM_BYTES


@_inlined
def _streams(out, c0, c1, width):
    """Whether the narrow-groups map of :func:`_p_apply` streams its rows
    out (:func:`_stream_rows`): a :func:`_large_output` mapped in whole
    rows of at most :data:`STREAM_VALUES`."""
    return (_large_output(out)
            and c0 == 0 and c1 == width and width <= STREAM_VALUES)


@_inlined
def _stream_rows(x, dy, out, use_dy, p, a0, a1, A, width, scratch):
    """The narrow-groups map of :func:`_p_apply` over whole rows ``a0 ..
    a1`` of ``p``, with the per-column coefficients in the first four
    vectors of ``scratch``: as many rows as fit in its last
    :data:`STREAM_VALUES` values are computed there, then written out by
    :func:`~normkit.backend.storage.stream`, a block of consecutive rows
    at a time, and the stores fenced once at the end.

    Over float32 ``(32, 56, 56, 64)`` channels last (25.7 MB), against
    ordinary stores (the engine alone, both threads, same arrays, medians
    of 15, five rounds; an unchanged copy of the old code 0.93 to 1.13):
    BatchNorm's forward 0.86 to 0.96 of the time, its map alone 0.79 to
    0.92, its backward 0.86 to 0.94; GroupNorm's forward 0.84 to 0.89,
    map 0.79 to 0.88, backward 0.81 to 0.93.  Larger blocks did no
    better: 1024 and 2048 values gave BatchNorm's map 0.82 to 1.24 of the
    old time over three rounds, 4096 1.09 to 1.21, and a fence after each
    block of 4096 made every map 1.1 to 1.3 times slower."""
    mc_c = scratch[:width]
    sx_c = scratch[width:2 * width]
    sd_c = scratch[2 * width:3 * width]
    s0_c = scratch[3 * width:4 * width]
    rows = STREAM_VALUES // width
    buffer = scratch[4 * width:4 * width + rows * width]
    for r0 in range(a0, a1, rows):
        n = min(a1 - r0, rows)
        start = (p * A + r0) * width
        for row in range(n):
            lo = start + row * width
            xs = x[lo:lo + width]
            bs = buffer[row * width:(row + 1) * width]
            if use_dy:
                ds = dy[lo:lo + width]
                for col in range(width):
                    bs[col] = ((load(xs, col) - mc_c[col]) * sx_c[col]
                               + load(ds, col) * sd_c[col] + s0_c[col])
            else:
                for col in range(width):
                    bs[col] = (load(xs, col) - mc_c[col]) * sx_c[col] + s0_c[col]
        stream(out[start:start + n * width], buffer[:n * width])
    stream_fence()


#: Most values per row of a block of whole short groups that
#: ``_map_block_rows`` maps with per-value coefficient vectors.
SHORT_MAP_VALUES = 4096

#: Segments shorter than this are mapped in blocks of whole groups
#: (``_map_block_rows``, :data:`SHORT_MAP_VALUES` values per row at a
#: time) also where an item's groups make longer rows, if the item has
#: more than half as many rows as a segment has values: the per-value
#: coefficient vectors are filled once per block and read by every row,
#: where a group at a time paid a loop's setup and remainder for each
#: segment.  ``python benchmarks/passes.py --segments`` (the map alone,
#: one thread, ns a value), old and new alternating, two runs each: ``A =
#: 32`` and ``64`` rows of ``L = 9`` to ``49`` took 0.99 to 1.85 before
#: and 0.49 to 0.53 after, ``A = 16`` of ``L = 9`` to ``25`` 1.06 to 1.54
#: and 0.52 to 0.60, ``A = 8`` of ``L = 9`` 0.77 to 0.78 and 0.69 to 0.70.
#: BatchNorm's inference forward over ``(32, 2048, 7, 7)`` float32 (both
#: threads, a scratch script, alternating three times) went from 1.6 to
#: 1.8 ms to 0.8 to 0.9.  Blocks were slower elsewhere: ``A =
#: 8`` of ``L = 16`` in blocks took 0.65 where a group at a time took
#: 0.50, and, each cell timed alone (a scratch sweep), segments of 64
#: values and more 0.56 to 0.91 times as fast; those stay a group at a
#: time.
BLOCK_MAP_SEGMENT = 64


@_uncounted
def _map_block_rows(x, dy, out, use_dy, p, r, A, K, J, B, coef, gamma,
                    beta, scratch):
    """The map of :func:`_p_apply` over whole groups ``k0 .. k1`` of short
    segments (``B > 1``, ``L <= TILE / 2``) whose values for one ``a`` are
    a row of at most :data:`SHORT_MAP_VALUES`: the coefficients of
    :func:`_map_group` spread once into vectors of the row's length, then
    each row of the block mapped in one loop in memory order, where a
    group at a time took its segments a row apart, a few dozen values each
    (channels-first BatchNorm over a few pixels).  The vectors are parts of
    ``scratch`` (:func:`_map_scratch`)."""
    a0, a1, k0, k1, _, _ = r
    L = J * B
    width = (k1 - k0) * L
    zero = compute_zero(x)
    mc_v = scratch[:width]
    sx_v = scratch[width:2 * width]
    sd_v = scratch[2 * width:3 * width]
    s0_v = scratch[3 * width:4 * width]
    for k in range(k0, k1):
        m, a_k, h, e, c = _coefficients(coef, k)
        mc = _cast_like(m, zero)
        for j in range(J):
            col = k * J + j
            sx, sd, s0 = _column_coefficients(m, a_k, h, e, c,
                                              _param(gamma, col, 1.0),
                                              _param(beta, col, 0.0), mc)
            lo = (k - k0) * L + j * B
            mc_v[lo:lo + B] = mc
            sx_v[lo:lo + B] = sx
            sd_v[lo:lo + B] = sd
            s0_v[lo:lo + B] = s0
    for a in range(a0, a1):
        start = ((p * A + a) * K + k0) * L
        xs = x[start:start + width]
        os = out[start:start + width]
        if use_dy:
            ds = dy[start:start + width]
            for i in range(width):
                store(os, i, (load(xs, i) - mc_v[i]) * sx_v[i]
                      + load(ds, i) * sd_v[i] + s0_v[i])
        else:
            for i in range(width):
                store(os, i, (load(xs, i) - mc_v[i]) * sx_v[i] + s0_v[i])


@_inlined
def _column_coefficients(m, a_k, h, e, c, g, b, mc):
    """``(sx, sd, s0)`` of one column of :func:`_p_apply`'s map in the
    type of ``mc`` (the group's ``m`` rounded), from the group's float64
    ``(m, a, h, e, c)`` and the column's ``gamma`` and ``beta``: ``sx = a
    * g + h``, ``sd = e * g``, ``s0 = b + c - (m - mc) * sx``."""
    sx = a_k * g + h
    return (_cast_like(sx, mc), _cast_like(e * g, mc),
            _cast_like(b + c - (m - float(mc)) * sx, mc))


@_inlined
def _map_run(xs, ds, os, use_dy, mc, sx, sd, s0):
    """``os = (xs - mc) * sx + ds * sd + s0`` along one contiguous run (the
    ``ds`` term only when ``use_dy``)."""
    if use_dy:
        for i in range(xs.size):
            store(os, i, (load(xs, i) - mc) * sx + load(ds, i) * sd + s0)
    else:
        for i in range(xs.size):
            store(os, i, (load(xs, i) - mc) * sx + s0)


@_inlined
def _map_group(x, dy, out, use_dy, p, r, A, K, J, B, k, m, a_k, h, e, c,
               gamma, beta):
    """The map over group ``k`` of one ``p`` in the ranges ``r`` for
    segments (``B > 1``, :func:`_runs_map`'s groups, each one run where
    ``A == 1``): each channel ``j``'s values with
    its own scalar coefficients (:func:`_column_coefficients`), from the
    group's float64 ``(m, a, h, e, c)``."""
    a0, a1, _, _, l0, l1 = r
    L = J * B
    mc = _cast_like(m, compute_zero(x))
    for j in range(l0 // B, (l1 - 1) // B + 1):
        col = k * J + j
        sx, sd, s0 = _column_coefficients(m, a_k, h, e, c,
                                          _param(gamma, col, 1.0),
                                          _param(beta, col, 0.0), mc)
        for a in range(a0, a1):
            seg = ((p * A + a) * K + k) * L
            lo = seg + max(l0, j * B)
            hi = seg + min(l1, (j + 1) * B)
            _map_run(x[lo:hi], dy[lo:hi], out[lo:hi], use_dy, mc, sx, sd, s0)


@_uncounted
def _map_rows_of_segments(x, dy, out, use_dy, p, r, A, K, J, B, coef, gamma,
                          beta, scratch):
    """The map of :func:`_p_apply` over segments (``B > 1``) taken a
    segment at a time: row by row, in memory order, with each column's
    scalar coefficients made once into four vectors of ``scratch``
    (:func:`_map_scratch`).  A group at a time (:func:`_map_group`)
    read a chunk of whole samples one segment every ``K * L`` values, as
    many times as it has groups: channels-first BatchNorm's map over
    ``(4096, 3, 64, 64)`` float32 took 16.2 ms that way on two threads,
    where a plain map in memory order took 11.9.  Old (a group at a time)
    and new checkouts in one process, alternating (medians of 7 to 15,
    three rounds, Zen 4), new over old time of the training forward, then
    forward and backward: ``(4096, 3, 64, 64)`` 0.75 to 0.83 and 0.78 to
    0.86; ``(32, 64, 56, 56)`` float32 0.78 to 0.92 and 0.93 to 1.01,
    float16 0.73 to 0.99 and 0.81 to 0.89, bfloat16 0.84 to 1.06 and 0.76
    to 0.97; Batch Renormalization there 0.82 to 0.93 and 0.94 to 0.97,
    Ghost BatchNorm 0.83 to 0.99 and 0.91 to 1.01; cells that do not take
    this map (channels-last, short segments, GroupNorm, InstanceNorm)
    0.96 to 1.06."""
    a0, a1, k0, k1, l0, l1 = r
    L = J * B
    j0, j1 = l0 // B, (l1 - 1) // B + 1
    width = (k1 - k0) * J
    mc_c = scratch[:width]
    sx_c = scratch[width:2 * width]
    sd_c = scratch[2 * width:3 * width]
    s0_c = scratch[3 * width:4 * width]
    zero = compute_zero(x)
    for k in range(k0, k1):
        m, a_k, h, e, c = _coefficients(coef, k)
        mc = _cast_like(m, zero)
        for j in range(j0, j1):
            col = k * J + j
            i = (k - k0) * J + j
            mc_c[i] = mc
            sx_c[i], sd_c[i], s0_c[i] = _column_coefficients(
                m, a_k, h, e, c, _param(gamma, col, 1.0),
                _param(beta, col, 0.0), mc)
    for a in range(a0, a1):
        for k in range(k0, k1):
            seg = ((p * A + a) * K + k) * L
            for j in range(j0, j1):
                i = (k - k0) * J + j
                lo = seg + max(l0, j * B)
                hi = seg + min(l1, (j + 1) * B)
                _map_run(x[lo:hi], dy[lo:hi], out[lo:hi], use_dy, mc_c[i],
                         sx_c[i], sd_c[i], s0_c[i])


@_inlined
def _wide_coefficients(m, a, h, e, c, zero):
    """The coefficients of :func:`_map_segment` in the compute type of
    ``zero``, from a group's float64 ``(m, a, h, e, c)`` (see
    :func:`_p_apply`): ``mc`` (``m`` rounded), ``a``, ``h``, ``e``, and
    ``q = -(m - mc) * a``, ``w = c - (m - mc) * h``, with which the constant
    term ``beta + c - (m - mc) * (a * gamma + h)`` is ``beta + q * gamma +
    w``."""
    mc = _cast_like(m, zero)
    rest = m - float(mc)
    return (mc, _cast_like(a, mc), _cast_like(h, mc), _cast_like(e, mc),
            _cast_like(-rest * a, mc), _cast_like(c - rest * h, mc))


@_inlined
def _map_segment(xs, ds, os, use_dy, gs, bs, mc, a, h, e, q, w, defaults):
    """``os = (xs - mc) * (a * g + h) + ds * (e * g) + (b + q * g + w)``
    along one contiguous segment of a wide group, with ``g`` and ``b`` the
    segment's ``gs`` and ``bs`` (empty: 1 and 0, in blocks of ``defaults``,
    :func:`_param_block`) and the ``ds`` term only when ``use_dy``."""
    n = xs.size
    step = _param_step(gs, bs, n)
    for b0 in range(0, n, step):
        b1 = min(b0 + step, n)
        gv = _param_block(gs, b0, b1, defaults[0])
        bv = _param_block(bs, b0, b1, defaults[1])
        xv = xs[b0:b1]
        ov = os[b0:b1]
        if use_dy:
            dv = ds[b0:b1]
            for i in range(xv.size):
                g = load(gv, i)
                store(ov, i, (load(xv, i) - mc) * (a * g + h)
                      + load(dv, i) * (e * g) + (load(bv, i) + q * g + w))
        else:
            for i in range(xv.size):
                g = load(gv, i)
                store(ov, i, (load(xv, i) - mc) * (a * g + h)
                      + (load(bv, i) + q * g + w))


@_inlined
def _stream_buffer(out, segment):
    """Scratch of ``out``'s dtype through which :func:`_runs_map`
    streams segments of ``segment`` values (:func:`_map_streamed`):
    :data:`STREAM_VALUES` values for a :func:`_large_output` whose
    segments hold at least :data:`STREAM_SEGMENT_BYTES`, else none (the
    map stores in place)."""
    streams = (_large_output(out)
               and segment * out.itemsize >= STREAM_SEGMENT_BYTES)
    return np.empty(STREAM_VALUES if streams else 0, out.dtype)


@_inlined
def _map_streamed(xs, os, gs, bs, mc, a, q, w, defaults, buffer):
    """The forward :func:`_map_segment` over one segment ``xs`` (``h = e =
    0``), a block of ``buffer``'s size at a time into ``buffer``, each
    block then written into ``os`` by
    :func:`~normkit.backend.storage.stream` (the caller fences): the
    fused forward's map reads the row its moments have just brought into
    cache, and its stores neither read the lines they write nor evict it.

    Against ordinary stores (the engine alone, both threads, the old code
    copied twice into one process over the same arrays, each version's
    calls interleaved with the others', medians of 18, two rounds or
    more; the two old copies within 0.95 to 1.05 of each other), new
    over old time of the fused forward: LayerNorm float32 ``(8192,
    1024)`` 0.83 to 0.86, ``(2048, 4096)`` 0.81 to 0.83, ``(65536, 256)``
    0.88 to 0.90, ``(2, 4194304)`` 0.94, over ``(64, 56, 56)`` of 32
    samples 0.88 to 0.97; float64 ``(4096, 1024)`` 0.75 to 0.87; RMSNorm
    float32 ``(8192, 1024)`` 0.89 to 0.91.  Inlined here: called as a
    function of its own, a row of 1024 values at a time, the forward over
    ``(8192, 1024)`` took 1.12 to 1.15 of the old time.  Of the maps over
    rows, only the fused forward's streams.  The map alone (:func:`apply`,
    which also writes the backward's ``dx``), whose input comes from
    memory, gained over some shapes and lost over others when it streamed
    the same way: 0.85 to 0.86 over the two rows of 4194304, but 1.05 to
    1.06 over rows of 4096, 0.99 to 1.13 over rows of 65536 and 0.98 to
    1.07 over samples, and the backward over the two rows took 1.02 to
    1.07.  16-bit outputs, whose map is bound by the conversions rather
    than by memory, store the ordinary way: streamed (blocks of 2048), the
    forward over float16 ``(8192, 1024)`` took 1.00 to 1.02 of the time,
    its map alone 1.24 to 1.25.  Into a fresh mapping (an output that glibc
    maps anew, 32 MiB or more), whose pages the kernel zeroes through the
    cache at the first store (the likely cause), it gains nothing: the
    API's forward over ``(8192, 1024)`` took 1.01 to 1.03 of the old time,
    over the two long rows 1.02 to 1.11 (each version over a block of its
    own calls), where over a sample, whose 25.7 MB glibc reuses, 0.80 to
    0.90."""
    n = xs.size
    zero = compute_zero(xs)
    for b0 in range(0, n, buffer.size):
        b1 = min(b0 + buffer.size, n)
        target = buffer[:b1 - b0]
        _map_segment(xs[b0:b1], xs[b0:b1], target, False, gs[b0:b1],
                     bs[b0:b1], mc, a, zero, zero, q, w, defaults)
        stream(os[b0:b1], target)


@_inlined
def _map_scratch(x, K, J, B):
    """Scratch of the compute type for :func:`_p_apply`, which allocates
    none: four vectors of a row's ``K * J`` columns for narrow groups and
    for segments (:func:`_map_rows_of_segments`), or of the most columns
    of a block of :func:`_map_block_rows` where segments may be taken in
    blocks and that is more, else none."""
    L = J * B
    if _narrow_groups(J, B):
        return compute_empty(x, 4 * K * J + STREAM_VALUES)
    if B > 1:
        block = min(K, max(1, SHORT_MAP_VALUES // L)) * L if 2 * L <= TILE else 0
        return compute_empty(x, 4 * max(K * J, block))
    return compute_empty(x, 0)


@_kernel
def apply(x, dy, out, P, A, K, J, B, plan, coef, gamma, beta):
    """Elementwise map of ``_p_apply`` over all items; ``coef`` is
    ``(P, K, 5)`` float64, ``gamma`` and ``beta`` are ``(K * J,)`` in the
    input's dtype; ``dy`` has no values for a map without its term (a
    forward passes ``x[:0]``).

    Numba compiles a function apart for each constant argument: this
    kernel calls ``_p_apply`` with a constant ``use_dy``, as the fused
    kernels do, so that a dtype compiles it twice, not a third time for a
    flag known only when it runs, and compiles this kernel once, where a
    flag argument compiled it for each constant the drivers passed and
    again for the calls from Python."""
    L = J * B
    with_dy = dy.size > 0
    for item in prange(_n_items(plan)):
        p0, p1, r, _ = _item_bounds(item, P, A, K, L, plan)
        scratch = _map_scratch(x, K, J, B)
        defaults = _param_defaults(gamma, beta)
        for p in range(p0, p1):
            if with_dy:
                _p_apply(x, dy, out, True, p, r, A, K, J, B, coef[p], gamma,
                         beta, scratch, defaults)
            else:
                _p_apply(x, dy, out, False, p, r, A, K, J, B, coef[p], gamma,
                         beta, scratch, defaults)


@_inner
def own_statistics(p, k, K, mean, var, eps, table, results):
    """The finish of :func:`forward_item` that normalizes a group with its
    own statistics: center ``mean``, factor ``rstd = 1 / sqrt(var +
    eps)``, written to ``results[p, k]`` (``table`` unused)."""
    rstd = 1.0 / np.sqrt(var + eps)
    results[p, k] = rstd
    return mean, rstd


@_inner
def _forward_coefficients(coef, k, center, alpha):
    """Row ``k`` of a coefficient table for a forward map, ``out = (x -
    center) * alpha * gamma + beta``."""
    coef[k, COEF_MEAN] = center
    coef[k, COEF_A] = alpha
    coef[k, COEF_H] = 0.0
    coef[k, COEF_E] = 0.0
    coef[k, COEF_C] = 0.0


@_kernel
def forward_fused(x, out, P, A, K, J, B, plan, gamma, beta, eps, centered,
                  mean_out, var_out, rstd_out):
    """Moments and normalization of each group while it is in cache.

    Valid only for plans whose items hold whole groups (no split of the
    reduced extent).  Writes ``mean_out[p, k]``, the biased ``var_out[p,
    k]`` (0 and the mean square when not ``centered``) and ``rstd_out[p,
    k] = 1 / sqrt(var_out[p, k] + eps)``, the factor it normalized with
    (:func:`own_statistics`).
    """
    for item in prange(_n_items(plan)):
        forward_item(x, out, item, P, A, K, J, B, plan, gamma, beta, eps,
                     centered, mean_out, var_out, own_statistics, rstd_out,
                     rstd_out)


#: Most groups in one step of :func:`forward_item` where each is one
#: contiguous run (``A == 1``): the rows of its coefficient table, for
#: groups of a few values.
RUN_GROUPS = 64


@_inner
def _item_step(r, L, A, B):
    """Groups one step of :func:`forward_item` takes, counted along the
    item's runs of consecutive groups: :func:`_group_step` where groups
    are segments of several rows (``A > 1``), else as many whole groups
    as hold :data:`GROUP_STEP_VALUES` values, one at least and at most
    :data:`RUN_GROUPS` (LayerNorm and RMSNorm rows, GroupNorm and
    InstanceNorm channels first).

    Where each group is a run, its moments and its map are compiled
    functions of their own, called once a step
    (:func:`_step_moments`, :func:`_step_map`): inlined into every
    forward kernel, they made each kernel take twice as long to compile.
    A step of one row of 4096 values then made the float16 LayerNorm
    forward of ``(128, 4096)`` 5 to 10 % slower than the inlined loop of
    one row at a time; steps of this many values were as fast."""
    if A != 1:
        return _group_step(r, L, B)
    return max(1, min(RUN_GROUPS, GROUP_STEP_VALUES // L))


@_inlined
def forward_item(x, out, item, P, A, K, J, B, plan, gamma, beta, eps,
                 centered, mean_out, var_out, finish, table, results):
    """One item of a fused forward, a step of groups at a time
    (``_item_step``): their moments (``_step_moments``), then, while they
    are in cache, ``out = (x - center) * alpha * gamma + beta``
    (``_step_map``) with ``center, alpha = finish(p, k, K, mean, var,
    eps, table, results)`` per group, a compiled function that may also
    write per-group ``results``, each in its own layout
    (:func:`own_statistics`, or the transform of
    :func:`normalize_transformed`).

    Groups are counted in ``(p, k)`` order, ``q = p * K + k``: an item's
    groups are a run of consecutive ``q`` for each of its ``p``, or one
    run where it holds every ``k``.  A step stays within one ``p`` where
    ``A > 1``.

    ``finish`` is called at this one place, and this function is inlined
    into its kernel: Numba cannot keep on disk a kernel that hands a
    function to a function calling it at several places (the kernel then
    holds a pointer to the function object).  Its float64 scratch is one
    allocation: a tiny input's forward is a few microseconds per item.
    Rows (``A == B == 1``) of a large output are streamed out
    (``_stream_buffer``, ``_map_streamed``) and fenced once, at the
    item's end."""
    L = J * B
    p0, p1, r, _ = _item_bounds(item, P, A, K, L, plan)
    step = _item_step(r, L, A, B)
    n_coef = max(K, step)
    work = np.empty(2 * K + n_coef * N_COEF
                    + (2 * K * J if _rows_style(A, B) else 0))
    n = work[:K]
    m2 = work[K:2 * K]
    coef = work[2 * K:2 * K + n_coef * N_COEF].reshape((n_coef, N_COEF))
    scratch = work[2 * K + n_coef * N_COEF:]
    x_scratch = _map_scratch(x, K, J, B)
    buffer = _stream_buffer(out, J if A == 1 and B == 1 else 0)
    defaults = _param_defaults(gamma, beta)
    mean = mean_out.reshape(P * K)
    var = var_out.reshape(P * K)
    whole = A == 1 and r[2] == 0 and r[3] == K
    span = (p1 - p0) * K if whole else r[3] - r[2]
    for run in range(1 if whole else p1 - p0):
        first = (p0 + run) * K + r[2]
        for q0 in range(first, first + span, step):
            q1 = min(first + span, q0 + step)
            _step_moments(x, q0, q1, A, K, J, B, r, centered, n, m2, mean,
                          var, scratch)
            # coefficient rows: per group of the step where A == 1, per k
            # of the step's p otherwise (as _p_apply reads them)
            base = q0 if A == 1 else q0 - q0 % K
            for q in range(q0, q1):
                p, k = q // K, q % K
                if not centered and np.isnan(var[q]):
                    var[q] = _plain_mean_square(x, p, k, A, K, J, B)
                center, alpha = finish(p, k, K, mean[q], var[q], eps, table,
                                       results)
                _forward_coefficients(coef, q - base, center, alpha)
            _step_map(x, out, q0, q1, A, K, J, B, r, coef, gamma, beta,
                      x_scratch, defaults, buffer)
    if buffer.size > 0:
        stream_fence()


@_inner
def _step_moments(x, q0, q1, A, K, J, B, r, centered, n, m2, mean, var,
                  scratch):
    """``mean[q]`` and ``var[q]`` (:func:`_statistics`; both flat, ``P *
    K``) of the groups ``q`` in ``[q0, q1)`` of one step of
    :func:`forward_item`: each contiguous run's :func:`_segment_moments`
    where ``A == 1`` (no per-group tables, whose bookkeeping cost more
    than a group of a few hundred values), else :func:`_p_moments` over
    the item's ranges ``r`` for those groups, all of one ``p``; ``n`` and
    ``m2`` are per-``k`` scratch."""
    L = J * B
    if A == 1:
        for q in range(q0, q1):
            count, mu, sq = _segment_moments(x, q * L, (q + 1) * L, 0.0, 0.0,
                                             0.0)
            mean[q], var[q] = _statistics(count, mu, sq, centered)
        return
    p = q0 // K
    k0, k1 = q0 - p * K, q1 - p * K
    row_mean = mean[p * K:(p + 1) * K]
    row_var = var[p * K:(p + 1) * K]
    _p_moments(x, p, _groups(r, k0, k1 - k0), A, K, J, B, n, row_mean, m2,
               scratch)
    for k in range(k0, k1):
        row_mean[k], row_var[k] = _statistics(n[k], row_mean[k], m2[k],
                                              centered)


@_inner
def _step_map(x, out, q0, q1, A, K, J, B, r, coef, gamma, beta, x_scratch,
              defaults, buffer):
    """The map of one step of :func:`forward_item`, groups ``q`` in ``[q0,
    q1)``: :func:`_runs_map` where each group is one run (``A == 1``),
    else :func:`_p_apply` over the item's ranges ``r`` for those groups,
    all of one ``p``, with ``coef[k]``; ``buffer`` from
    :func:`_stream_buffer`."""
    if A == 1:
        _runs_map(x, out, q0, q1, K, J, B, r, coef, gamma, beta, defaults,
                  buffer)
        return
    p = q0 // K
    _p_apply(x, x[:0], out, False, p, _groups(r, q0 - p * K, q1 - q0), A, K,
             J, B, coef, gamma, beta, x_scratch, defaults)


@_uncounted
def _runs_map(x, out, q0, q1, K, J, B, r, coef, gamma, beta, defaults,
              buffer):
    """:func:`_step_map` where each group ``q`` in ``[q0, q1)`` is one
    contiguous run (``A == 1``), with the coefficients ``coef[q - q0]``:
    the wide-group :func:`_map_segment` (``B == 1``; through ``buffer``,
    :func:`_map_streamed`, where it has values) or :func:`_map_group`.
    Without reference counting (``_uncounted``): a slice per group, whose
    runtime calls cost as much as the map of a short row where counted."""
    L = J * B
    zero = compute_zero(x)
    for q in range(q0, q1):
        k = q % K
        center, alpha = coef[q - q0, COEF_MEAN], coef[q - q0, COEF_A]
        if B == 1:
            lo = q * L
            mc, a_x, h_x, e_x, q_x, w_x = _wide_coefficients(
                center, alpha, 0.0, 0.0, 0.0, zero)
            xs = x[lo:lo + L]
            gs = gamma[k * J:(k + 1) * J]
            bs = beta[k * J:(k + 1) * J]
            if buffer.size > 0:
                _map_streamed(xs, out[lo:lo + L], gs, bs, mc, a_x, q_x, w_x,
                              defaults, buffer)
            else:
                _map_segment(xs, xs, out[lo:lo + L], False, gs, bs, mc, a_x,
                             h_x, e_x, q_x, w_x, defaults)
        else:
            _map_group(x, x, out, False, q // K, r, 1, K, J, B, k, center,
                       alpha, 0.0, 0.0, 0.0, gamma, beta)


# --------------------------------------------------------------------------
# backward reductions
# --------------------------------------------------------------------------

#: Rows whose per-column affine sums ``_rows_backward`` and
#: ``_column_backward_sums`` gather in the product type before adding
#: them to the float64 partials (float32 for 16-bit storage: 32 terms,
#: far below what a 16-bit gradient can resolve).
AFFINE_BLOCK_ROWS = 32


@_inner
def _column_backward_sums(d2, x2, c0, c1, center, t_dy, t_dyx):
    """``t_dy[c] += sum_r d2[r, c]`` and ``t_dyx[c] += sum_r d2[r, c] *
    (x2[r, c] - center[c])`` (float64 sums) over the rows of 2-D ``d2`` and
    ``x2``, for the columns ``c`` in ``[c0, c1)``.

    Every :data:`AFFINE_BLOCK_ROWS` rows are summed in two vectors of the
    type of :func:`~normkit.backend.storage.product_zero`, about ``center``
    rounded to that type (``mc``), before :func:`_add_column_block` adds
    them into the float64 sums: float32 for 16-bit storage, whose column
    updates then vectorise twice as wide (float16 ``(3136, 64)`` in L2:
    24 us against 63 in float64), float64 (``mc == center``) otherwise.
    Two rows at a time: with two inputs and float64 sums, four rows at
    once ran slower than one (channels-last BatchNorm ``(32, 56, 56, 64)``,
    both threads, fastest of 60 interleaved runs: 0.91 ms row by row, 1.21
    four rows at a time, two at a time as row by row; in cache, over ``(2,
    56, 56, 64)``, 34 us row by row and 27 two at a time).  The blocks are
    closed inside the row loop, not by a loop over blocks around it, which
    ran the float32 sums about 30 % slower (55 us against 43 in L2)."""
    n_rows = x2.shape[0]
    u0, u1 = _unsigned(c0, c1)
    zero = product_zero(x2)
    # the block sums and mc hold the columns from c0 on: column c at c - u0
    mc = np.full(c1 - c0, zero)
    for c in range(u0, u1):
        mc[c - u0] = _cast_like(center[c], zero)
    b_dy = np.full(c1 - c0, zero)
    b_dyx = np.full(c1 - c0, zero)
    center_b = center[c0:c1]
    t_dy_b = t_dy[c0:c1]
    t_dyx_b = t_dyx[c0:c1]
    whole = n_rows - n_rows % 2
    for r in range(0, whole, 2):
        for c in range(u0, u1):
            i = c - u0
            m = mc[i]
            g0 = _cast_like(load(d2, (r, c)), zero)
            g1 = _cast_like(load(d2, (r + 1, c)), zero)
            b_dy[i] += g0 + g1
            b_dyx[i] += (g0 * (_cast_like(load(x2, (r, c)), zero) - m)
                         + g1 * (_cast_like(load(x2, (r + 1, c)), zero) - m))
        if (r + 2) % AFFINE_BLOCK_ROWS == 0 or r + 2 == whole:
            _add_column_block(b_dy, b_dyx, mc, center_b, t_dy_b, t_dyx_b)
    if whole < n_rows:  # the last of an odd number of rows
        for c in range(u0, u1):
            i = c - u0
            g = _cast_like(load(d2, (whole, c)), zero)
            b_dy[i] += g
            b_dyx[i] += g * (_cast_like(load(x2, (whole, c)), zero) - mc[i])
        _add_column_block(b_dy, b_dyx, mc, center_b, t_dy_b, t_dyx_b)


@_inlined
def _add_column_block(b_dy, b_dyx, mc, center, t_dy, t_dyx):
    """Adds a block's sums ``b_dy`` and ``b_dyx``, taken about ``mc``, into
    the float64 ``t_dy`` and ``t_dyx`` about ``center`` (``sum g * (x -
    center) = sum g * (x - mc) + (mc - center) * sum g``), and zeroes
    them."""
    for c in range(b_dy.size):
        s_dy = np.float64(b_dy[c])
        t_dy[c] += s_dy
        t_dyx[c] += np.float64(b_dyx[c]) + (mc[c] - center[c]) * s_dy
        b_dy[c] = 0.0
        b_dyx[c] = 0.0


@_inlined
def _xhat_coefficients(m, rs, zero):
    """``(mc, r, q)`` in the compute type of ``zero`` with which ``xhat =
    (x - m) * rs`` is ``(x - mc) * r + q``: ``mc`` is ``m`` rounded and
    ``q = -(m - mc) * rs`` carries what the rounding dropped (as in
    :func:`_wide_coefficients`)."""
    mc, r, _, _, q, _ = _wide_coefficients(m, rs, 0.0, 0.0, 0.0, zero)
    return mc, r, q


@_inlined
def _reduce_segment(xs, ds, m, rs, gs, s_dy, s_dyx, with_affine, defaults):
    """``(sum g * dy, sum g * dy * xhat)`` (float64) along one contiguous
    segment of a wide group, with ``xhat = (x - m) * rs`` and ``g`` the
    segment's ``gs`` (empty: 1, a tile at a time from ``defaults``,
    :func:`_param_block`); ``dy`` and ``dy * xhat`` are added into the
    segment's affine sums ``s_dy`` and ``s_dyx`` when ``with_affine``.

    Products and the sums over each tile of :data:`TILE` values are in
    the type of :func:`~normkit.backend.storage.product_zero` (``xhat``
    from :func:`_xhat_coefficients`): float32 for 16-bit storage, which
    vectorises twice as wide (the sums of a channels-first BatchNorm
    segment of float16 took 0.10 ns a value, against 0.30 in float64),
    float64 otherwise; the tiles' sums are added in float64."""
    zero = product_zero(xs)
    mc, r, q = _xhat_coefficients(m, rs, zero)
    s1 = 0.0
    s2 = 0.0
    for t0 in range(0, xs.size, TILE):
        t_end = min(t0 + TILE, xs.size)
        xt = xs[t0:t_end]
        dt = ds[t0:t_end]
        gt = _param_block(gs, t0, t_end, defaults[0])
        a_dy = s_dy[t0:t_end]
        a_dyx = s_dyx[t0:t_end]
        t1 = zero
        t2 = zero
        for i in range(xt.size):
            g = _cast_like(load(dt, i), zero)
            gx = g * ((load(xt, i) - mc) * r + q)
            if with_affine:
                a_dy[i] += g
                a_dyx[i] += gx
            w = load(gt, i)
            t1 += w * g
            t2 += w * gx
        s1 += np.float64(t1)
        s2 += np.float64(t2)
    return s1, s2


@_inlined
def _reduce_segment_pair(xa, da, xb, db, ma, ra, mb, rb, gs, s_dy, s_dyx,
                         with_affine, defaults):
    """:func:`_reduce_segment` of two rows ``a`` and ``b`` over the same
    columns, ``(ma, ra)`` and ``(mb, rb)`` their mean and rstd: returns
    ``(s1_a, s2_a, s1_b, s2_b)``, and adds both rows into the affine sums
    in one float64 update per column, which the one-row loop spends most
    of its time on (two float32 inputs of ``(32, 200704)``, column blocks
    over both threads: 1.5-1.6 ms two rows at a time, 2.0-2.2 ms one row at
    a time, against 1.0-1.2 ms for a copy of one input)."""
    zero = product_zero(xa)
    mac, rac, qa = _xhat_coefficients(ma, ra, zero)
    mbc, rbc, qb = _xhat_coefficients(mb, rb, zero)
    s1a = 0.0
    s2a = 0.0
    s1b = 0.0
    s2b = 0.0
    for t0 in range(0, xa.size, TILE):
        t_end = min(t0 + TILE, xa.size)
        xat = xa[t0:t_end]
        dat = da[t0:t_end]
        xbt = xb[t0:t_end]
        dbt = db[t0:t_end]
        gt = _param_block(gs, t0, t_end, defaults[0])
        a_dy = s_dy[t0:t_end]
        a_dyx = s_dyx[t0:t_end]
        t1a = zero
        t2a = zero
        t1b = zero
        t2b = zero
        for i in range(xat.size):
            ga = _cast_like(load(dat, i), zero)
            gb = _cast_like(load(dbt, i), zero)
            gxa = ga * ((load(xat, i) - mac) * rac + qa)
            gxb = gb * ((load(xbt, i) - mbc) * rbc + qb)
            if with_affine:
                a_dy[i] += ga + gb
                a_dyx[i] += gxa + gxb
            w = load(gt, i)
            t1a += w * ga
            t2a += w * gxa
            t1b += w * gb
            t2b += w * gxb
        s1a += np.float64(t1a)
        s2a += np.float64(t2a)
        s1b += np.float64(t1b)
        s2b += np.float64(t2b)
    return s1a, s2a, s1b, s2b


@_inner
def _p_reduce(dy, x, p, r, A, K, J, B, mean_p, rstd_p, gscale, group_out,
              affine_out, scratch, defaults):
    """Backward sums of one ``p`` over the ranges ``r = (a0, a1, k0, k1, l0,
    l1)``, with ``xhat = (x - mean) * rstd``:

    - ``group_out[k] = (sum gscale*dy, sum gscale*dy*xhat)`` per group
      (overwritten);
    - ``affine_out[:, col] += (sum dy, sum dy*xhat)`` per
      column ``col = (k, j)``, unless ``affine_out`` has no columns (the
      affine sums are not wanted).

    ``scratch`` holds at least ``3 * K * J`` float64 values;
    ``defaults`` is :func:`_param_defaults` of ``gscale`` and of no shift.
    """
    a0, a1, k0, k1, l0, l1 = r
    L = J * B
    width = K * J
    aff_dy = affine_out[0]
    aff_dyx = affine_out[1]
    with_affine = aff_dy.size > 0
    group_out[k0:k1] = 0.0
    if B == 1 and J >= WIDE_GROUP:
        # Wide groups: fold straight into the group and affine sums.
        c0, c1 = _column_range(r, J)
        for row in range(p * A + a0, p * A + a1):
            for k in range(k0, k1):
                lo = max(c0, k * J)
                hi = min(c1, (k + 1) * J)
                m = mean_p[k]
                rs = rstd_p[k]
                xs = x[row * width + lo:row * width + hi]
                ds = dy[row * width + lo:row * width + hi]
                gs = gscale[lo:hi]
                s_dy = aff_dy[lo:hi] if with_affine else aff_dy
                s_dyx = aff_dyx[lo:hi] if with_affine else aff_dyx
                s1, s2 = _reduce_segment(xs, ds, m, rs, gs, s_dy, s_dyx,
                                         with_affine, defaults)
                group_out[k, 0] += s1
                group_out[k, 1] += s2
        return
    if B == 1:
        # Narrow groups: per-column sums over the rows, of the columns of
        # groups k0 .. k1, folded per group; rstd is applied once per
        # column at the fold.
        c0, c1 = k0 * J, k1 * J
        m_c = scratch[:width]
        t_dy = scratch[width:2 * width]
        t_dyx = scratch[2 * width:3 * width]
        # loops over the columns, group k's values taken where its columns
        # start (as in _p_apply: 4096 one-column groups took 24 us here
        # with a loop per group, 15 this way); column c0 + i at i of slices
        # from c0 (as in _p_apply)
        m_b, t_dy_b, t_dyx_b = m_c[c0:c1], t_dy[c0:c1], t_dyx[c0:c1]
        gs = gscale[c0:c1]
        k = k0
        end = J
        for i in range(c1 - c0):
            if i == end:
                k += 1
                end += J
            m_b[i] = mean_p[k]
        t_dy_b[:] = 0.0
        t_dyx_b[:] = 0.0
        _column_backward_sums(_row_block(dy, p, a0, a1, A, width),
                              _row_block(x, p, a0, a1, A, width), c0, c1, m_c,
                              t_dy, t_dyx)
        aff_dy_b = aff_dy[c0:c1] if with_affine else aff_dy
        aff_dyx_b = aff_dyx[c0:c1] if with_affine else aff_dyx
        k = k0
        end = J
        for i in range(c1 - c0):
            if i == end:
                k += 1
                end += J
            s_dyx = t_dyx_b[i] * rstd_p[k]
            group_out[k, 0] += _param(gs, i, 1.0) * t_dy_b[i]
            group_out[k, 1] += _param(gs, i, 1.0) * s_dyx
            if with_affine:
                aff_dy_b[i] += t_dy_b[i]
                aff_dyx_b[i] += s_dyx
        return
    if (l0 == 0 and l1 == L and L <= ROWS_SUMS_SEGMENT
            and a1 - a0 >= ROW_STEP):
        _segment_rows_sums(dy, x, p, r, A, K, J, B, mean_p, rstd_p, gscale,
                           group_out, aff_dy, aff_dyx, with_affine)
        return
    _segment_sums(dy, x, p, r, A, K, J, B, mean_p, rstd_p, gscale, group_out,
                  aff_dy, aff_dyx, with_affine)


@_inlined
def _add_channel_sums(k, col, s_dy, s_dyx, gscale, group_out, aff_dy, aff_dyx,
                      with_affine):
    """Adds channel ``col``'s float64 ``sum dy`` and ``sum dy * xhat`` to
    its affine sums (when ``with_affine``) and, scaled by ``gscale[col]``,
    to group ``k``'s sums."""
    if with_affine:
        aff_dy[col] += s_dy
        aff_dyx[col] += s_dyx
    w = _param(gscale, col, 1.0)
    group_out[k, 0] += w * s_dy
    group_out[k, 1] += w * s_dyx


@_inlined
def _tile_sums(dy, x, lo, hi, mc, r, q, zero):
    """``(sum dy, sum dy * xhat)`` over ``lo .. hi``, at most a tile, with
    ``xhat = (x - mc) * r + q``: products and sums in the type of
    ``zero`` (:func:`~normkit.backend.storage.product_zero`), returned
    in float64.

    Indices, not slices: a slice calls Numba's runtime twice in a function
    that counts references.  The backward of InstanceNorm over ``(32, 256,
    14, 14)`` float32, old and new alternating (medians of 21, three
    rounds, Zen 4), took 0.84 to 0.93 of its time that way; GroupNorm
    ``(32, 256, 7, 7)`` 0.94 to 0.98."""
    u0, u1 = _unsigned(lo, hi)
    t1 = zero
    t2 = zero
    for i in range(u0, u1):
        g = _cast_like(load(dy, i), zero)
        t1 += g
        t2 += g * ((load(x, i) - mc) * r + q)
    return np.float64(t1), np.float64(t2)


@_inner
def _segment_sums(dy, x, p, r, A, K, J, B, mean_p, rstd_p, gscale,
                  group_out, aff_dy, aff_dyx, with_affine):
    """:func:`_p_reduce` over segments (``B > 1``) a segment at a time:
    each segment's sums as :func:`_reduce_segment` forms them (tiles of
    :data:`TILE` values summed in the type of
    :func:`~normkit.backend.storage.product_zero`, added in float64), with
    each group's coefficients of ``xhat`` computed once, not once per
    segment, and the channel's ``gscale`` applied to the segment's sums,
    not to each value.

    Segments of a few dozen values spent most of their time in the tile
    bookkeeping of :func:`_reduce_segment`; those of more than a tile
    (channels-first BatchNorm over ``(2, 64, 56, 56)`` float32, segments
    of 3136) multiplied every value by a scale of 1 there.  Without it
    (old and new alternating, medians of 9 or 21, two or three runs of
    three rounds, Zen 4; the same bits), the forward and backward of
    that BatchNorm took 0.94 to 0.96 of their time, 0.95 to 0.98 in
    float16, and of GroupNorm ``(2, 64, 56, 56)`` 0.91 to 0.97."""
    a0, a1, k0, k1, l0, l1 = r
    L = J * B
    zero = product_zero(x)
    mc_k = np.empty(K)
    r_k = np.empty(K)
    q_k = np.empty(K)
    for k in range(k0, k1):
        mc, rr, q = _xhat_coefficients(mean_p[k], rstd_p[k], zero)
        mc_k[k] = mc
        r_k[k] = rr
        q_k[k] = q
    for a in range(a0, a1):
        for k in range(k0, k1):
            mc = _cast_like(mc_k[k], zero)
            rr = _cast_like(r_k[k], zero)
            q = _cast_like(q_k[k], zero)
            seg = ((p * A + a) * K + k) * L
            for j in range(l0 // B, (l1 - 1) // B + 1):
                lo = seg + max(l0, j * B)
                hi = seg + min(l1, (j + 1) * B)
                if hi - lo <= TILE:  # no tile loop around a few dozen values
                    s_dy, s_dyx = _tile_sums(dy, x, lo, hi, mc, rr, q, zero)
                else:
                    s_dy = 0.0
                    s_dyx = 0.0
                    for t0 in range(lo, hi, TILE):
                        t_dy, t_dyx = _tile_sums(dy, x, t0, min(t0 + TILE, hi),
                                                 mc, rr, q, zero)
                        s_dy += t_dy
                        s_dyx += t_dyx
                _add_channel_sums(k, k * J + j, s_dy, s_dyx, gscale,
                                  group_out, aff_dy, aff_dyx, with_affine)


#: Longest segments whose backward sums ``_p_reduce`` takes down the
#: rows (``_segment_rows_sums``) rather than a segment at a time.
#: ``backward_sums_of`` over float32 on one thread (a scratch script, ns a
#: value, the old code and the new alternating, four runs each): segments
#: of 49 over 32 rows took 0.68 to 0.80 a segment at a time and 0.41 to
#: 0.57 down the rows in blocks of ``ROWS_SUMS_COLUMNS``, over 64 rows
#: 0.68 to 0.71 and 0.42, over 8 rows 0.69 to 0.73 and 0.56 to 0.57;
#: segments of 64 over 32 rows 0.53 to 0.57 and 0.40 to 0.41.  Segments
#: of 144 and 196 (one run) took 0.34 and 0.32 a segment at a time, 0.40
#: down the rows, so longer ones stay a segment at a time.
ROWS_SUMS_SEGMENT = 64

#: Most columns that ``_segment_rows_sums`` sums down the rows at once:
#: it takes an item's groups in blocks of at most this many columns, so
#: that its column sums and ``xhat`` coefficients (five vectors of this
#: length, in float64 for float32 input) stay in the core's first caches
#: while every row of the block goes through them.  Unblocked, the
#: columns of 1024 groups of 16 (``(32, 1024, 4, 4)``) took 0.56 to 0.77
#: ns a value (the runs of ``ROWS_SUMS_SEGMENT``), in blocks of 1024
#: columns 0.41 to 0.44; blocks of 512 and of 2048 columns (one run each)
#: took 0.55 and 0.41 over segments of 49, 0.56 and 0.41 over segments
#: of 16.
ROWS_SUMS_COLUMNS = 1024


@_inner
def _segment_rows_sums(dy, x, p, r, A, K, J, B, mean_p, rstd_p, gscale,
                       group_out, aff_dy, aff_dyx, with_affine):
    """:func:`_p_reduce` over whole segments of at most
    :data:`ROWS_SUMS_SEGMENT` values (``B > 1``) of at least
    :data:`ROW_STEP` rows, read as rows, as
    :func:`_segment_rows_moments` reads them, a block of groups of at
    most :data:`ROWS_SUMS_COLUMNS` columns at a time: each column of a
    sample's run of the block's segments sums ``dy`` and ``dy * xhat`` down
    :data:`AFFINE_BLOCK_ROWS` rows at a time, two rows a step, in the type
    of :func:`~normkit.backend.storage.product_zero` (per-column ``xhat``
    coefficients of :func:`_xhat_coefficients`), and the columns of each
    channel ``(k, j)`` are folded in float64 after each block; a segment
    at a time paid a loop's setup and remainder and two horizontal sums
    for every few dozen values."""
    a0, a1, k0, k1, _, _ = r
    L = J * B
    stride = K * L
    zero = product_zero(x)
    per_block = max(1, ROWS_SUMS_COLUMNS // L)
    most = min(k1 - k0, per_block) * L
    mc_v = np.full(most, zero)
    r_v = np.full(most, zero)
    q_v = np.full(most, zero)
    t_dy = np.full(most, zero)
    t_dyx = np.full(most, zero)
    for b0 in range(k0, k1, per_block):
        b1 = min(b0 + per_block, k1)
        width = (b1 - b0) * L
        for k in range(b0, b1):
            mc, rr, q = _xhat_coefficients(mean_p[k], rstd_p[k], zero)
            lo = (k - b0) * L
            mc_v[lo:lo + L] = mc
            r_v[lo:lo + L] = rr
            q_v[lo:lo + L] = q
        for t0 in range(a0, a1, AFFINE_BLOCK_ROWS):
            t1 = min(t0 + AFFINE_BLOCK_ROWS, a1)
            t_dy[:width] = zero
            t_dyx[:width] = zero
            pairs = t0 + (t1 - t0) // 2 * 2
            for a in range(t0, pairs, 2):
                first = ((p * A + a) * K + b0) * L
                x0 = x[first:first + width]
                d0 = dy[first:first + width]
                x1 = x[first + stride:first + stride + width]
                d1 = dy[first + stride:first + stride + width]
                for i in range(width):
                    g0 = _cast_like(load(d0, i), zero)
                    g1 = _cast_like(load(d1, i), zero)
                    m = mc_v[i]
                    t_dy[i] += g0 + g1
                    t_dyx[i] += (g0 * ((load(x0, i) - m) * r_v[i] + q_v[i])
                                 + g1 * ((load(x1, i) - m) * r_v[i] + q_v[i]))
            if pairs < t1:  # the last of an odd number of rows
                first = ((p * A + pairs) * K + b0) * L
                x0 = x[first:first + width]
                d0 = dy[first:first + width]
                for i in range(width):
                    g0 = _cast_like(load(d0, i), zero)
                    t_dy[i] += g0
                    t_dyx[i] += g0 * ((load(x0, i) - mc_v[i]) * r_v[i]
                                      + q_v[i])
            for k in range(b0, b1):
                for j in range(J):
                    lo = (k - b0) * L + j * B
                    s_dy, s_dyx = _float64_sums(t_dy[lo:lo + B],
                                                t_dyx[lo:lo + B])
                    _add_channel_sums(k, k * J + j, s_dy, s_dyx, gscale,
                                      group_out, aff_dy, aff_dyx, with_affine)


@_kernel
def backward_reduce(dy, x, P, A, K, J, B, plan, mean, rstd, gscale,
                    part_group, part_affine):
    """Backward sums for every item.

    ``part_group[p, chunk, k] = (sum gscale*dy, sum gscale*dy*xhat)`` over the
    item's part of group ``(p, k)``; ``(sum dy, sum dy*xhat)`` per ``(k, j)``
    over the item are added into ``part_affine[slot]``, zero on entry: one
    slot per item, or a single slot where the items' columns are disjoint
    (:func:`normkit.backend.plan.disjoint_columns`).
    """
    L = J * B
    n_slots = part_affine.shape[0]
    for item in prange(_n_items(plan)):
        p0, p1, r, chunk = _item_bounds(item, P, A, K, L, plan)
        scratch = np.empty(3 * K * J if _narrow_groups(J, B) else 0)
        defaults = _param_defaults(gscale, gscale[:0])
        slot = item % n_slots
        for p in range(p0, p1):
            _p_reduce(dy, x, p, r, A, K, J, B, mean[p], rstd[p],
                      gscale, part_group[p, chunk], part_affine[slot],
                      scratch, defaults)


@_inlined
def _row_of(t, p0, a0, a1, A):
    """``(p, row)`` of the ``t``-th row of the rows ``a`` in ``[a0, a1)``
    of every ``p`` from ``p0`` on, ``row = p * A + a``."""
    p = p0 + t // (a1 - a0)
    return p, p * A + a0 + t % (a1 - a0)


#: Columns whose affine sums :func:`backward_reduce_columns` accumulates
#: over every row at a time (two float64 vectors of this length, in L1/L2).
COLUMN_BLOCK = 4096


@_kernel
def backward_reduce_columns(dy, x, P, A, K, J, B, plan, mean, rstd, gscale,
                            part_group, sum_dy_out, sum_dyx_out):
    """Backward sums of one wide group per row (``K == 1``, ``B == 1``,
    ``J >= WIDE_GROUP``) for a plan whose items take every row of a chunk
    of the columns (:func:`~normkit.backend.plan.column_sums`).

    ``part_group`` as in :func:`backward_reduce`.  The affine sums ``(sum
    dy, sum dy*xhat)`` of each block of :data:`COLUMN_BLOCK` columns are
    accumulated over the rows in row order, two rows at a time
    (``_reduce_segment_pair``), in the vectors of ``_affine_block``:
    float64 scratch for float32 and float64 storage; for 16-bit storage
    float32 ones, added into float64 scratch every
    :data:`AFFINE_BLOCK_ROWS` rows, or, over that many rows or fewer,
    written as they are.  They are stored in ``sum_dy_out`` and
    ``sum_dyx_out`` (``K * J`` values in any storage,
    :func:`~normkit.backend.storage.store`; no values: not wanted).  No
    float64 array of the input's width is made, and the sums are written
    once, in the caller's dtype.

    Where there are few rows the work per column outweighs the work per
    value.  The API's backward with weight and bias (float16 gradients)
    over float16 ``(3, 1048576)`` took 0.57 of its time before (5.6 ms)
    with the float32 vectors added into float64 scratch at the end of each
    block, and 0.26 to 0.29 with them written as they are, which leaves
    out the float64 scratch and the float64 sums' rounding to odd on their
    way to float16 (old and new checkouts in one process, alternating,
    medians of 11, three rounds; an unchanged copy within 1.00 to 1.05 of
    the old; 0.28 to 0.33 in a rerun).  In the same run: ``(8, 65536)``
    0.38 to 0.42 (0.81 to 0.85 in the rerun, whose old took 280 us, not
    455), bfloat16 0.50 to 0.54; ``(2, 4194304)`` 0.79 to 0.81; ``(8,
    262144)`` 0.83; RMSNorm ``(8, 65536)`` 0.86; float32 and float64
    cells 1.00 to 1.03.  Over more rows, where the float32 vectors are
    added into float64 every 32 rows, it was level: float16 ``(48,
    200704)`` 0.92 to 1.01, bfloat16 ``(40, 262144)`` 0.93 to 1.15 in two
    runs.

    Writing the sums from index 0 of sliced outputs (``_store_sums``),
    not from a signed start, let the stores vectorise.  Same A/B, new
    over old: bfloat16 ``(3, 1048576)`` 0.58 to 0.60, float16 0.75 to
    0.77; float16 ``(2, 4194304)`` 0.61 to 0.62, float32 0.78 to 0.81;
    bfloat16 ``(40, 262144)`` 0.73 to 0.75; float16 ``(8, 262144)``
    0.76 to 0.78; ``(8, 65536)`` float16 0.79 to 0.81, bfloat16 0.81 to
    0.82, float32 0.92 to 0.94; float64 ``(4, 262144)`` 0.94 to 0.99;
    the fused passes' cells 0.90 to 1.05 (the unchanged copy 0.95 to
    1.07).

    Sums written into float32 or float64 outputs of at least
    :data:`STREAM_BYTES` (``_large_output``) are streamed
    (``_stream_sums``), so that the gradients are not read before they
    are written.  The engine's backward with its gradients written in
    place into arrays kept from call to call, old and new code in one
    process, each over a block of 15 calls, 6 and 10 rounds: new over
    old time over the two rows of 4194304 float32 values 0.78 to 1.01
    and 0.96 to 1.02, over two rows of 2097152 float64 values 0.93 to
    1.06 and 0.92 to 1.03; over ``(8, 1048576)``, whose gradients of 4
    MiB are not streamed, 0.95 to 1.04 and 0.92 to 1.07.  A few per
    cent at most, as the 32 MiB of gradients are a small part of what
    the backward moves.
    """
    L = J * B
    with_affine = sum_dy_out.size > 0
    streamed = with_affine and _large_output(sum_dy_out)
    for item in prange(_n_items(plan)):
        p0, p1, r, chunk = _item_bounds(item, P, A, K, L, plan)
        a0, a1 = r[0], r[1]
        n_rows = (p1 - p0) * (a1 - a0)
        block = np.empty((2, COLUMN_BLOCK if with_affine else 0))
        buffer = np.empty(COLUMN_BLOCK if streamed else 0, sum_dy_out.dtype)
        block_dy, block_dyx = _affine_block(block, x)
        # 16-bit storage over at most AFFINE_BLOCK_ROWS rows: the float32
        # block sums are the totals, written as they are
        direct = (block_dy.itemsize != block.itemsize
                  and n_rows <= AFFINE_BLOCK_ROWS)
        defaults = _param_defaults(gscale, gscale[:0])
        for p in range(p0, p1):
            part_group[p, chunk] = 0.0
        for l0 in range(r[4], r[5], COLUMN_BLOCK):
            l1 = min(r[5], l0 + COLUMN_BLOCK)
            totals = block[:, :l1 - l0]  # no columns without affine sums
            s_dy = block_dy[:l1 - l0]
            s_dyx = block_dyx[:l1 - l0]
            if not direct:
                totals[:, :] = 0.0
            gs = gscale[l0:l1]
            # rows two at a time (_reduce_segment_pair), in row order
            for t in range(0, n_rows, 2):
                pa, row_a = _row_of(t, p0, a0, a1, A)
                xa = x[row_a * L + l0:row_a * L + l1]
                da = dy[row_a * L + l0:row_a * L + l1]
                if t + 1 < n_rows:
                    pb, row_b = _row_of(t + 1, p0, a0, a1, A)
                    s1a, s2a, s1b, s2b = _reduce_segment_pair(
                        xa, da, x[row_b * L + l0:row_b * L + l1],
                        dy[row_b * L + l0:row_b * L + l1], mean[pa, 0],
                        rstd[pa, 0], mean[pb, 0], rstd[pb, 0], gs, s_dy,
                        s_dyx, with_affine, defaults)
                    part_group[pb, chunk, 0, 0] += s1b
                    part_group[pb, chunk, 0, 1] += s2b
                else:
                    s1a, s2a = _reduce_segment(xa, da, mean[pa, 0],
                                               rstd[pa, 0], gs, s_dy, s_dyx,
                                               with_affine, defaults)
                part_group[pa, chunk, 0, 0] += s1a
                part_group[pa, chunk, 0, 1] += s2a
                if with_affine and not direct and (
                        (t + 2) % AFFINE_BLOCK_ROWS == 0 or t + 2 >= n_rows):
                    _add_affine_block(s_dy, s_dyx, totals)
            if not with_affine:
                continue
            if direct:
                _store_sums(s_dy, s_dyx, sum_dy_out, sum_dyx_out, l0)
                s_dy[:] = 0.0
                s_dyx[:] = 0.0
            elif streamed:
                _stream_sums(totals[0], totals[1], sum_dy_out, sum_dyx_out,
                             l0, buffer)
            else:
                _store_sums(totals[0], totals[1], sum_dy_out, sum_dyx_out, l0)
        if streamed:
            stream_fence()


@_inlined
def _stream_sums(s_dy, s_dyx, sum_dy_out, sum_dyx_out, start, buffer):
    """:func:`_store_sums` into float32 or float64 outputs of at least
    :data:`STREAM_BYTES` (``_large_output``): each sum converted into
    ``buffer`` (as many values or more, of the outputs' dtype), then
    written with :func:`~normkit.backend.storage.stream` (the caller
    fences), so that writing the gradients does not first read them."""
    n = s_dy.size
    target = buffer[:n]
    for i in range(n):
        target[i] = s_dy[i]
    stream(sum_dy_out[start:start + n], target)
    for i in range(n):
        target[i] = s_dyx[i]
    stream(sum_dyx_out[start:start + n], target)


@_inlined
def _store_sums(s_dy, s_dyx, sum_dy_out, sum_dyx_out, start):
    """The affine sums ``s_dy`` and ``s_dyx`` (1-D, float32 or float64)
    written into ``sum_dy_out`` and ``sum_dyx_out`` from index ``start``,
    in their storage, each value rounded once (``store``, as every kernel
    writes): for 65536 float32 values from float64, ``protocol.copy``'s
    float64 ufunc took 36 us a sum, ``np.copyto`` 8.6 (one thread,
    warm).

    The outputs are sliced from ``start`` and written from index 0: at
    ``start + i``, a signed index that LLVM cannot prove positive, each
    store went through Numba's test for a negative index, lane by lane
    (see ``_unsigned``).  A standalone loop over 1048576 float32 sums
    took 1951 to 2125 us into bfloat16 that way and 387 to 472 sliced,
    790 to 908 and 342 to 380 into float16, 644 to 742 and 489 to 572
    into float32; from float64 sums, 3116 to 3439 and 957 to 1019 into
    bfloat16, 2145 to 2384 and 868 to 941 into float16 (one thread,
    medians of 15, two rounds in each of two runs)."""
    n = s_dy.size
    dy_out = sum_dy_out[start:start + n]
    dyx_out = sum_dyx_out[start:start + n]
    for i in range(n):
        store(dy_out, i, s_dy[i])
        store(dyx_out, i, s_dyx[i])


@_inner
def finish_backward_p(sums, n, mean_p, rstd_p, coef, k0, k1, centered):
    """Coefficients of ``dx`` for groups ``[k0, k1)`` of one ``p`` from the
    group sums: ``dx = rstd * g*dy + h * (x - mean) + c`` in the form of
    ``_p_apply`` with ``a = 0``, ``e = rstd`` and ``(h, c)`` from
    :func:`normkit.backend.protocol.dx_coefficients`.  Pass ``n = inf``
    for fixed statistics (the sums then drop out).
    """
    for k in range(k0, k1):
        rs = rstd_p[k]
        h, c = _dx_coefficients(rs, sums[k, 0], sums[k, 1], n, centered)
        coef[k, COEF_MEAN] = mean_p[k]
        coef[k, COEF_A] = 0.0
        coef[k, COEF_H] = h
        coef[k, COEF_E] = rs
        coef[k, COEF_C] = c


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def backward_coefficients(sums, n, mean, rstd, centered):
    """Table ``(P, K, 5)`` of :func:`finish_backward_p` for every ``p``;
    ``sums`` is ``(P, K, 2)``."""
    P, K = mean.shape
    coef = np.empty((P, K, N_COEF))
    for p in range(P):
        finish_backward_p(sums[p], n, mean[p], rstd[p], coef[p], 0, K,
                          centered)
    return coef


#: Bytes a row must hold for ``_rows_backward`` to sum two rows at
#: once, which halves the float64 updates of the affine sums per column.
#: Shorter rows ran faster one at a time, longer ones two at a time
#: (LayerNorm backward over 16 MiB of rows of 512 to 4096 values in
#: float16, bfloat16 or float32, both threads, the two ways alternating, 3
#: runs each: float16 rows of 1024 took 4.9-5.6 ms two at a time and
#: 3.7-3.8 one at a time, rows of 2048 3.3-3.6 and 3.7-3.8; float32 rows
#: of 512 4.6-5.1 and 3.2, rows of 1024 3.2-3.3 and 3.5-3.8).  That held
#: with the two rows :data:`PAIR_DISTANCE` apart: old (one row at a time)
#: and new (two from 1024 bytes) checkouts in one process, alternating
#: (medians of 11, three rounds, freed memory kept), new over old time of
#: the backward with weight and bias: float32 ``(16384, 512)`` 1.04 to
#: 1.05, float16 1.09, bfloat16 ``(8192, 1024)`` 1.07 to 1.10.
#:
#: Without affine sums (no weight and no bias) there is nothing for two
#: rows at a time to halve, and rows go one at a time whatever their
#: width.  The same comparison, the old taking neighbouring rows two at a
#: time from 4096 bytes, new over old time of the backward without affine
#: parameters: LayerNorm float32 ``(8192, 1024)`` 0.70 to 0.94, ``(2048,
#: 4096)`` 0.91 to 0.94, float64 ``(8192, 1024)`` 0.83 to 0.90, float16
#: ``(2048, 4096)`` 0.83 to 0.88, bfloat16 0.87 to 0.89; RMSNorm float32
#: ``(8192, 1024)`` 0.66 to 0.67; in cache, ``(64, 1024)`` 1.01 to 1.02
#: (an unchanged copy against the old: 0.99 to 1.04).
PAIRED_ROW_BYTES = 4096


@_kernel
def backward_fused(dy, x, dx, P, A, K, J, B, plan, mean, rstd, gscale,
                   part_affine, centered):
    """Backward of batch-statistics normalization, group by group in cache,
    centered or not (``mean`` then zero, as for
    :func:`finish_backward_p`).

    Valid only for plans whose items hold whole groups.  Writes ``dx`` and
    adds the items' ``(sum dy, sum dy*xhat)`` into the partials of
    ``part_affine``, zero on entry: one per item, or one in all where the
    items' columns are disjoint (:func:`~normkit.backend.plan.affine_slots`),
    then their totals into the first (``_affine_totals``): here, not
    by NumPy after the call, where caches that the kernel has left cold
    made its sum cost tens of microseconds (tiny backwards right after a
    copy of 25.7 MB took about 10 to 20 us less).
    """
    L = J * B
    n = float(A * L)
    no_beta = gscale[:0]
    n_slots = part_affine.shape[0]
    for item in prange(_n_items(plan)):
        p0, p1, r, _ = _item_bounds(item, P, A, K, L, plan)
        sums = np.empty((K, 2))
        coef = np.empty((K, N_COEF))
        affine = part_affine[item % n_slots]
        if A == 1 and K == 1 and B == 1:
            _rows_backward(dy, x, dx, p0, p1, J, mean, rstd, gscale, affine,
                           sums, coef, no_beta, centered)
            continue
        scratch = np.empty(3 * K * J if _narrow_groups(J, B) else 0)
        x_scratch = _map_scratch(x, K, J, B)
        defaults = _param_defaults(gscale, no_beta)
        step = _group_step(r, L, B)
        for p in range(p0, p1):
            for first in range(r[2], r[3], step):
                g = _groups(r, first, step)
                _p_reduce(dy, x, p, g, A, K, J, B, mean[p], rstd[p],
                          gscale, sums, affine, scratch, defaults)
                finish_backward_p(sums, n, mean[p], rstd[p], coef, g[2], g[3],
                                  centered)
                _p_apply(x, dy, dx, True, p, g, A, K, J, B, coef,
                         gscale, no_beta, x_scratch, defaults)
    _affine_totals(part_affine)


@_inner
def _rows_backward(dy, x, dx, p0, p1, width, mean, rstd, gscale, affine,
                   sums, coef, no_beta, centered):
    """:func:`backward_fused` over whole rows ``[p0, p1)`` of ``width``
    values, one group each (``A == K == B == 1``), as :func:`_step_moments`
    is for the forward: row by row (:func:`_rows_backward_single`), or two
    rows at a time (:func:`_rows_backward_paired`) where there are affine
    sums and a row holds :data:`PAIRED_ROW_BYTES` or more.  Each is its
    own compiled function: with both loops in one, the row-by-row loop ran
    as slowly as two rows at a time (float16 rows of 1024: 4.4-4.5 ms
    against 3.6-3.7).

    The rows' affine sums (``affine``: two rows of ``width``, float64, or
    no columns) go into the two vectors of :func:`_affine_block`
    (``block_dy``, ``block_dyx``)."""
    block_dy, block_dyx = _affine_block(affine, x)
    defaults = _param_defaults(gscale, no_beta)
    if block_dy.size > 0 and width * x.itemsize >= PAIRED_ROW_BYTES:
        _rows_backward_paired(dy, x, dx, p0, p1, width, mean, rstd, gscale,
                              affine, block_dy, block_dyx, sums, coef,
                              no_beta, centered, defaults)
    else:
        _rows_backward_single(dy, x, dx, p0, p1, width, mean, rstd, gscale,
                              affine, block_dy, block_dyx, sums, coef,
                              no_beta, centered, defaults)


@_uncounted
def _rows_backward_single(dy, x, dx, p0, p1, width, mean, rstd, gscale,
                          affine, block_dy, block_dyx, sums, coef, no_beta,
                          centered, defaults):
    """:func:`_rows_backward` row by row: each row's sums by
    :func:`_reduce_segment`, then its ``dx`` (:func:`_row_dx`)."""
    with_affine = block_dy.size > 0
    for p in range(p0, p1):
        lo = p * width
        s1, s2 = _reduce_segment(x[lo:lo + width], dy[lo:lo + width],
                                 mean[p, 0], rstd[p, 0], gscale, block_dy,
                                 block_dyx, with_affine, defaults)
        _row_dx(x, dy, dx, p, width, s1, s2, mean, rstd, gscale, sums, coef,
                no_beta, centered, defaults)
        if with_affine and ((p + 1 - p0) % AFFINE_BLOCK_ROWS == 0
                            or p + 1 == p1):
            _add_affine_block(block_dy, block_dyx, affine)


#: Rows between the two rows that ``_rows_backward_paired`` sums at once:
#: a block of twice this many rows is taken as two runs side by side, row
#: ``j`` of the first with row ``j`` of the second.  The sums of rows of
#: 1024 float32 values with their affine sums, both threads over 8192 rows
#: (the kernel's loop called from a scratch parallel loop, medians of 15,
#: four rounds), took 2.72 to 2.79 ms for neighbouring rows, 2.34 to 2.46
#: two rows apart, 2.16 to 2.26 four apart, 1.94 to 2.04 sixteen apart and
#: 1.85 to 1.96 from 64 rows apart on; row by row 2.29 to 2.38.  Old
#: (neighbouring rows) and new checkouts in one process, alternating
#: (medians of 11, three rounds, freed memory kept), new over old time of
#: the backward with weight and bias: LayerNorm float32 ``(8192, 1024)``
#: 0.81 to 0.82, ``(2048, 4096)`` 0.89 to 0.90, float64 ``(8192, 1024)``
#: 0.91 to 0.93; RMSNorm float32 ``(8192, 1024)`` 0.86 to 0.89 (an
#: unchanged copy against the old: 0.97 to 1.03).
PAIR_DISTANCE = 32


@_uncounted
def _rows_backward_paired(dy, x, dx, p0, p1, width, mean, rstd, gscale,
                          affine, block_dy, block_dyx, sums, coef, no_beta,
                          centered, defaults):
    """:func:`_rows_backward` two rows at a time, where there are affine
    sums: their sums by :func:`_reduce_segment_pair` (a block's odd row
    left over by :func:`_reduce_segment`), then each row's ``dx``
    (:func:`_row_dx`).

    The two rows are :data:`PAIR_DISTANCE` rows apart, not neighbours:
    the sums of two neighbouring rows, which read memory in two runs one
    row apart, took about twice as long as the same rows' sums one at a
    time (without affine sums, 8192 rows of 1024 float32 values on both
    threads: 2.6 to 2.9 ms against 1.2 to 1.6)."""
    in_block = 0  # rows in the affine block sums since they were added
    for b0 in range(p0, p1, 2 * PAIR_DISTANCE):
        n = min(p1 - b0, 2 * PAIR_DISTANCE)
        half = (n + 1) // 2
        for p in range(b0, b0 + half):
            lo = p * width
            xs = x[lo:lo + width]
            ds = dy[lo:lo + width]
            q = p + half
            if q < b0 + n:
                hi = q * width
                s1, s2, s1_other, s2_other = _reduce_segment_pair(
                    xs, ds, x[hi:hi + width], dy[hi:hi + width], mean[p, 0],
                    rstd[p, 0], mean[q, 0], rstd[q, 0], gscale, block_dy,
                    block_dyx, True, defaults)
                _row_dx(x, dy, dx, q, width, s1_other, s2_other, mean, rstd,
                        gscale, sums, coef, no_beta, centered, defaults)
                in_block += 2
            else:
                s1, s2 = _reduce_segment(xs, ds, mean[p, 0], rstd[p, 0],
                                         gscale, block_dy, block_dyx, True,
                                         defaults)
                in_block += 1
            _row_dx(x, dy, dx, p, width, s1, s2, mean, rstd, gscale, sums,
                    coef, no_beta, centered, defaults)
            # at most AFFINE_BLOCK_ROWS rows per block, two added at a time
            if in_block >= AFFINE_BLOCK_ROWS - 1:
                _add_affine_block(block_dy, block_dyx, affine)
                in_block = 0
    if in_block > 0:
        _add_affine_block(block_dy, block_dyx, affine)


def _affine_block(affine, x):
    """The two vectors in which :func:`_rows_backward` adds up its rows'
    affine sums over storage ``x``, for :func:`_add_affine_block` to add
    into the float64 ``affine[0]`` and ``affine[1]`` every
    :data:`AFFINE_BLOCK_ROWS` rows (usable inside kernels).

    For 16-bit storage, zeroed float32 vectors (the type of
    :func:`~normkit.backend.storage.product_zero`), whose column updates
    vectorise twice as wide as float64 ones; for float32 and float64
    storage, whose products are float64 already, ``affine``'s own rows:
    a float64 block added into float64 sums only read and wrote two more
    vectors of the rows' width every 32 rows."""
    zero = product_zero(x)
    if zero.itemsize == affine.itemsize:
        return affine[0], affine[1]
    return np.full(affine.shape[1], zero), np.full(affine.shape[1], zero)


@overload(_affine_block)
def _affine_block_impl(affine, x):
    zero = product_zero(np.empty(0, as_dtype(x.dtype)))
    if zero.itemsize == as_dtype(affine.dtype).itemsize:
        return lambda affine, x: (affine[0], affine[1])

    def impl(affine, x):
        return (np.full(affine.shape[1], zero), np.full(affine.shape[1], zero))
    return impl


@_inlined
def _add_affine_block(block_dy, block_dyx, affine):
    """Adds a block's affine sums ``block_dy`` and ``block_dyx`` into the
    float64 ``affine[0]`` and ``affine[1]``, and zeroes them; nothing where
    the block is ``affine``'s own rows (:func:`_affine_block`)."""
    if block_dy.itemsize == affine.itemsize:
        return
    for c in range(block_dy.size):
        affine[0, c] += block_dy[c]
        affine[1, c] += block_dyx[c]
        block_dy[c] = 0.0
        block_dyx[c] = 0.0


@_inlined
def _row_dx(x, dy, dx, p, width, s1, s2, mean, rstd, gscale, sums, coef,
            no_beta, centered, defaults):
    """``dx`` of row ``p`` from its sums ``(s1, s2)``: the coefficients of
    :func:`finish_backward_p` (into the one-group tables ``sums`` and
    ``coef``), then :func:`_map_segment` (``defaults`` for it)."""
    sums[0, 0] = s1
    sums[0, 1] = s2
    finish_backward_p(sums, float(width), mean[p], rstd[p], coef, 0, 1,
                      centered)
    m, a, h, e, c = _coefficients(coef, 0)
    mc, a_x, h_x, e_x, q_x, w_x = _wide_coefficients(m, a, h, e, c,
                                                     compute_zero(x))
    lo = p * width
    _map_segment(x[lo:lo + width], dy[lo:lo + width], dx[lo:lo + width],
                 True, gscale, no_beta, mc, a_x, h_x, e_x, q_x, w_x,
                 defaults)


# --------------------------------------------------------------------------
# two-pass drivers: one compiled call where statistics span work items
# --------------------------------------------------------------------------
#
# Where a group is split across items (BatchNorm), its statistics are only
# complete once every item has finished, so a pass takes two kernel
# launches with a merge between them.  These drivers make that one call
# from Python: for a small input, the Python between the launches
# (allocations, the merge, the coefficients, argument typing for each
# launch) cost about a third of the pass.

_driver = njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")


@_driver
def moments_of(x, P, A, K, J, B, plan, centered):
    """``(mean, var)`` of shape ``(P, K)``: :func:`moments_kernel` over
    ``plan``, then their merge in chunk order (:func:`merge_partials`,
    whose ``centered`` this is; a mean square that comes out NaN is
    summed again, ``_plain_mean_square``)."""
    part = np.empty((P, _n_chunks(plan), K, 3))
    moments_kernel(x, P, A, K, J, B, plan, part)
    mean, var = _merge(part, centered)
    if not centered:
        for p in range(P):
            for k in range(K):
                if np.isnan(var[p, k]):
                    var[p, k] = _plain_mean_square(x, p, k, A, K, J, B)
    return mean, var


@_driver
def normalize_two_pass(x, out, P, A, K, J, B, plan, gamma, beta, eps,
                       centered):
    """:func:`moments_of`, then ``out = (x - mean) * rstd * gamma + beta``
    by :func:`apply`, ``rstd = 1 / sqrt(var + eps)``; returns ``(mean,
    var, rstd)``."""
    mean, var = moments_of(x, P, A, K, J, B, plan, centered)
    coef = np.empty((P, K, N_COEF))
    rstd = np.empty((P, K))
    for p in range(P):
        for k in range(K):
            center, alpha = own_statistics(p, k, K, mean[p, k], var[p, k], eps,
                                           rstd, rstd)
            _forward_coefficients(coef[p], k, center, alpha)
    apply(x, x[:0], out, P, A, K, J, B, plan, coef, gamma, beta)
    return mean, var, rstd


@_driver
def backward_sums_of(dy, x, P, A, K, J, B, plan, mean, rstd, gscale,
                     part_group, part_affine):
    """Group sums ``(P, K, 2)`` and affine sums ``(2, K * J)`` (``(2, 0)``
    when ``part_affine`` has no columns) of :func:`backward_reduce` over
    ``plan`` into the caller's partials (``part_affine`` zero: made with
    ``np.zeros``, whose pages the system hands out zeroed, not written
    twice), each summed in item and chunk order, the affine sums in place
    in ``part_affine[0]``."""
    backward_reduce(dy, x, P, A, K, J, B, plan, mean, rstd, gscale,
                    part_group, part_affine)
    return _group_totals(part_group), _affine_totals(part_affine)


@_inner
def _affine_totals(part_affine):
    """The affine sums ``(2, K * J)`` from their per-slot partials ``(slots,
    2, K * J)``, added in slot order into ``part_affine[0]``, which is
    returned."""
    affine = part_affine[0]
    for slot in range(1, part_affine.shape[0]):
        affine += part_affine[slot]
    return affine


@_inner
def _group_totals(part_group):
    """Group sums ``(P, K, 2)`` from their per-chunk partials, in chunk
    order."""
    P, n_chunks, K, _ = part_group.shape
    group = np.zeros((P, K, 2))
    for p in range(P):
        for chunk in range(n_chunks):
            group[p] += part_group[p, chunk]
    return group


@_driver
def column_sums_of(dy, x, P, A, K, J, B, plan, mean, rstd, gscale,
                   part_group, sum_dy_out, sum_dyx_out):
    """Group sums ``(P, K, 2)`` of :func:`backward_reduce_columns` over
    ``plan``, which writes the affine sums into ``sum_dy_out`` and
    ``sum_dyx_out``."""
    backward_reduce_columns(dy, x, P, A, K, J, B, plan, mean, rstd, gscale,
                            part_group, sum_dy_out, sum_dyx_out)
    return _group_totals(part_group)


@_inner
def _dx_pass(x, dy, dx, P, A, K, J, B, plan, group, mean, rstd, gscale,
             no_beta, batch_stats, centered):
    """``dx`` into ``dx`` by :func:`apply` over ``plan`` from the group
    sums ``(P, K, 2)`` (ignored, ``dx = g * dy * rstd``, without
    ``batch_stats``)."""
    n = float(A * J * B)
    if not batch_stats:
        group[:] = 0.0
        n = np.inf
    coef = backward_coefficients(group, n, mean, rstd, centered)
    apply(x, dy, dx, P, A, K, J, B, plan, coef, gscale, no_beta)


@_driver
def backward_two_pass(dy, x, dx, P, A, K, J, B, plan, sums_plan, part_group,
                      part_affine, mean, rstd, gscale, no_beta, batch_stats,
                      centered):
    """``dx`` of a normalization into ``dx`` from :func:`backward_sums_of`
    over ``sums_plan`` (into ``part_group``, ``part_affine``) and
    :func:`apply` over ``plan``; returns the affine sums.  Without
    ``batch_stats`` the statistics were fixed (``dx = g * dy * rstd``):
    the group sums drop out, and no sums are computed unless
    ``part_affine`` has columns."""
    if batch_stats or part_affine.shape[2] > 0:
        group, affine = backward_sums_of(dy, x, P, A, K, J, B, sums_plan,
                                         mean, rstd, gscale, part_group,
                                         part_affine)
    else:
        group, affine = np.zeros((P, K, 2)), part_affine[0]
    _dx_pass(x, dy, dx, P, A, K, J, B, plan, group, mean, rstd, gscale,
             no_beta, batch_stats, centered)
    return affine


@_driver
def backward_columns(dy, x, dx, P, A, K, J, B, plan, sums_plan, part_group,
                     sum_dy_out, sum_dyx_out, mean, rstd, gscale, no_beta,
                     batch_stats, centered):
    """:func:`backward_two_pass` for a ``sums_plan`` of
    :func:`~normkit.backend.plan.column_sums`: the sums by
    :func:`column_sums_of`, the affine ones written into ``sum_dy_out``
    and ``sum_dyx_out`` (no values: not wanted)."""
    if batch_stats or sum_dy_out.size > 0:
        group = column_sums_of(dy, x, P, A, K, J, B, sums_plan, mean, rstd,
                               gscale, part_group, sum_dy_out, sum_dyx_out)
    else:
        group = np.zeros((P, K, 2))
    _dx_pass(x, dy, dx, P, A, K, J, B, plan, group, mean, rstd, gscale,
             no_beta, batch_stats, centered)


# --------------------------------------------------------------------------
# the protocol (normkit.backend.protocol.Backend) for NumPy arrays
# --------------------------------------------------------------------------

def as_kernel_array(x):
    """Flat, C-contiguous data for the kernels: 16-bit floats as their bits
    (:func:`normkit.backend.storage.storage_view`); no copy unless ``x`` is
    not C-contiguous."""
    return storage_view(x)


def from_kernel_array(flat, shape, dtype):
    """A kernel result (storage of :func:`as_kernel_array`) as an array of
    the caller's ``shape`` and ``dtype``, without a copy."""
    if flat.dtype is not dtype:  # 16-bit storage
        flat = flat.view(dtype)
    return flat.reshape(shape)


def _output(out, flat):
    """The flat array a kernel writes its result into: the caller's ``out``
    itself (its storage, :func:`as_kernel_array`) when it is C-contiguous
    with the input's dtype, else a new array like ``flat``;
    :func:`_deliver` copies the latter into ``out``.  ``out`` may be the
    input itself: the elementwise kernels read and write each position
    once, in that order."""
    if out is not None and out.flags.c_contiguous:
        target = as_kernel_array(out)
        if target.dtype == flat.dtype:
            return target
    return np.empty_like(flat)


def _deliver(result, out, shape, dtype):
    """A kernel's flat ``result`` as the caller's array: ``out`` (written
    by the kernel, or copied into) or, without ``out``,
    :func:`from_kernel_array`."""
    if out is None:
        return from_kernel_array(result, shape, dtype)
    # result is either out's own storage or a new array (:func:`_output`),
    # so sharing memory at all means the kernel wrote into out
    if result.size and np.may_share_memory(result, out):
        return out
    np.copyto(out, from_kernel_array(result, shape, dtype), casting="unsafe")
    return out


def _params(values, size, x_storage):
    """Per-column parameters as a flat ``(size,)`` array the kernels read
    with :func:`~normkit.backend.storage.load`: as they are (no copy) when
    their storage is that of the input's kernel array ``x_storage``, else
    converted to the input's compute dtype; for None, an empty array of
    that storage (the kernels then use 1 for a scale, 0 for a shift).

    Two types per input storage at most (its own, its compute dtype) keep
    the kernels' specializations (and their compilation) few.
    """
    if values is None:
        return np.empty(0, x_storage.dtype)
    if (type(values) is np.ndarray and values.dtype is x_storage.dtype
            and values.flags.c_contiguous):  # the common case, without a call
        return values.reshape(size)
    values = np.asarray(values)
    stored = storage_view(values)
    if stored.dtype == x_storage.dtype:
        return stored.reshape(size)
    return np.ascontiguousarray(
        values, dtype=compute_dtype(x_storage.dtype)).reshape(size)


def _affine_params(gamma, beta, size, x_storage):
    """``gamma`` and ``beta`` through :func:`_params`, a missing one's
    empty array typed like the other (one specialization for the pair)."""
    gamma = _params(gamma, size, x_storage)
    beta = _params(beta, size, x_storage)
    if gamma.size == 0:
        gamma = np.empty(0, beta.dtype)
    elif beta.size == 0:
        beta = np.empty(0, gamma.dtype)
    return gamma, beta


def _rows(values, view):
    """Per-group values (``P * K`` or ``K`` of them) as ``(P, K)`` float64."""
    values = np.asarray(values, np.float64)
    if values.size == view.P * view.K:
        return values.reshape(view.P, view.K)
    return np.broadcast_to(values.reshape(1, view.K), (view.P, view.K))


def _no_values(view):
    """True for a view with a zero dimension: the kernels are not run for
    it (results are empty, statistics NaN, sums zero)."""
    return 0 in view.dims


def moment_partials(x, view):
    """See :meth:`normkit.backend.protocol.Backend.moment_partials`."""
    if _no_values(view):  # one chunk of count 0 per group
        return np.zeros((view.P, 1, view.K, 3))
    flat = as_kernel_array(x)
    plan = make_plan(view)
    part = np.empty((view.P, plan.n_chunks, view.K, 3))
    moments_kernel(flat, *view.dims, tuple(plan), part)
    return part


def merge_partials(partials, centered=True):
    """See :meth:`normkit.backend.protocol.Backend.merge_partials`."""
    return _merge(np.ascontiguousarray(partials, np.float64), centered)


def moments(x, view, centered=True):
    """Per-group mean and biased variance (see
    :func:`normkit.engine.moments`)."""
    if _no_values(view):
        return merge_partials(moment_partials(x, view), centered)
    return moments_of(as_kernel_array(x), *view.dims, tuple(make_plan(view)),
                      centered)


def apply_affine(x, view, mean, alpha, gamma=None, beta=None, out=None):
    """See :meth:`normkit.backend.protocol.Backend.apply_affine`."""
    if _no_values(view):
        return np.empty(x.shape, x.dtype) if out is None else out
    flat = as_kernel_array(x)
    plan = make_plan(view)
    coef = np.zeros((view.P, view.K, N_COEF))
    coef[..., COEF_MEAN] = _rows(mean, view)
    coef[..., COEF_A] = _rows(alpha, view)
    y = _output(out, flat)
    kj = view.K * view.J
    apply(flat, flat[:0], y, *view.dims, tuple(plan), coef,
          *_affine_params(gamma, beta, kj, flat))
    return _deliver(y, out, x.shape, x.dtype)


def normalize_batch(x, view, gamma=None, beta=None, eps=1e-5, centered=True,
                    out=None):
    """See :meth:`normkit.backend.protocol.Backend.normalize_batch`."""
    if _no_values(view):
        mean, var = moments(x, view, centered)
        return ((np.empty(x.shape, x.dtype) if out is None else out), mean,
                var, protocol.inverse_std(var, eps).reshape(var.shape))
    flat = as_kernel_array(x)
    plan = make_plan(view)
    gamma, beta = _affine_params(gamma, beta, view.K * view.J, flat)
    y = _output(out, flat)
    if plan.fused:
        mean = np.empty((view.P, view.K))
        var = np.empty((view.P, view.K))
        rstd = np.empty((view.P, view.K))
        forward_fused(flat, y, *view.dims, tuple(plan), gamma, beta, float(eps),
                      bool(centered), mean, var, rstd)
    else:
        mean, var, rstd = normalize_two_pass(
            flat, y, *view.dims, tuple(plan), gamma, beta, float(eps),
            bool(centered))
    return _deliver(y, out, x.shape, x.dtype), mean, var, rstd


def normalize_transformed(x, view, transform, args, gamma=None, beta=None,
                          centered=True, out=None):
    """See :meth:`normkit.backend.protocol.Backend.normalize_transformed`:
    where the plan is fused, one pass whose items call the transform per
    group between their moments and their map (:func:`forward_item`, in
    a kernel compiled for the transform, ``_transformed_kernel``)."""
    plan = make_plan(view)
    if _no_values(view) or not plan.fused:
        return protocol.normalize_in_steps(sys.modules[__name__], x, view,
                                           transform, args, gamma, beta,
                                           centered, out)
    P, K = view.P, view.K
    flat = as_kernel_array(x)
    gamma, beta = _affine_params(gamma, beta, K * view.J, flat)
    y = _output(out, flat)
    table = np.empty((len(args), P * K))
    for row, a in zip(table, args):
        row[:] = a if protocol.is_number(a) else _flat_float(a)
    mean = np.empty((P, K))
    var = np.empty((P, K))
    results = np.empty((transform.outputs, P * K))
    _transformed_kernel(transform)(flat, y, *view.dims, tuple(plan), gamma,
                                   beta, bool(centered), mean, var, table,
                                   results)
    return (_deliver(y, out, x.shape, x.dtype), mean, var,
            tuple(results.reshape(transform.outputs, P, K)))


def _backward_inputs(dy, x, view, mean, rstd, gscale, centered):
    flat_x = as_kernel_array(x)
    flat_dy = as_kernel_array(dy)
    rstd = np.ascontiguousarray(_rows(rstd, view))
    mean = (np.ascontiguousarray(_rows(mean, view)) if centered
            else np.zeros_like(rstd))
    gscale = _params(gscale, view.K * view.J, flat_x)
    return flat_x, flat_dy, mean, rstd, gscale


def _sums_partials(view, plan, need_affine=True):
    """The partials :func:`backward_sums_of` fills over ``plan`` (a
    :func:`~normkit.backend.plan.reduction_plan`): ``(P, chunks, K, 2)``
    group sums and zeroed ``(slots, 2, K * J)`` affine sums (no columns
    unless ``need_affine``), one slot where the items' columns are
    disjoint, else one per item."""
    return (_group_partials(view, plan),
            np.zeros((affine_slots(plan, view), 2,
                      view.K * view.J if need_affine else 0)))


def _group_partials(view, plan):
    """The ``(P, chunks, K, 2)`` partials of the group sums over ``plan``."""
    return np.empty((view.P, plan.n_chunks, view.K, 2))


def _writes_in_place(affine_out):
    """Whether :func:`backward_reduce_columns` can write the affine sums
    into the caller's ``affine_out`` itself: both C-contiguous, of one
    dtype."""
    return (affine_out is not None
            and affine_out[0].dtype == affine_out[1].dtype
            and affine_out[0].flags.c_contiguous
            and affine_out[1].flags.c_contiguous)


def backward_sums(dy, x, view, mean, rstd, gscale=None, centered=True):
    """See :meth:`normkit.backend.protocol.Backend.backward_sums`: the group
    sums as two ``(P, K)`` arrays, the affine sums as two ``(K*J,)``."""
    if _no_values(view):  # sums over no values
        kj = view.K * view.J
        return ((np.zeros((view.P, view.K)), np.zeros((view.P, view.K))),
                (np.zeros(kj), np.zeros(kj)))
    flat_x, flat_dy, mean, rstd, gscale = _backward_inputs(
        dy, x, view, mean, rstd, gscale, centered)
    plan = reduction_plan(view)
    if column_sums(plan, view):
        affine = np.empty((2, view.K * view.J))
        group = column_sums_of(flat_dy, flat_x, *view.dims, tuple(plan),
                               mean, rstd, gscale, _group_partials(view, plan),
                               affine[0], affine[1])
    else:
        group, affine = backward_sums_of(flat_dy, flat_x, *view.dims,
                                         tuple(plan), mean, rstd, gscale,
                                         *_sums_partials(view, plan))
    return (group[..., 0], group[..., 1]), (affine[0], affine[1])


def dx_from_sums(dy, x, view, mean, rstd, gscale, group_sums, n, centered=True,
                 out=None):
    """See :meth:`normkit.backend.protocol.Backend.dx_from_sums`;
    ``group_sums`` is the pair of ``(P, K)`` arrays of :func:`backward_sums`."""
    if _no_values(view):
        return np.empty(x.shape, x.dtype) if out is None else out
    flat_x, flat_dy, mean, rstd, gscale = _backward_inputs(
        dy, x, view, mean, rstd, gscale, centered)
    sums = np.stack([_rows(s, view) for s in group_sums], axis=-1)
    coef = backward_coefficients(sums, float(n), mean, rstd, centered)
    dx = _output(out, flat_x)
    apply(flat_x, flat_dy, dx, *view.dims, tuple(make_plan(view)), coef,
          gscale, np.empty(0, gscale.dtype))
    return _deliver(dx, out, x.shape, x.dtype)


def _backward_takes_whole_samples(flat_x, view):
    """Whether :func:`backward`'s plan may take chunks of whole samples
    where the forward's does (two passes in memory order), rather than
    blocks of groups (one fused pass each): for 16-bit storage, and for
    float32 without ghost batches (``P == 1``).

    Measured on the AMD EPYC (Zen 4), old and new checkouts alternating
    in one process (medians of 15), new over old time of the forward and
    backward.  16-bit: whole samples 0.60 to 0.95 of the blocks' time
    over channels-first BatchNorm.  float32 blocks were faster until the
    map of such chunks went in memory order (``_map_rows_of_segments``:
    1.01 to 1.21 before); after it, three to six rounds, BatchNorm
    ``(32, 64, 56, 56)`` 0.90 to 0.95 (1.26 in one round of six), ``(16,
    64, 56, 56)`` 0.88 to 0.93, ``(32, 128, 28, 28)`` 0.82 to 0.89,
    ``(32, 256, 14, 14)`` 0.81 to 0.89, ``(32, 512, 14, 14)`` 0.85 to
    0.94, ``(8, 256, 28, 28)`` 0.84 to 0.89, Batch Renormalization
    ``(32, 64, 56, 56)`` 0.83 to 1.00, but Ghost BatchNorm there (ghost
    batches of 8) 0.81 to 1.17, above 1 in five rounds of six, and float64
    BatchNorm 1.01 to 1.02."""
    return flat_x.itemsize == 2 or (flat_x.itemsize == 4 and view.P == 1)


#: Most bytes of one thread's partials of the affine sums where a backward
#: over rows takes one block of rows per thread (``_thread_blocks_pay``).
THREAD_PARTIAL_BYTES = 1 << 22

#: Fewest rows per thread for such a backward.
THREAD_BLOCK_ROWS = 16


def _thread_blocks_pay(flat_x, view, n_threads):
    """Whether the backward over ``view``, rows of one group each (``A ==
    K == B == 1``: LayerNorm, RMSNorm) whose :func:`make_plan` blocks have
    partials of the affine sums too large (``affine_partials_fit``), is
    fused over :func:`~normkit.backend.plan.thread_blocks` (one block of
    rows per thread, ``n_threads`` partials) rather than taken in two passes
    (the sums over columns, :func:`~normkit.backend.plan.reduction_plan`,
    then ``dx``): where each thread has :data:`THREAD_BLOCK_ROWS` rows or
    more and its partials (two float64 per column, and the two of the type
    of :func:`_affine_block` for 16-bit storage) take at most
    :data:`THREAD_PARTIAL_BYTES`.

    The two passes read the input twice from memory; the fused pass reads
    each row once and adds it into the thread's partials, but zeroes
    them, adds them up and writes the gradients from them on one thread.
    Measured on the AMD EPYC (Zen 4), two threads, old (two passes) and
    new checkouts in one process, alternating (medians of 11, three
    rounds, freed memory kept, an unchanged copy within 0.96 to 1.03 of
    the old), new over old time of the API's backward with weight and
    bias, by rows per thread: float32 ``(512, 16384)`` 0.66 to 0.67
    (256), ``(256, 25088)`` 0.74 to 0.76 (128), ``(128, 65536)`` 0.72 to
    0.75 (64), LayerNorm over ``(64, 56, 56)`` of 32 samples 0.95 to 0.97
    (16; 0.87 to 0.90 in a run before); RMSNorm ``(64, 65536)`` 0.93 to
    0.95; float64 ``(32, 131072)`` 0.91; float16 ``(64, 25088)`` 0.88 to
    0.89 (32), ``(48, 65536)`` 0.98 to 0.99 (24), ``(32, 131072)`` 1.01
    to 1.04 (16); bfloat16 ``(32, 65536)`` 0.87 to 0.89.  With fewer rows
    per thread (the same code without this bound) the fused pass was
    slower: float32 ``(24, 200704)`` 0.99 to 1.07 and ``(24, 65536)``
    1.04 to 1.11 (12), ``(16, 262144)`` 1.10 to 1.21 (8), ``(8, 65536)``
    1.11 to 1.13 (4); float64 ``(16, 131072)`` 1.01 to 1.07 (8), ``(8,
    131072)`` 1.14 to 1.22 (4)."""
    P, A, K, J, B = view.dims
    if (A, K, B) != (1, 1, 1) or P < THREAD_BLOCK_ROWS * n_threads:
        return False
    gathered = product_zero(flat_x).itemsize
    per_column = 16 + (2 * gathered if gathered < 8 else 0)
    return per_column * J <= THREAD_PARTIAL_BYTES


def _backward_plan(flat_x, view, batch_stats, need_affine):
    """The plan of :func:`backward` and whether it is fused (each item's
    sums and ``dx`` in one pass, :func:`backward_fused`): with
    ``batch_stats``, where its items hold whole groups and, with
    ``need_affine``, the partials of the affine sums fit
    (``affine_partials_fit``) or, over rows, one block per thread pays
    (``_thread_blocks_pay``)."""
    plan = make_plan(view,
                     whole_samples=_backward_takes_whole_samples(flat_x, view))
    if not (batch_stats and plan.fused):
        return plan, False
    if not need_affine or affine_partials_fit(plan, view):
        return plan, True
    n_threads = thread_count()
    if _thread_blocks_pay(flat_x, view, n_threads):
        return thread_blocks(view, n_threads), True
    return plan, False


def backward(dy, x, view, mean, rstd, gscale=None, batch_stats=True,
             need_affine=True, centered=True, out=None, affine_out=None):
    """See :meth:`normkit.backend.protocol.Backend.backward`.  Where the
    sums' plan is :func:`~normkit.backend.plan.column_sums` (few wide
    rows), the kernels write the affine sums straight into ``affine_out``
    (when both its arrays are C-contiguous, of one dtype) and return its
    arrays; the fused pass writes its float64 totals there
    (``_store_sums``) under the same condition; elsewhere they return
    float64 sums.

    Its plan (``_backward_plan``) takes whole samples where the forward's
    does only where ``_backward_takes_whole_samples``; elsewhere it keeps
    blocks of groups (``make_plan(view, whole_samples=False)``): one fused
    pass of sums and ``dx`` per block."""
    kj = view.K * view.J
    if _no_values(view):
        dx = np.empty(x.shape, x.dtype) if out is None else out
        return ((dx, np.zeros(kj), np.zeros(kj)) if need_affine
                else (dx, None, None))
    flat_x, flat_dy, mean, rstd, gscale = _backward_inputs(
        dy, x, view, mean, rstd, gscale, centered)
    plan, fused = _backward_plan(flat_x, view, batch_stats, need_affine)
    dx = _output(out, flat_x)
    no_beta = np.empty(0, gscale.dtype)
    written = None  # affine_out, where the kernels wrote the sums into it
    if fused:
        part_affine = np.zeros((affine_slots(plan, view), 2,
                                kj if need_affine else 0))
        backward_fused(flat_dy, flat_x, dx, *view.dims, tuple(plan), mean, rstd,
                       gscale, part_affine, bool(centered))
        sums = part_affine[0]
        if need_affine and _writes_in_place(affine_out):
            written = affine_out
            _store_sums(sums[0], sums[1],
                        *(as_kernel_array(a) for a in affine_out), 0)
    else:
        sums_plan = reduction_plan(view)
        if column_sums(sums_plan, view):
            if need_affine and _writes_in_place(affine_out):
                written = affine_out
                sums = tuple(as_kernel_array(a) for a in affine_out)
            else:
                sums = np.empty((2, kj if need_affine else 0))
            backward_columns(flat_dy, flat_x, dx, *view.dims, tuple(plan),
                             tuple(sums_plan), _group_partials(view, sums_plan),
                             sums[0], sums[1], mean, rstd, gscale, no_beta,
                             bool(batch_stats), bool(centered))
        else:
            sums = backward_two_pass(
                flat_dy, flat_x, dx, *view.dims, tuple(plan), tuple(sums_plan),
                *_sums_partials(view, sums_plan, need_affine), mean, rstd,
                gscale, no_beta, bool(batch_stats), bool(centered))
    dx = _deliver(dx, out, x.shape, x.dtype)
    if not need_affine:
        return dx, None, None
    if written is not None:
        return dx, written[0], written[1]
    return dx, sums[0], sums[1]


# --------------------------------------------------------------------------
# per-channel arithmetic and small helpers
# --------------------------------------------------------------------------

def _compiled_loop(function, key):
    """The compiled loop of channelwise ``function`` for one pattern of
    arguments, ``key = ("cpu", scalars)`` (:func:`map_channels`, one
    element at a time) or ``("cpu-view", kinds)`` (:func:`map_view`, in
    parallel, input-sized arrays in their storage), as the CUDA backend's
    ``kernel_for``: cached on the function, and on disk where
    :func:`_loop_module` can write its source."""
    loop = function.compiled.get(key)
    if loop is None:
        ending = ""
        if key[0] == "cpu":
            # into temporaries, then out: every read precedes every write,
            # so an output may overlap any input; arrays in their storage
            # (_flat_stored), each value rounded once on the way out
            reads = [f"a{n}" if scalar else f"load(a{n}, i)"
                     for n, scalar in enumerate(key[1])]
            header = "".join(f"    t{k} = np.empty(o0.size)\n"
                             for k in range(function.outputs))
            header += "    for i in range(o0.size):\n"
            ending = "    for i in range(o0.size):\n" + "".join(
                f"        store(o{k}, i, t{k}[i])\n"
                for k in range(function.outputs))
            params, parallel, write = "", False, "t{k}[i] = {value}"
        else:
            reads = ["load(a{n}, i)".format(n=n) if kind == "full" else
                     protocol.VIEW_READS[kind].format(n=n)
                     for n, kind in enumerate(key[1])]
            header = "    for i in prange(o0.size):\n"
            params, parallel = protocol.VIEW_PARAMS, True
            write = "store(o{k}, i, {value})"
        source = protocol.loop_source(function.arity, function.outputs, reads,
                                      header, params, write) + ending
        namespace = {"f": njit(function.function, error_model="numpy"),
                     "float64": np.float64, "prange": prange, "np": np,
                     "load": load, "store": store}
        code, cache = _generated(function, source, namespace, parallel)
        loop = njit(code["loop"], error_model="numpy", parallel=parallel,
                    cache=cache)
        function.compiled[key] = loop
    return loop


def _transformed_kernel(transform):
    """The fused forward of :func:`normalize_transformed` for one
    transform: a parallel loop over the plan's items, each
    :func:`forward_item` with a ``finish`` that calls the transform on the
    group's statistics and its row of the argument table, writes every
    output to ``results`` and returns the first two.  Generated and cached
    on disk as :func:`_compiled_loop`'s loops are (the digest covers this
    backend's source, which the kernel inlines): compiling one took 12 to
    13 s per input dtype on a 2-core machine, loading it 0.3 s."""
    kernel = transform.compiled.get("cpu-transformed")
    if kernel is not None:
        return kernel
    reads = "".join(f", table[{n}, i]" for n in range(transform.arity - 2))
    writes = "".join(f"    results[{k}, i] = r[{k}]\n"
                     for k in range(transform.outputs))
    source = (
        "def finish(p, k, K, mean, var, eps, table, results):\n"
        "    i = p * K + k\n"
        f"    r = f(mean, var{reads})\n"
        f"{writes}"
        "    return r[0], r[1]\n\n\n"
        "def kernel(x, out, P, A, K, J, B, plan, gamma, beta, centered,\n"
        "           mean_out, var_out, table, results):\n"
        "    for item in prange(n_items(plan)):\n"
        "        forward_item(x, out, item, P, A, K, J, B, plan, gamma, beta,\n"
        "                     0.0, centered, mean_out, var_out, finish, table,\n"
        "                     results)\n")
    namespace = {"f": njit(transform.function, error_model="numpy"),
                 "prange": prange, "n_items": _n_items,
                 "forward_item": forward_item}
    code, cache = _generated(transform, source, namespace, True,
                             depends=(storage, protocol, sys.modules[__name__]))
    # the kernel finds finish among its globals when it is compiled
    code["finish"] = njit(code["finish"], error_model="numpy", cache=cache)
    kernel = njit(code["kernel"], cache=cache, fastmath=FASTMATH,
                  parallel=True, nogil=True, error_model="numpy")
    transform.compiled["cpu-transformed"] = kernel
    return kernel


def _generated(function, source, namespace, parallel, depends=(storage,)):
    """The globals of generated ``source`` for channelwise ``function``,
    run with ``namespace``, and whether Numba may cache what it defines on
    disk: those of the module :func:`_loop_module` runs from a file, or,
    where it has none, ``namespace`` itself with the source run in memory
    (not cached)."""
    module = _loop_module(function, source, namespace, parallel, depends)
    if module is not None:
        return vars(module), True
    exec(source, namespace)
    return namespace, False


def _loop_directory():
    """Where :func:`_loop_module` writes the source of the channelwise
    loops, for Numba to cache their machine code beside it:
    ``$NUMBA_CACHE_DIR/normkit-loops`` when that is set, else
    ``normkit/loops`` in the user's cache directory (``$XDG_CACHE_HOME``,
    default ``~/.cache``).  Files there are named by a digest of what
    they compile and may be deleted at any time."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return os.path.join(os.environ["NUMBA_CACHE_DIR"], "normkit-loops")
    cache = (os.environ.get("XDG_CACHE_HOME")
             or os.path.join(os.path.expanduser("~"), ".cache"))
    return os.path.join(cache, "normkit", "loops")


def _loop_module(function, source, namespace, parallel, depends=(storage,)):
    """The loop ``source`` of ``function`` run as a module from a file of
    :func:`_loop_directory`, with ``namespace`` as its globals, so that
    ``njit(cache=True)`` can keep its machine code on disk (compiling a
    loop takes about 0.15 s, loading it about 5 ms).  The file's name is a
    digest of the scalar function's source, the loop's, whether it is
    ``parallel``, the source of the modules it ``depends`` on, whose
    functions are compiled in (the storage module's ``load`` and
    ``store``), and Numba's version: an edited function gets a new file.
    As with Numba's own cache, the functions and globals that the scalar
    function uses are not part of the digest.  None where the
    function has no source file (typed at a prompt), closes over
    variables (their values are compiled in) or the directory cannot be
    written."""
    if function.function.__closure__ is not None:
        return None
    try:
        scalar = inspect.getsource(function.function)
    except (OSError, TypeError):
        return None
    digest = hashlib.sha256("\0".join(
        (scalar, source, str(parallel), *map(_module_source, depends),
         numba.__version__)).encode()
    ).hexdigest()[:24]
    name = f"normkit_loop_{digest}"
    module = sys.modules.get(name)
    if module is not None:
        return module
    path = os.path.join(_loop_directory(), f"{name}.py")
    try:
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            partial = f"{path}.{os.getpid()}.tmp"
            with open(partial, "w") as file:
                file.write(f"# compiled code of channelwise "
                           f"{function.__name__}, written by "
                           f"normkit.backend.cpu\n{source}")
            os.replace(partial, path)  # whole, even with writers in parallel
    except OSError:
        return None
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    module.__dict__.update(namespace)
    # Numba's cache finds a cached loop's globals through sys.modules
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=8)
def _module_source(module):
    """The source of ``module``, for loop digests."""
    return inspect.getsource(module)


def _ufunc(function, flat):
    """The float64 NumPy ufunc of a one-output channelwise function, from
    ``numba.vectorize``: cached on disk like the kernels when the function
    is defined in a file (no compilation in later processes), compiled in
    memory otherwise (a function typed at a prompt)."""
    probe = [np.zeros(1) if isinstance(a, np.ndarray) else a for a in flat]
    try:
        dufunc = vectorize(cache=True)(function.function)
        with np.errstate(all="ignore"):
            dufunc(*probe)  # compiles, or loads, the float64 loop
    except RuntimeError:  # "cannot cache function ...: no locator available"
        dufunc = vectorize(function.function)
        with np.errstate(all="ignore"):
            dufunc(*probe)
    return dufunc.ufunc


def _flat_float(a):
    """Array ``a`` as a flat float32 or float64 array, read by code that
    widens every value to float64 (:func:`map_channels`' loops, a float64
    table): itself when it is a 1-D one (float32 running statistics are
    not copied), a flat view of a float64 one where its layout allows
    (``(P, K)`` statistics), else a float64 copy."""
    if type(a) is np.ndarray:
        if a.ndim == 1 and (a.dtype is storage.FLOAT64
                            or a.dtype is storage.FLOAT32):
            return a
        if a.dtype is storage.FLOAT64:
            return a.reshape(-1)
    return np.asarray(a, np.float64).reshape(-1)


def _flat_stored(a):
    """Array ``a`` as :func:`map_channels`' loop reads it (with
    :func:`~normkit.backend.storage.load`, each value widened to
    float64): a contiguous float16 or bfloat16 one as its 16-bit storage
    (:func:`~normkit.backend.storage.storage_view`: running statistics
    kept in 16 bits are not converted by NumPy, which took 30 us for
    float16 and 70 for bfloat16 over 4096 channels), else
    :func:`_flat_float`."""
    if _contiguous_16_bit(a):
        return storage_view(a)
    return _flat_float(a)


def _contiguous_16_bit(a):
    """Whether ``a`` is a C-contiguous float16 or bfloat16 NumPy array."""
    return (type(a) is np.ndarray and a.itemsize == 2 and a.flags.c_contiguous
            and (a.dtype == np.float16 or storage.is_bfloat16(a.dtype)))


def map_channels(function, args, out):
    """Run a :class:`~normkit.backend.protocol.channelwise` function over
    host arrays of one size, in float64: a NumPy ufunc compiled by
    ``numba.vectorize`` for one output (about a microsecond per call), a
    compiled loop for several, which reads its arrays in their storage
    and writes 1-D float outputs itself (``_loop_target``; any other
    ``out`` receives a copy of its results)."""
    # one pass over the arguments: after a large kernel this code runs
    # with cold caches, where each further step costs microseconds
    stored = function.outputs > 1
    flat = []
    scalars = []
    for a in args:
        scalar = not isinstance(a, np.ndarray)
        flat.append(a if scalar else _flat_stored(a) if stored
                    else _flat_float(a))
        scalars.append(scalar)
    if function.outputs == 1:
        ufunc = function.compiled.get("cpu-ufunc")
        if ufunc is None:
            ufunc = function.compiled["cpu-ufunc"] = _ufunc(function, flat)
        with np.errstate(all="ignore"):  # 1/0 is inf, as in the kernels
            if out is None:
                return (ufunc(*flat),)
            if out[0].flags.c_contiguous:
                ufunc(*flat, out=out[0].reshape(-1))
            else:
                out[0][...] = ufunc(*flat).reshape(out[0].shape)
        return out
    loop = _compiled_loop(function, ("cpu", tuple(scalars)))
    size = flat[scalars.index(False)].size
    targets = None if out is None else [_loop_target(t, size) for t in out]
    if targets is not None and all(t is not None for t in targets):
        loop(*flat, *targets)  # through the loop's own temporaries
        return out
    results = [np.empty(size) for _ in range(function.outputs)]
    loop(*flat, *results)
    if out is None:
        return tuple(results)
    for target, result in zip(out, results):
        target[...] = result.reshape(target.shape)
    return out


def _loop_target(target, size):
    """What :func:`map_channels`' loop writes for ``target`` itself (each
    float64 result rounded once to its dtype, as NumPy's cast rounds it:
    :func:`~normkit.backend.storage.store`), or None where it cannot: a
    writeable 1-D float32 or float64 ``target`` of ``size`` values, any
    stride, or a contiguous float16 or bfloat16 one, as its storage."""
    if (type(target) is not np.ndarray or target.ndim != 1
            or target.size != size or not target.flags.writeable):
        return None
    if target.dtype is storage.FLOAT64 or target.dtype is storage.FLOAT32:
        return target
    if _contiguous_16_bit(target):
        return storage_view(target)
    return None


def map_view(function, view, args, kinds, out):
    """Run a channelwise function over every element of an input of
    ``view`` (see :meth:`~normkit.backend.protocol.channelwise.over`), in
    parallel; input-sized arrays are read and written in their storage
    (:mod:`normkit.backend.storage`: 16-bit floats without a widened copy)."""
    loop = _compiled_loop(function, ("cpu-view", kinds))
    flat = [float(a) if kind == "scalar" else
            as_kernel_array(a) if kind == "full" else
            np.ascontiguousarray(a, np.float64).reshape(-1)
            for a, kind in zip(args, kinds)]
    like = args[kinds.index("full")]
    work = flat[kinds.index("full")]
    targets = out or (None,) * function.outputs
    results = [_output(target, work) if target is None or
               target.size == work.size else np.empty_like(work)
               for target in targets]
    loop(*flat, *results, *protocol.view_params(view))
    if out is None:
        return tuple(from_kernel_array(r, like.shape, like.dtype)
                     for r in results)
    return tuple(_deliver(r, target, target.shape, target.dtype)
                 for r, target in zip(results, out))


def copy_into(out, a):
    """``out[...] = a`` (same shape; converted to ``out``'s dtype); returns
    ``out``."""
    np.copyto(out, np.asarray(a).reshape(out.shape), casting="unsafe")
    return out


def empty(shape, dtype):
    """``np.empty``."""
    return np.empty(shape, dtype)
