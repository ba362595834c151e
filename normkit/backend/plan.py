"""How the work of a view is split: items for CPU threads, blocks for CUDA.

Both backends split the same way: whole groups per work item where there
are enough groups to keep the device busy, and otherwise each group's
reduced extent in chunks, first along ``a`` (rows), then along the segment
offsets ``l`` (:func:`split_reduced`, shared).  Each chunk writes its own
partial results, merged afterwards in a fixed order, so a given shape and
configuration gives the same bits on every run of the same compiled
kernels (see the user guide's *Reproducibility* on Numba's cache).
"""

from dataclasses import dataclass
import functools
import sys
from typing import NamedTuple

import numba

__all__ = ["Plan", "make_plan", "reduction_plan", "thread_blocks",
           "thread_count",
           "affine_slots", "affine_partials_fit",
           "disjoint_columns", "column_sums",
           "Grid", "Settings", "SETTINGS", "grid_for", "split_reduced",
           "MIN_ITEM_ELEMENTS", "ITEMS_PER_THREAD",
           "FUSED_ELEMENTS", "WHOLE_SAMPLES", "LONG_SEGMENT",
           "COLUMN_BLOCK_ROWS", "MIN_COLUMN_RUN",
           "WIDE_GROUP", "AFFINE_PARTIALS", "MAX_THREADS"]

#: Items with fewer elements than this are not worth a CPU thread of their
#: own.  On the AMD EPYC (Zen 4) machine a fused LayerNorm forward over
#: ``(64, 768)`` float32 took 12.5 us as one item and 8.8 as two, over
#: ``(64, 256)`` 7.4 and 5.4 (medians of 301; 32768 before, which kept
#: both on one thread); see ``_target_items``.
MIN_ITEM_ELEMENTS = 8192

#: Items per thread: more than one evens out unequal items.
ITEMS_PER_THREAD = 4

#: Values per item when groups are split into blocks: an item's data then
#: stays in a core's L2 cache between its statistics and its normalization.
FUSED_ELEMENTS = 1 << 18

#: Fewest values of segment-shaped data (channels-first BatchNorm) split
#: into chunks of whole samples rather than blocks of channels (see
#: ``_whole_samples_pay``).
WHOLE_SAMPLES = 1 << 20

#: Shortest segments (pixels per channel and sample) for which chunks of
#: whole samples are taken (see ``_whole_samples_pay``).
LONG_SEGMENT = 128

#: Most rows of rows-style data (``B == 1``, ``A > 1``: BatchNorm1d's
#: features) split into blocks of groups that hold every row (see
#: ``_column_block``).
COLUMN_BLOCK_ROWS = 128

#: Fewest values per row of such a block.
MIN_COLUMN_RUN = 256

#: Groups at least this many columns wide (J, with B == 1) read their affine
#: parameters directly in the CPU kernels; narrower ones use per-column
#: coefficient vectors.
WIDE_GROUP = 16

#: Most float64 values per sum that the per-item partials of the affine
#: sums (``(sum dy, sum dy*xhat)`` per column) may hold in all; beyond it,
#: :func:`reduction_plan` splits the columns instead.
AFFINE_PARTIALS = 1 << 16

#: Largest CUDA block; the shared-memory scratch of the reductions is this long.
MAX_THREADS = 512


def ceil_div(a, b):
    """``ceil(a / b)`` for positive integers."""
    return -(-a // b)


def split_reduced(A, L, pieces, split_l):
    """Split a group's reduced extent, ``A`` rows of ``L`` offsets, into about
    ``pieces`` chunks: rows first, then (when ``split_l``) offsets.

    Returns ``(a_per, n_ach, l_per, n_lch)``: ``n_ach`` chunks of ``a_per``
    rows and ``n_lch`` chunks of ``l_per`` offsets, no chunk empty.
    """
    n_ach = min(A, pieces)
    a_per = ceil_div(A, n_ach)
    n_ach = ceil_div(A, a_per)
    n_lch = 1
    if split_l and n_ach < pieces:
        n_lch = min(L, ceil_div(pieces, n_ach))
    l_per = ceil_div(L, n_lch)
    return a_per, n_ach, l_per, ceil_div(L, l_per)


# --------------------------------------------------------------------------
# CPU: items for threads
# --------------------------------------------------------------------------

class Plan(NamedTuple):
    """How the work is split into CPU items (the kernels take its fields as
    a plain tuple, ``tuple(plan)``: see :mod:`normkit.backend.cpu`).

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


#: Whether :func:`thread_count` has started Numba's thread pool.
_POOL_STARTED = False

#: What :func:`thread_count` calls once the pool has started: the threading
#: layer's own getter, which reads the same (per-thread) count as
#: ``numba.get_num_threads`` without the two locks that function takes to
#: check that the pool started: ``python benchmarks/cold_calls.py``
#: timed this function at 3.4 to 3.5 us a call right after a pass over
#: the small GroupNorm and 1.02 warm through ``numba.get_num_threads``,
#: 1.2 and 0.17 to 0.30 through the getter (two runs each), and a
#: forward and backward asks up to three times.  Numba sets the getter
#: when it starts the pool; a Numba without it leaves the public function.
_get_thread_count = numba.get_num_threads


def thread_count():
    """Numba's thread count; the first call starts Numba's thread pool
    keeping the thread count of torch, when torch is imported.

    With Numba's OpenMP threading layer, Numba and torch's CPU build share
    one OpenMP runtime, and the pool's start sets the runtime's thread
    count to Numba's: a ``torch.set_num_threads(k)`` made before normkit's
    first kernel would be undone (torch then runs on every core, as many
    processes side by side oversubscribe them).  The kernels' work plans
    read the count here, before any kernel runs.

    Returns
    -------
    int
        What ``numba.get_num_threads()`` returns in the calling thread.
    """
    global _POOL_STARTED, _get_thread_count
    if not _POOL_STARTED:
        torch = sys.modules.get("torch")
        kept = None if torch is None else torch.get_num_threads()
        numba.get_num_threads()   # starts the pool
        if kept is not None and torch.get_num_threads() != kept:
            torch.set_num_threads(kept)
        _get_thread_count = getattr(numba.np.ufunc.parallel,
                                    "_get_num_threads", numba.get_num_threads)
        _POOL_STARTED = True
    return _get_thread_count()


def make_plan(view, n_threads=None, *, whole_samples=True):
    """Split the work of ``view`` into items for ``n_threads`` (default:
    Numba's, :func:`thread_count`).

    Items holding whole groups are preferred, so that the statistics and the
    normalization of a group happen while it is in cache: blocks of ``p``,
    or, for segment-shaped data (``B > 1``, e.g. channels-first BatchNorm),
    blocks of groups ``k`` of at most :data:`FUSED_ELEMENTS` values, as
    many as make whole rounds of the threads where a few more blocks do,
    unless the input is large and its segments long, where chunks of whole
    samples in memory order are faster (``_whole_samples_pay``; not with
    ``whole_samples=False``, which keeps the blocks: the CPU backward asks
    for it over float64 data and float32 ghost batches, whose fused pass
    was as fast or faster).
    Such chunks also split each ``p`` of more than :data:`FUSED_ELEMENTS`
    values (a ghost batch), whose block would not stay in cache.  Rows of
    narrow or wide groups (``B == 1``, e.g. BatchNorm1d's features) are
    split into blocks of groups that hold every row where the rows are few
    (at most :data:`COLUMN_BLOCK_ROWS`) and the blocks at least
    :data:`MIN_COLUMN_RUN` values wide.
    When there are too few groups to keep every thread busy (BatchNorm
    with few channels; one long LayerNorm row), the reduced extent is split
    instead (:func:`split_reduced`; offsets only where ``B > 1``, or for
    one wide group, ``K == 1`` and ``J >= WIDE_GROUP``, which keeps every
    item's columns contiguous).  Partials are merged in a fixed order, so
    results depend only on the shape and the thread count.
    """
    return _plan(view, thread_count() if n_threads is None else n_threads,
                 whole_samples)


def thread_blocks(view, n_threads=None):
    """One block of whole values of ``p`` per thread (default: Numba's,
    :func:`thread_count`), every group of each: as few items as keep every
    thread busy, so as few partials of the affine sums
    (:func:`affine_slots`) as a fused backward over blocks of ``p`` can
    have.  ``view`` must hold values."""
    return _p_blocks(view, thread_count() if n_threads is None else n_threads)


def _p_blocks(view, items):
    """At most ``items`` blocks of whole values of ``p``, as equal as can
    be, every group of each."""
    P, A, K, J, B = view.dims
    p_per = ceil_div(P, min(P, items))
    return Plan(p_per, ceil_div(P, p_per), K, 1, A, 1, J * B, 1)


def affine_slots(plan, view):
    """How many ``(K * J)``-wide partials of the affine sums the items of
    ``plan`` fill: one, where their columns are disjoint
    (:func:`disjoint_columns`), else one per item."""
    return 1 if disjoint_columns(plan, view) else plan.n_items


def affine_partials_fit(plan, view):
    """Whether the partials of the affine sums over ``plan``
    (:func:`affine_slots` of them, ``K * J`` values each) stay within
    :data:`AFFINE_PARTIALS` values."""
    return affine_slots(plan, view) * view.K * view.J <= AFFINE_PARTIALS


def disjoint_columns(plan, view):
    """Whether no two items of ``plan`` touch the same column ``(k, j)``
    of ``view`` (one block of ``p``, one chunk of ``a``, ``B == 1``): their
    affine sums can then go straight into one array."""
    return plan.n_pblk == 1 and plan.n_ach == 1 and view.B == 1


def column_sums(plan, view):
    """Whether the backward sums over ``plan`` take one wide group per row
    (``K == 1``, ``B == 1``, ``J >=`` :data:`WIDE_GROUP`) with every item
    holding every row of its own columns (:func:`disjoint_columns`), as
    :func:`reduction_plan` splits few long rows: each item can then finish
    its columns' affine sums block by block and write them once."""
    return (disjoint_columns(plan, view) and view.K == 1
            and view.J >= WIDE_GROUP)


def reduction_plan(view, n_threads=None):
    """The split of the backward sums over ``view``: :func:`make_plan`'s,
    unless the per-item partials of the affine sums would be large (few
    long rows of one wide group: ``B == 1``, ``K == 1``, ``J`` large), where
    every item takes every row of one chunk of the columns instead and adds
    into the final sums directly (the chunks are disjoint), so that no
    partial of the input's width exists.
    """
    n_threads = thread_count() if n_threads is None else n_threads
    plan = _plan(view, n_threads, True)
    P, A, K, J, B = view.dims
    if (affine_partials_fit(plan, view) or B != 1 or K != 1
            or J < WIDE_GROUP):
        return plan
    l_per = ceil_div(J, _target_items(P * A * J, n_threads))
    return Plan(P, 1, 1, 1, A, 1, l_per, ceil_div(J, l_per))


def _target_items(total, n_threads):
    """Items to split ``total`` values into: :data:`ITEMS_PER_THREAD` per
    thread, none smaller than :data:`MIN_ITEM_ELEMENTS`, at least one, and
    whole rounds of the threads where there are more than ``n_threads``
    (Numba hands each thread an equal run of consecutive items: three on
    two threads keep one busy twice as long).

    Old (items of at least 32768 values) and new checkouts in one
    process, alternating (medians of 41, two rounds, Zen 4), new over old
    time of the training forward, then forward and backward, float32:
    LayerNorm ``(64, 768)`` 0.88 and 0.84 to 0.89, ``(32, 768)`` 0.88 to
    0.92 and 0.89 to 0.90, ``(64, 256)`` 0.91 to 0.93 and 0.91 to 0.92;
    InstanceNorm ``(4, 32, 16, 16)`` 0.88 to 0.93 and 0.84 to 0.85;
    BatchNorm ``(8, 16, 16, 16)`` 0.84 to 0.98 and 0.81 to 0.91; float16
    LayerNorm ``(64, 768)`` 0.86 to 0.89 and 0.89 to 0.91; GroupNorm
    ``(8, 64, 16, 16)`` 1.02 to 1.07 and 0.95 to 1.02."""
    items = min(ITEMS_PER_THREAD * n_threads, total // MIN_ITEM_ELEMENTS)
    if items > n_threads:
        items -= items % n_threads
    return max(1, items)


def _enough(items, target, n_threads):
    """Whether ``items`` whole-group items keep ``n_threads`` evenly busy."""
    return items >= target or (items >= n_threads and items % n_threads == 0)


def _whole_rounds(K, k_per, P, n_threads):
    """Groups per block, at most ``k_per``, for which the ``P * ceil(K /
    k_per)`` items are a whole number of rounds of ``n_threads``, where a
    few more blocks give that (else ``k_per``): Numba's threads each take
    an equal run of consecutive items, so 13 items on two threads kept
    one busy for 7 while the other ran 6.  Channels-first BatchNorm over
    ``(32, 2048, 7, 7)`` on two threads, 13 items of 167 channels before
    and 14 of 147 after, both plans interleaved in one process (medians
    of 9, three rounds): the training forward took 1.71 to 1.78 ms and
    1.50 to 1.59, with the backward 3.91 to 4.07 and 3.47 to 3.71; in
    bfloat16 1.62 to 1.66 and 1.43 to 1.51, then 3.60 to 3.67 and 3.24 to
    3.29."""
    n_blocks = ceil_div(K, k_per)
    for n in range(n_blocks, min(K, n_blocks + 2 * n_threads) + 1):
        per = ceil_div(K, n)
        if P * ceil_div(K, per) % n_threads == 0:
            return per
    return k_per


def _whole_samples_pay(A, L, total, pieces):
    """Whether segment-shaped data (``B > 1``) of ``total`` values is split
    into ``pieces`` chunks of whole rows ``a`` (every group; each chunk one
    run of memory, a forward of two passes) rather than into blocks of
    groups normalized while in cache: at least :data:`WHOLE_SAMPLES`
    values, in segments of at least :data:`LONG_SEGMENT`, with a row or
    more per chunk.

    A block of groups reads and writes, per row, the block's segments: a
    short run of memory every ``K * L`` values.  On the project's AMD EPYC
    (Zen 4) machine, those runs cost more than the second read of the input
    that whole rows cost.  Old (blocks) and new (whole samples) checkouts in
    one process, alternating (medians of 15, three rounds), new over old
    time of channels-first BatchNorm's forward, then forward and backward
    (the backward then still in blocks in every dtype; the 16-bit ones take
    chunks since, see ``cpu.backward``): ``(32, 64, 56, 56)`` float16 0.73
    to 0.93 and 0.87 to 0.97, bfloat16 0.72 to 0.74 and 0.88 to 0.90,
    float32 0.95 to 1.02 and 0.87 to 1.05; ``(32, 256, 14, 14)`` float32
    0.64 to 0.70 and 0.87 to 0.89; slower, ``(16, 64, 56, 56)`` float32
    1.03 to 1.10 and 1.02 to 1.04 and ``(8, 256, 28, 28)`` float16 1.03 to
    1.04 and 1.00 to 1.02.  Below those sizes the blocks were faster:
    ``(4, 64, 56, 56)`` float32's forward took 0.30 to 0.33 ms in blocks,
    0.38 in chunks; ``(64, 512, 7, 7)`` float16 0.34 and 0.51.  The Intel
    machine of earlier sessions was not measured."""
    return total >= WHOLE_SAMPLES and L >= LONG_SEGMENT and A >= pieces


def _column_block(A, K, J, pieces):
    """Groups per block where rows-style data (``B == 1``, ``A > 1``) of
    at most :data:`COLUMN_BLOCK_ROWS` rows is split into blocks of groups
    that hold every row, else 0: about ``pieces`` blocks, each at most
    :data:`FUSED_ELEMENTS` values (it then stays in cache between its
    statistics and its map) and at least :data:`MIN_COLUMN_RUN` values
    wide.

    Chunks of whole rows instead each sum every column over their rows;
    the columns' partials are then merged, and their coefficients made,
    one column at a time on one thread, and the map reads the input again
    (BatchNorm1d over ``(64, 4096)`` float32: moments 30 us in two chunks
    of rows, their merge 15, the map 41), which pays only where there are
    many rows.  On the AMD EPYC (Zen 4) machine, old (chunks of rows) and
    new (blocks) checkouts in one process, alternating (medians of 15,
    three rounds), new over old time of BatchNorm1d's training forward,
    then forward and backward: float32 ``(64, 4096)`` 0.75 to 0.76 and
    0.71 to 0.80, ``(32, 16384)`` 0.66 to 0.70 and 0.67 to 0.72, ``(128,
    2048)`` 0.79 to 0.83 and 0.78 to 0.82, ``(64, 1024)`` 0.84 to 0.92
    and 0.89 to 0.93; ``(64, 4096)`` float16 0.74 to 0.79 and 0.69 to
    0.74, bfloat16 0.79 to 0.93 and 0.79 to 0.86.  With more rows the
    blocks were no faster or slower (an earlier run, blocks of at least
    256 values, the same alternation): ``(256, 1024)`` and ``(256,
    4096)`` 0.97 to 1.16, ``(512, 1024)`` 1.07 to 1.13, ``(1024, 1024)``
    1.34 to 1.45."""
    least = ceil_div(MIN_COLUMN_RUN, J)
    most = FUSED_ELEMENTS // (A * J)
    if K == 1 or A > COLUMN_BLOCK_ROWS or most < least:
        return 0
    return min(K, most, max(least, ceil_div(K, pieces)))


@functools.lru_cache(maxsize=512)
def _plan(view, n_threads, whole_samples):
    P, A, K, J, B = view.dims
    L = J * B
    total = P * A * K * L
    if total == 0:  # nothing to split: one item per p, its groups whole
        return Plan(1, P, K, 1, A, 1, L, 1)
    target = _target_items(total, n_threads)
    pieces = ceil_div(target, P)
    chunks = (whole_samples and B > 1
              and _whole_samples_pay(A, L, total, pieces))
    # a block of one p larger than FUSED_ELEMENTS is read twice from
    # memory, not from cache: Ghost BatchNorm over (32, 64, 56, 56) in
    # ghost batches of 8 (four p of 6.4 MB in float32) on the AMD EPYC
    # (Zen 4), old (blocks of p) and new (chunks of 4 samples) checkouts
    # alternating in one process (medians of 15, three rounds), new over
    # old time of the forward: float32 0.90 to 1.01, float16 0.68 to 0.72,
    # bfloat16 0.77 to 0.79; with the backward (in chunks too in 16-bit,
    # in blocks of p in float32): float32 0.98 to 1.01, float16 0.75 to
    # 0.79, bfloat16 0.77 to 0.81
    if _enough(P, target, n_threads) and not (
            chunks and A * K * L > FUSED_ELEMENTS):
        return _p_blocks(view, target)
    if B > 1 and _enough(P * K, target, n_threads) and not chunks:
        k_per = _whole_rounds(K, max(1, min(ceil_div(K, pieces),
                                            FUSED_ELEMENTS // (A * L))),
                              P, n_threads)
        return Plan(1, P, k_per, ceil_div(K, k_per), A, 1, L, 1)
    if B == 1 and A > 1:
        k_per = _column_block(A, K, J, pieces)
        if k_per:
            k_per = _whole_rounds(K, k_per, P, n_threads)
            if _enough(P * ceil_div(K, k_per), target, n_threads):
                return Plan(1, P, k_per, ceil_div(K, k_per), A, 1, L, 1)
    split_l = B > 1 or (K == 1 and J >= WIDE_GROUP)
    if not split_l:
        # chunks of whole rows, one per thread: each chunk's partials are
        # merged over the rows' whole width and its first rows read twice
        # for a center, and Numba hands every thread an equal run of
        # consecutive items, so equal chunks gain nothing from being more
        # (BatchNorm1d's moments over (256, 1024) float32 took 72 to 120 us
        # in eight chunks of 32 rows, 41 to 65 in two; a copy 31 to 34)
        pieces = min(pieces, ceil_div(n_threads, P))
    return Plan(1, P, K, 1, *split_reduced(A, L, pieces, split_l))


# --------------------------------------------------------------------------
# CUDA: blocks
# --------------------------------------------------------------------------

@dataclass
class Settings:
    """CUDA launch parameters (tests shrink them to make the simulator
    feasible).

    Attributes
    ----------
    threads : int
        Threads per block at most (<= :data:`MAX_THREADS`).
    min_threads : int
        Fewest threads per block (a warp on a GPU).
    target_blocks : int
        Blocks that keep the device busy: an H100 has 132 SMs with room
        for 8 blocks of 256 threads each.
    values_per_thread : int
        Do not split work so finely that a thread gets fewer values.
    """

    threads: int = 256
    min_threads: int = 32
    target_blocks: int = 132 * 8
    values_per_thread: int = 16


#: The settings :func:`grid_for` uses by default.
SETTINGS = Settings()


class Grid(NamedTuple):
    """How a view is cut into CUDA blocks (see :mod:`normkit.backend.cuda`).

    There are ``P * n_ktile * n_ach * n_lch`` blocks of ``threads`` threads;
    ``columns`` selects column tiles of ``k_per`` groups, else segment
    tiles of one group; rows are split in ``n_ach`` chunks of ``a_per`` and
    (segment tiles) columns in ``n_lch`` chunks of ``l_per``.
    """

    threads: int
    columns: bool
    k_per: int
    n_ktile: int
    a_per: int
    n_ach: int
    l_per: int
    n_lch: int

    @property
    def n_chunks(self):
        """Partials per group."""
        return self.n_ach * self.n_lch

    def blocks(self, P):
        """Blocks of a launch over ``P`` values of ``p``."""
        return P * self.n_ktile * self.n_ach * self.n_lch

    def args(self):
        """The tiling as plain kernel arguments."""
        return (int(self.columns), self.k_per, self.n_ktile, self.a_per,
                self.n_ach, self.l_per, self.n_lch)


def _pow2_at_least(n):
    return 1 << max(0, int(n) - 1).bit_length()


def grid_for(view, settings=None):
    """Tiles and block size for ``view`` on CUDA (``settings`` default:
    :data:`SETTINGS`).  A view without values (any dimension 0) gets a
    grid of whole groups that never divides by zero; the backend launches
    nothing for it."""
    s = SETTINGS if settings is None else settings
    return _grid(view.dims, s.threads, s.min_threads, s.target_blocks,
                 s.values_per_thread)


@functools.lru_cache(maxsize=512)
def _grid(dims, threads, min_threads, target_blocks, values_per_thread):
    P, A, K, J, B = dims
    L = J * B
    threads = min(threads, MAX_THREADS)
    if P * A * K * L == 0:  # no values: one smallest block per group
        return Grid(min(threads, min_threads), False, 1, K, A, 1, L, 1)
    columns = 2 * L <= threads and (A > 1 or K > 1)
    k_per = min(K, threads // L) if columns else 1
    width = k_per * L
    n_ktile = ceil_div(K, k_per)
    tiles = P * n_ktile
    split = 1
    if tiles < target_blocks:
        split = max(1, min(ceil_div(target_blocks, tiles),
                           A * width // (threads * values_per_thread)))
    a_per, n_ach, l_per, n_lch = split_reduced(A, L, split, not columns)
    values = a_per * (width if columns else l_per)
    block = min(threads, max(min_threads, _pow2_at_least(
        ceil_div(values, values_per_thread))))
    if columns:
        block = max(block, min(threads, _pow2_at_least(width)))
    return Grid(block, columns, k_per, n_ktile, a_per, n_ach, l_per, n_lch)
