"""The engine below the variants: views, work plans, copies, determinism."""

import itertools
import threading

import numba
import numpy as np
import pytest

import normkit
from normkit import engine, reference
from normkit.backend import cpu
from normkit.backend.plan import (COLUMN_BLOCK_ROWS, FUSED_ELEMENTS,
                                  MIN_ITEM_ELEMENTS, WHOLE_SAMPLES, Plan,
                                  affine_partials_fit, affine_slots,
                                  column_sums, reduction_plan, thread_blocks,
                                  thread_count)
from normkit.engine import View, channel_view, make_plan, trailing_view


def item_ranges(view, plan):
    """Every item's (p, k, a, l) ranges, decoded as the kernels decode them."""
    L = view.J * view.B
    for pb, kb, ac, lc in itertools.product(range(plan.n_pblk), range(plan.n_kblk),
                                            range(plan.n_ach), range(plan.n_lch)):
        yield (range(pb * plan.p_per, min(view.P, (pb + 1) * plan.p_per)),
               range(kb * plan.k_per, min(view.K, (kb + 1) * plan.k_per)),
               range(ac * plan.a_per, min(view.A, (ac + 1) * plan.a_per)),
               range(lc * plan.l_per, min(L, (lc + 1) * plan.l_per)))


VIEWS = {
    "batchnorm-huge-batch": channel_view((4096, 3, 64, 64), 1, False),
    "batchnorm-channels-last": channel_view((32, 56, 56, 64), 3, False),
    "batchnorm-channels-first": channel_view((32, 64, 56, 56), 1, False),
    "batchnorm-wide-rows": channel_view((256, 4096), 1, False),
    "batchnorm-few-wide-rows": channel_view((64, 4096), 1, False),
    "batchnorm-small-batch": channel_view((2, 64, 56, 56), 1, False),
    "layernorm-one-long-row": trailing_view((1, 1_000_000), 1),
    "layernorm-rows": trailing_view((8192, 1024), 1),
    "groupnorm-small-batch": channel_view((2, 64, 56, 56), 1, True, 32),
    "instancenorm": channel_view((32, 64, 56, 56), 1, True),
    "tiny": channel_view((2, 3, 2), 1, False),
}


def _assert_covers_every_value_once(view, plan):
    seen = np.zeros((view.P, view.K, view.A, view.J * view.B), dtype=np.int8)
    for ps, ks, as_, ls in item_ranges(view, plan):
        seen[ps.start:ps.stop, ks.start:ks.stop, as_.start:as_.stop,
             ls.start:ls.stop] += 1
    assert (seen == 1).all()


@pytest.mark.parametrize("n_threads", [1, 2, 3, 8])
@pytest.mark.parametrize("name", VIEWS)
def test_plan_covers_every_value_once(name, n_threads):
    view = VIEWS[name]
    plan = make_plan(view, n_threads)
    _assert_covers_every_value_once(view, plan)
    if view.B == 1 and plan.n_kblk > 1:   # blocks of columns hold every row
        assert plan.n_ach == 1 and view.A <= COLUMN_BLOCK_ROWS


@pytest.mark.parametrize("n_threads", [1, 2, 3, 8])
@pytest.mark.parametrize("P", [1, 2, 7, 8, 9])
def test_thread_blocks_give_each_thread_one_block_of_whole_groups(P, n_threads):
    view = View(P, 3, 2, 5, 4)
    plan = thread_blocks(view, n_threads)
    _assert_covers_every_value_once(view, plan)
    # no more items than threads, none with more p than it must
    assert plan.fused and plan.n_kblk == 1 and plan.n_items <= n_threads
    assert plan.p_per == -(-P // n_threads)


@pytest.mark.parametrize("name", ["batchnorm-huge-batch", "layernorm-one-long-row",
                                  "batchnorm-channels-last", "layernorm-rows",
                                  "instancenorm"])
def test_plan_keeps_both_cores_busy(name):
    """Few groups over a huge extent are split along the reduced extent;
    every plan of a large input gives each of two threads an item (Numba
    hands each thread an equal run of consecutive items)."""
    view = VIEWS[name]
    plan = make_plan(view, 2)
    assert plan.n_items >= 2 and plan.n_items % 2 == 0


@pytest.mark.parametrize("n_threads", [1, 2, 3, 8])
@pytest.mark.parametrize("name", ["batchnorm-wide-rows", "batchnorm-channels-last",
                                  "batchnorm-huge-batch"])
def test_plan_cuts_rows_into_one_chunk_per_thread(name, n_threads):
    """A split extent of rows (``B == 1``) is cut into one chunk per
    thread, their lengths within a row of each other: each chunk's partials
    are merged over the rows' width, and equal chunks on threads that each
    take an equal run of items gain nothing from being more.  Every split
    gives each thread an item."""
    view = VIEWS[name]
    plan = make_plan(view, n_threads)
    if view.B == 1:
        assert plan.n_ach == min(n_threads, view.A)
        assert plan.n_ach * plan.a_per - view.A < plan.n_ach
    assert plan.n_items >= min(n_threads, view.A)


@pytest.mark.parametrize("shape,items", [
    ((64, 768), 6),       # 49152 values: six items of at least 8192
    ((24, 1024), 2),      # three items' worth: two, a whole round
    ((4, 2048), 1),       # under two items' worth: one
    ((128, 768), 8),      # ITEMS_PER_THREAD per thread at most
])
def test_small_inputs_split_into_whole_rounds_of_items(shape, items):
    """Items hold at least MIN_ITEM_ELEMENTS values (a LayerNorm over 64
    rows of 768 already gains from both threads), and come in whole
    rounds of the threads where there are more items than threads."""
    plan = make_plan(trailing_view(shape, 1), 2)
    assert plan.n_items == items
    assert shape[0] * shape[1] // items >= MIN_ITEM_ELEMENTS


def test_plan_follows_numbas_thread_count():
    """make_plan reads the thread count at each call, so a
    ``numba.set_num_threads`` takes effect at the next kernel."""
    view = VIEWS["batchnorm-channels-last"]
    every = numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(1)
    try:
        assert thread_count() == 1
        assert make_plan(view) == make_plan(view, 1) != make_plan(view, 2)
    finally:
        numba.set_num_threads(every)
    assert thread_count() == every
    assert make_plan(view) == make_plan(view, every)


def test_thread_count_is_numbas_count_in_each_thread():
    """thread_count reads Numba's count of the calling thread, as
    ``numba.get_num_threads`` does: a ``numba.set_num_threads(1)`` in
    one thread leaves the others' plans alone."""
    every = numba.config.NUMBA_NUM_THREADS
    seen = {}

    def one_thread():
        numba.set_num_threads(1)
        seen["other"] = (thread_count(), numba.get_num_threads())

    worker = threading.Thread(target=one_thread)
    worker.start()
    worker.join()
    assert seen["other"] == (1, 1)
    assert thread_count() == numba.get_num_threads() == every


@pytest.mark.parametrize("n_threads", [2, 3, 4])
def test_plan_blocks_of_groups_come_in_whole_rounds_of_threads(n_threads):
    """Blocks of groups are as many as make whole rounds of the threads,
    each still within FUSED_ELEMENTS (Numba gives each thread an equal
    run of consecutive items: channels-first BatchNorm over (32, 2048, 7,
    7) had 13 items on two threads)."""
    view = channel_view((32, 2048, 7, 7), 1, False)
    plan = make_plan(view, n_threads)
    assert plan.fused and plan.n_kblk > 1
    assert plan.n_items % n_threads == 0
    assert plan.k_per * view.A * view.J * view.B <= FUSED_ELEMENTS


def test_plan_fuses_when_groups_are_plentiful():
    assert make_plan(VIEWS["instancenorm"], 2).fused
    assert make_plan(VIEWS["batchnorm-channels-first"], 2,
                     whole_samples=False).fused
    assert make_plan(VIEWS["batchnorm-small-batch"], 2).fused
    assert not make_plan(VIEWS["batchnorm-huge-batch"], 2).fused


@pytest.mark.parametrize("shape,whole", [
    ((32, 64, 56, 56), True), ((32, 128, 28, 28), True),
    ((4, 64, 56, 56), False),      # fewer than WHOLE_SAMPLES values
    ((64, 512, 7, 7), False),      # segments shorter than LONG_SEGMENT
    ((4, 512, 32, 32), False),     # fewer samples than chunks
])
def test_large_channels_first_batchnorm_takes_chunks_of_whole_samples(
        shape, whole):
    """Segment data of at least WHOLE_SAMPLES values in segments of at
    least LONG_SEGMENT is split into chunks of whole samples, each item's
    values one contiguous run; with whole_samples=False (the float32 and
    float64 backward) and below those sizes, into fused blocks of
    channels."""
    view = channel_view(shape, 1, False)
    plan = make_plan(view, 2)
    blocks = make_plan(view, 2, whole_samples=False)
    assert blocks.fused and blocks.n_kblk > 1
    if whole:
        assert plan.n_ach == 8 and plan.n_kblk == 1 and plan.n_lch == 1
        assert view.A * view.K * view.J * view.B >= WHOLE_SAMPLES
    else:
        assert plan == blocks


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_batchnorm_over_chunks_of_whole_samples_follows_the_reference(
        dtype, rng):
    """A training BatchNorm whose forward and backward take chunks of
    whole samples (two passes each) gives the float64 reference's output,
    running statistics and gradients.  (The blocks' fused backward, which
    float64 and ghost batches keep, is what smaller inputs take.)"""
    shape = (8, 8, 128, 128)
    view = channel_view(shape, 1, False)
    assert make_plan(view, 2).n_ach == 8
    assert cpu._backward_takes_whole_samples(
        cpu.as_kernel_array(np.empty(1, dtype)), view)
    _assert_training_follows_reference("batch_norm", shape, dtype, rng)


@pytest.mark.parametrize("dtype,P,whole", [
    (np.float16, 1, True), (np.float16, 4, True), ("bfloat16", 4, True),
    (np.float32, 1, True),
    (np.float32, 4, False),   # ghost batches: the fused blocks were faster
    (np.float64, 1, False),   # the fused blocks as fast
])
def test_backward_takes_whole_samples_where_two_passes_were_faster(
        dtype, P, whole):
    """The CPU backward's plan takes chunks of whole samples where the
    forward's does for 16-bit storage and for float32 without ghost
    batches (``P == 1``), and keeps blocks of groups for the rest."""
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    view = View(P, 8, 64, 1, 3136)
    flat = cpu.as_kernel_array(np.empty(1, dtype))
    assert cpu._backward_takes_whole_samples(flat, view) == whole


def _assert_training_follows_reference(variant, shape, dtype, rng, *args):
    """The training forward of channels-first ``variant`` (``shape[1]``
    channels, with weight, bias and running statistics; ``args`` before
    those, e.g. the ghost batch size) and its backward over ``shape`` give
    the float64 reference's output, running statistics and gradients;
    returns the forward's :class:`Saved` record."""
    channels = shape[1]
    x = rng.normal(3.0, 2.0, shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    weight = rng.normal(1.0, 0.2, channels).astype(dtype)
    bias = rng.normal(0.0, 0.2, channels).astype(dtype)
    running = (np.zeros(channels, dtype), np.ones(channels, dtype))
    y, saved = getattr(normkit, variant)(x, *args, *running, weight, bias,
                                         training=True, return_saved=True)
    grads = getattr(normkit, f"{variant}_backward")(dy, x, saved)
    before = (np.zeros(channels), np.ones(channels))
    want, *want_running = getattr(reference, variant)(
        x, *args, *before, weight, bias, training=True)
    want_grads = getattr(reference, f"{variant}_backward")(
        dy, x, *args, *before, weight, bias, training=True)
    tol = 2e-3 if dtype == np.float16 else 2e-5
    np.testing.assert_allclose(y, want, atol=tol * 8)
    for got, exp in zip([*running, *grads], [*want_running, *want_grads]):
        np.testing.assert_allclose(got, exp, rtol=tol,
                                   atol=tol * np.abs(exp).max())
    return saved


@pytest.mark.parametrize("view,chunks", [
    (View(4, 8, 64, 1, 3136), True),     # ghost BN (32, 64, 56, 56), 8 a batch
    (View(4, 8, 8, 1, 3136), False),     # each p within FUSED_ELEMENTS
    (View(8, 8, 128, 1, 784), False),    # one chunk per p: the p itself
    (View(4, 8, 512, 1, 49), False),     # segments shorter than LONG_SEGMENT
])
def test_large_groups_of_p_take_chunks_of_whole_samples(view, chunks):
    """Where each ``p`` of segment data holds more than FUSED_ELEMENTS
    values (a ghost batch, too large to stay in cache between the passes
    of a block of whole ``p``) and whole samples pay, every ``p`` is split
    into chunks of whole samples, as a large BatchNorm's batch is; with
    whole_samples=False, and otherwise, blocks of whole ``p`` stay."""
    plan = make_plan(view, 2)
    blocks = make_plan(view, 2, whole_samples=False)
    assert blocks == Plan(1, view.P, view.K, 1, view.A, 1, view.J * view.B, 1)
    if chunks:
        assert view.A * view.K * view.J * view.B > FUSED_ELEMENTS
        assert plan.n_pblk == view.P and plan.n_kblk == 1
        assert plan.n_ach == 2 and plan.n_lch == 1 and not plan.fused
    else:
        assert plan == blocks


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_ghost_batchnorm_over_chunks_of_whole_samples_follows_the_reference(
        dtype, rng):
    """A training Ghost BatchNorm whose ghost batches are taken in chunks
    of whole samples (the float32 backward in blocks of whole ghost
    batches) gives the float64 reference's output, running statistics
    and gradients."""
    view = View(2, 4, 8, 1, 128 * 128)
    assert make_plan(view, 2).n_ach == 4
    assert make_plan(view, 2, whole_samples=False).fused
    saved = _assert_training_follows_reference(
        "ghost_batch_norm", (8, 8, 128, 128), dtype, rng, 4)
    assert saved.view == view


@pytest.mark.parametrize("view,blocks", [
    (View(1, 64, 4096, 1, 1), True),     # BatchNorm1d over (64, 4096)
    (View(1, 49, 32, 64, 1), True),      # GroupNorm (1, 7, 7, 2048), 32 groups
    (View(1, 256, 4096, 1, 1), False),   # more than COLUMN_BLOCK_ROWS rows
    (View(1, 6272, 64, 1, 1), False),    # runs shorter than MIN_COLUMN_RUN
    (View(1, 2, 1, 100_000, 1), False),  # one group: chunks of its columns
])
def test_few_wide_rows_take_blocks_of_groups_over_every_row(view, blocks):
    """Rows-style data (``B == 1``) of at most COLUMN_BLOCK_ROWS rows is
    split into fused blocks of groups, each holding every row within
    FUSED_ELEMENTS values, where chunks of rows would each sum and merge
    every column; more rows, narrow rows and a single group keep chunks
    of rows or columns."""
    plan = make_plan(view, 2)
    if blocks:
        assert plan.n_kblk > 1 and plan.n_ach == 1 and plan.fused
        assert plan.n_items % 2 == 0
        assert view.A * plan.k_per * view.J <= FUSED_ELEMENTS
    else:
        assert plan.n_kblk == 1 and not plan.fused


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("shape", [(48, 1500), (4, 70_000)])
def test_batchnorm1d_over_blocks_of_groups_follows_the_reference(
        shape, dtype, rng):
    """BatchNorm1d over few wide rows, taken in blocks of features that
    hold every row, gives the float64 reference's output, running
    statistics and gradients: the backward fused per block, or (more
    features than the affine partials hold, ``(4, 70000)``) its sums
    over the blocks into one set of partials, then ``dx``.  (The engine
    fuzz's "few wide rows" draws such views in every dtype.)"""
    view = channel_view(shape, 1, False)
    plan = make_plan(view)
    assert plan.n_kblk > 1 and plan.fused
    saved = _assert_training_follows_reference("batch_norm", shape, dtype,
                                               rng)
    assert saved.view == view


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("shape,groups", [((1, 7, 7, 2048), 32),
                                          ((1, 2, 1, 100_000), 1)])
def test_groupnorm_over_blocks_or_chunks_of_columns_follows_the_reference(
        shape, groups, dtype, rng):
    """Channels-last GroupNorm of one sample over few wide rows, in blocks
    of wide groups that hold every row, or (one group) in chunks of rows
    and of columns, gives the float64 reference's output and gradients."""
    x = rng.normal(3.0, 2.0, shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    weight = rng.normal(1.0, 0.2, shape[-1]).astype(dtype)
    bias = rng.normal(0.0, 0.2, shape[-1]).astype(dtype)
    y, saved = normkit.group_norm(x, groups, weight, bias, axis=-1,
                                  return_saved=True)
    assert make_plan(saved.view).n_items > 1
    grads = normkit.group_norm_backward(dy, x, saved)
    want = reference.group_norm(x, groups, weight, bias, axis=-1)
    want_grads = reference.group_norm_backward(dy, x, groups, weight, bias,
                                               axis=-1)
    tol = 2e-3 if dtype == np.float16 else 2e-5
    np.testing.assert_allclose(y, want, atol=tol * 8)
    for got, exp in zip(grads, want_grads):
        np.testing.assert_allclose(got, exp, rtol=tol,
                                   atol=tol * np.abs(exp).max())


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64,
                                   "bfloat16"])
def test_contiguous_input_is_not_copied(dtype):
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    x = np.ones((4, 5, 6), dtype=dtype)
    assert np.shares_memory(engine.as_kernel_array(x), x)
    channels_last = np.ones((4, 6, 5), dtype=dtype)
    assert np.shares_memory(engine.as_kernel_array(channels_last), channels_last)


def test_non_contiguous_input_is_copied_once():
    x = np.ones((4, 5, 6), dtype=np.float32).transpose(0, 2, 1)
    flat = engine.as_kernel_array(x)
    assert not np.shares_memory(flat, x) and flat.flags.c_contiguous


def test_half_precision_reaches_the_kernels_as_its_bits():
    half = np.ones((4, 5), dtype=np.float16)
    flat = engine.as_kernel_array(half)
    assert flat.dtype == np.uint16 and np.shares_memory(flat, half)


@pytest.mark.parametrize("shape,view_args", [
    ((512, 3, 16, 16), (1, False)),
    ((64, 16, 16, 8), (3, False)),
    ((3, 40000), (1, True, None)),
])
def test_results_are_identical_run_to_run(shape, view_args, rng):
    x = rng.standard_normal(shape).astype(np.float32)
    view = channel_view(shape, *view_args)
    first = engine.normalize_batch(x, view)
    second = engine.normalize_batch(x, view)
    for a, b in zip(first, second):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape,view", [
    ((4096, 64), trailing_view((4096, 64), 1)),          # short rows
    ((300, 100), trailing_view((300, 100), 1)),
    ((64, 3000), trailing_view((64, 3000), 1)),          # rows of tiles
    ((1, 10 ** 6), trailing_view((1, 10 ** 6), 1)),      # a split row
    ((8, 12, 7, 7), channel_view((8, 12, 7, 7), 1, True)),     # InstanceNorm
    ((8, 12, 5, 5), channel_view((8, 12, 5, 5), 1, True, 4)),  # GroupNorm
])
def test_moments_of_contiguous_groups_are_the_forwards_statistics(
        shape, view, dtype, rng):
    """Where each group is one contiguous run (``A == 1``),
    :func:`engine.moments` takes every group as the forward does, whatever
    its length: the same bits as the statistics the forward normalized
    with, centered or not, fused or in two passes."""
    x = rng.normal(1e3, 2.0, shape).astype(dtype)
    assert view.A == 1
    for centered in (True, False):
        mean, var = engine.moments(x, view, centered)
        _, f_mean, f_var, _ = engine.normalize_batch(x, view,
                                                     centered=centered)
        assert np.array_equal(mean, f_mean) and np.array_equal(var, f_var)


@pytest.mark.parametrize("n_threads", [1, 2, 5])
def test_partials_merge_to_the_same_moments_for_any_plan(n_threads, rng):
    """Splitting the reduced extent differently changes only rounding."""
    x = rng.normal(3.0, 2.0, size=(256, 3, 40, 40))
    view = channel_view(x.shape, 1, False)
    plan = make_plan(view, n_threads)
    part = np.empty((1, plan.n_chunks, 3, 3))
    cpu.moments_kernel(x.reshape(-1), *view.dims, tuple(plan), part)
    mean, var = cpu.merge_partials(part)
    np.testing.assert_allclose(mean[0], x.mean(axis=(0, 2, 3)), rtol=1e-13)
    np.testing.assert_allclose(var[0], x.var(axis=(0, 2, 3)), rtol=1e-12)


def test_views_are_free_reshapes():
    assert channel_view((8, 6, 5, 7), 1, False) == View(1, 8, 6, 1, 35)
    assert channel_view((8, 5, 7, 6), 3, True, 2) == View(8, 35, 2, 3, 1)
    assert trailing_view((4, 3, 10), 2) == View(4, 1, 1, 30, 1)


@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape,view_args,route", [
    ((6, 8, 7, 9), (1, True, 4), "fused, contiguous groups"),
    ((6, 5, 7, 8), (3, True, 4), "fused, channels-last groups"),
    ((64, 16, 16, 8), (3, False), "two passes"),
])
def test_normalize_batch_returns_the_factor_it_normalized_with(
        shape, view_args, route, dtype, centered, rng):
    """``rstd`` is ``1 / sqrt(var + eps)`` per group from every forward
    route, and ``y`` is ``(x - mean) * rstd`` (no affine)."""
    x = rng.normal(2.0, 3.0, shape).astype(dtype)
    view = channel_view(shape, *view_args)
    assert make_plan(view).fused == route.startswith("fused")
    eps = 1e-3
    y, mean, var, rstd = engine.normalize_batch(x, view, eps=eps,
                                                centered=centered)
    assert rstd.shape == (view.P, view.K) and rstd.dtype == np.float64
    np.testing.assert_allclose(rstd, 1.0 / np.sqrt(var + eps), rtol=4e-16)
    x64 = np.moveaxis(x.astype(np.float64), view_args[0], -1)
    y64 = np.moveaxis(y.astype(np.float64), view_args[0], -1)
    groups = x64.reshape(view.P, -1, view.K, view.J)
    want = (groups - mean[:, None, :, None]) * rstd[:, None, :, None]
    tolerance = 8 * float(np.finfo(dtype).eps) * np.abs(want).max()
    np.testing.assert_allclose(y64.reshape(want.shape), want, rtol=0,
                               atol=tolerance)


#: Views whose groups are each one contiguous run of values (A == 1), which
#: the fused forward takes group by group without its general tables:
#: LayerNorm rows (wide and narrow), GroupNorm and InstanceNorm channels
#: first, GroupNorm over (N, C).
RUN_VIEWS = {
    "rows-16": ((37, 16), lambda shape: trailing_view(shape, 1)),
    "rows-300": ((37, 300), lambda shape: trailing_view(shape, 1)),
    "rows-1024": ((37, 1024), lambda shape: trailing_view(shape, 1)),
    "groupnorm-first": ((5, 6, 7, 8), lambda shape: channel_view(shape, 1, True, 3)),
    "instancenorm": ((5, 6, 7, 8), lambda shape: channel_view(shape, 1, True)),
    "groupnorm-2d": ((37, 64), lambda shape: channel_view(shape, 1, True, 32)),
}


@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, "bfloat16"])
@pytest.mark.parametrize("name", RUN_VIEWS)
def test_fused_runs_agree_with_the_two_pass_forward(name, dtype, centered,
                                                    rng):
    """Groups that are contiguous runs take the fused forward's shortcut
    for them; it computes each group's moments and map as the general
    two-pass forward does (moments kernel, merge, map).  Both are compiled
    separately, and reassociation lets the compiler order a group's sums
    differently in each (which it does in some processes, see the user
    guide on cached code): the same statistics and output up to their last
    bits."""
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    shape, make_view = RUN_VIEWS[name]
    x = rng.normal(2.0, 3.0, shape).astype(dtype)
    view = make_view(shape)
    gamma = rng.normal(1.0, 0.5, view.K * view.J).astype(dtype)
    beta = rng.normal(0.0, 0.5, view.K * view.J).astype(dtype)
    plan = make_plan(view)
    assert plan.fused and view.A == 1
    y, mean, var, _ = engine.normalize_batch(x, view, gamma, beta, 1e-5,
                                             centered)
    flat = engine.as_kernel_array(x)
    gamma_k, beta_k = cpu._affine_params(gamma, beta, gamma.size, flat)
    out = np.empty_like(flat)
    mean_2, var_2, _ = cpu.normalize_two_pass(
        flat, out, *view.dims, tuple(plan), gamma_k, beta_k, 1e-5, centered)
    compute_eps = float(np.finfo(np.float64 if dtype == np.float64
                                 else np.float32).eps)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, mean_2, rtol=0,
                               atol=16 * compute_eps * np.abs(x64).max())
    np.testing.assert_allclose(var, var_2, rtol=16 * compute_eps)
    got = y.astype(np.float64).reshape(-1)
    want = engine.from_kernel_array(out, x.shape, x.dtype).astype(np.float64)
    ulps = 16 * float(np.finfo(dtype).eps) * np.abs(want).max()
    np.testing.assert_allclose(got, want.reshape(-1), rtol=0, atol=ulps)
    groups = x64.reshape(view.P, view.K, -1)
    if centered:
        np.testing.assert_allclose(mean, groups.mean(axis=2), rtol=1e-5)
    else:
        assert not mean.any()
        np.testing.assert_allclose(var, np.mean(groups ** 2, axis=2),
                                   rtol=1e-5)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("k_per", [2, 6], ids=["blocks-of-groups", "all-groups"])
def test_short_segments_are_summed_down_the_rows(dtype, k_per, rng):
    """The moments of whole short segments over at least ROW_STEP rows are
    summed down the rows, in tiles of SEGMENT_TILE_ROWS rows of whole
    ROW_STEP-row blocks and single rows: over two whole tiles and a part
    (a block and a tail), items of blocks of groups and of all of them,
    data drifting along the rows (each tile centered on the running mean)
    and a large mean, the mean and biased variance match float64."""
    P, K, L = 1, 6, 15
    A = 2 * cpu.SEGMENT_TILE_ROWS + cpu.ROW_STEP + 3
    assert 2 * L <= cpu.SHORT_TILE
    view = View(P, A, K, 1, L)
    drift = np.linspace(0.0, 40.0, A)[None, :, None, None, None]
    x = (rng.normal(1e3, 2.0, size=view.dims) + drift).astype(dtype)
    plan = (1, P, k_per, K // k_per, A, 1, L, 1)
    mean, var = cpu.moments_of(cpu.as_kernel_array(x), *view.dims, plan, True)
    wide = x.astype(np.float64)
    tol = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-6,
           np.dtype(np.float16): 1e-6}[np.dtype(dtype)]
    np.testing.assert_allclose(mean, wide.mean(axis=(1, 4))[:, :, 0],
                               rtol=tol)
    np.testing.assert_allclose(var, wide.var(axis=(1, 4))[:, :, 0], rtol=tol)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("k_per", [2, 6], ids=["blocks-of-groups", "all-groups"])
def test_backward_sums_of_short_segments_down_the_rows(dtype, k_per, rng):
    """The backward sums of whole short segments over at least ROW_STEP
    rows are summed down the rows, AFFINE_BLOCK_ROWS at a time, two rows a
    step: over two whole blocks and a part of an odd number of rows, items
    of blocks of groups and of all of them, two channels per group, the
    group sums ``(sum g*dy, sum g*dy*xhat)`` and the per-channel sums
    ``(sum dy, sum dy*xhat)`` match float64."""
    P, K, J, B = 2, 6, 2, 5
    A = 2 * cpu.AFFINE_BLOCK_ROWS + 3
    _check_backward_sums(View(P, A, K, J, B),
                         Plan(1, P, k_per, K // k_per, A, 1, J * B, 1), dtype,
                         rng)


#: Tolerance of backward sums against float64, relative to the largest.
SUMS_TOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-6,
            np.dtype(np.float16): 1e-5}


def _random_backward_inputs(view, dtype, rng):
    """Random ``(x, dy, mean, rstd, gscale)`` of ``view``, ``x`` and ``dy``
    in ``dtype``, and ``dy`` and ``xhat = (x - mean) * rstd`` in float64,
    shaped as the view."""
    P, _, K, J, _ = view.dims
    x = rng.normal(3.0, 2.0, size=view.dims).astype(dtype)
    dy = rng.normal(size=view.dims).astype(dtype)
    mean = rng.normal(3.0, 0.1, size=(P, K))
    rstd = rng.uniform(0.4, 0.6, size=(P, K))
    gscale = rng.uniform(0.5, 2.0, K * J)
    xhat = ((x.astype(np.float64) - mean[:, None, :, None, None])
            * rstd[:, None, :, None, None])
    return (x, dy, mean, rstd, gscale), dy.astype(np.float64), xhat


def _check_backward_sums(view, plan, dtype, rng):
    """``backward_sums_of`` over ``plan`` of random data of ``view`` in
    ``dtype``: the group sums ``(sum g*dy, sum g*dy*xhat)`` and the
    per-channel sums ``(sum dy, sum dy*xhat)`` match float64."""
    _, _, K, J, _ = view.dims
    (x, dy, mean, rstd, gscale), d, xhat = _random_backward_inputs(view, dtype, rng)
    part_group, part_affine = cpu._sums_partials(view, plan)
    group, affine = cpu.backward_sums_of(
        cpu.as_kernel_array(dy), cpu.as_kernel_array(x), *view.dims,
        tuple(plan), mean, rstd, gscale, part_group, part_affine)
    g = gscale.reshape(1, 1, K, J, 1)
    tol = SUMS_TOL[np.dtype(dtype)]
    for got, want in ((group[..., 0], (g * d).sum(axis=(1, 3, 4))),
                      (group[..., 1], (g * d * xhat).sum(axis=(1, 3, 4))),
                      (affine[0], d.sum(axis=(0, 1, 4)).reshape(-1)),
                      (affine[1], (d * xhat).sum(axis=(0, 1, 4)).reshape(-1))):
        np.testing.assert_allclose(got, want, rtol=0,
                                   atol=tol * np.abs(want).max())


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("view", [View(256, 1, 1, 256, 1),   # LayerNorm rows
                                  View(8, 1, 64, 1, 784)],   # InstanceNorm
                         ids=["rows", "segments"])
def test_fused_backward_adds_every_items_affine_sums(view, dtype, rng):
    """Where the fused backward's items share columns, each fills its own
    partial of the affine sums and the kernel adds them all into the
    first: ``(sum dy, sum dy*xhat)`` per column match float64 (and
    ``dx`` the float64 formula)."""
    flat = cpu.as_kernel_array(np.empty(1, dtype))
    plan = make_plan(view, whole_samples=cpu._backward_takes_whole_samples(
        flat, view))
    assert plan.fused and affine_slots(plan, view) > 1
    inputs, d, xhat = _random_backward_inputs(view, dtype, rng)
    x, dy, mean, rstd, gscale = inputs
    _assert_fused_backward(view, inputs, d, xhat,
                           *cpu.backward(dy, x, view, mean, rstd, gscale))


def _assert_fused_backward(view, inputs, d, xhat, dx, sum_dy, sum_dyx):
    """``dx`` and the affine sums ``(sum dy, sum dy*xhat)`` per column of a
    backward of :func:`_random_backward_inputs` ``(inputs, d, xhat)``
    match float64."""
    _, _, K, J, _ = view.dims
    x, _, _, rstd, gscale = inputs
    dtype = x.dtype
    g = gscale.reshape(1, 1, K, J, 1) * d
    n = view.group_size
    want_dx = rstd[:, None, :, None, None] * (
        g - g.sum(axis=(1, 3, 4), keepdims=True) / n
        - xhat * (g * xhat).sum(axis=(1, 3, 4), keepdims=True) / n)
    tol = SUMS_TOL[np.dtype(dtype)]
    for got, want in ((sum_dy, d.sum(axis=(0, 1, 4)).reshape(-1)),
                      (sum_dyx, (d * xhat).sum(axis=(0, 1, 4)).reshape(-1))):
        np.testing.assert_allclose(got, want, rtol=0,
                                   atol=tol * np.abs(want).max())
    dx_tol = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 2e-6,
              np.dtype(np.float16): 2e-3}[np.dtype(dtype)]
    np.testing.assert_allclose(np.asarray(dx, np.float64).reshape(want_dx.shape),
                               want_dx, rtol=0,
                               atol=dx_tol * np.abs(want_dx).max())


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("rows_per_item", [151, 51, 2 * cpu.PAIR_DISTANCE])
def test_fused_backward_pairs_rows_far_apart(dtype, rows_per_item, rng):
    """Rows of :data:`~normkit.backend.cpu.PAIRED_ROW_BYTES` go two at a
    time, :data:`~normkit.backend.cpu.PAIR_DISTANCE` rows apart, in blocks
    of twice that: over items of whole blocks, of a block and a part of
    one with an odd row left over, and of less than a block, ``dx`` and
    the affine sums match float64."""
    width = cpu.PAIRED_ROW_BYTES // np.dtype(dtype).itemsize
    view = View(151, 1, 1, width, 1)
    plan = Plan(rows_per_item, -(-view.P // rows_per_item), 1, 1, 1, 1,
                width, 1)
    inputs, d, xhat = _random_backward_inputs(view, dtype, rng)
    x, dy, mean, rstd, gscale = inputs
    flat_x, flat_dy, mean, rstd, gscale = cpu._backward_inputs(
        dy, x, view, mean, rstd, gscale, True)
    dx = np.empty_like(flat_x)
    part_affine = np.zeros((affine_slots(plan, view), 2, width))
    cpu.backward_fused(flat_dy, flat_x, dx, *view.dims, tuple(plan), mean,
                       rstd, gscale, part_affine, True)
    _assert_fused_backward(view, inputs, d, xhat,
                           cpu.from_kernel_array(dx, x.shape, x.dtype),
                           *part_affine[0])


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_backward_over_many_wide_rows_takes_one_block_per_thread(dtype, rng):
    """Rows too wide for the partials of :func:`make_plan`'s blocks, with
    :data:`~normkit.backend.cpu.THREAD_BLOCK_ROWS` rows per thread: the
    backward is fused over one block of rows per thread, and ``dx`` and
    the affine sums match float64.  With a row fewer per thread, with
    partials beyond :data:`~normkit.backend.cpu.THREAD_PARTIAL_BYTES`, or
    over anything but rows, it is not."""
    rows_per_thread = cpu.THREAD_BLOCK_ROWS
    n, width = thread_count(), 20000
    view = View(rows_per_thread * n, 1, 1, width, 1)
    flat = cpu.as_kernel_array(np.empty(1, dtype))
    assert not affine_partials_fit(make_plan(view), view)
    assert (cpu._backward_plan(flat, view, True, True)
            == (thread_blocks(view, n), True))
    inputs, d, xhat = _random_backward_inputs(view, dtype, rng)
    x, dy, mean, rstd, gscale = inputs
    _assert_fused_backward(view, inputs, d, xhat,
                           *cpu.backward(dy, x, view, mean, rstd, gscale))
    too_wide = cpu.THREAD_PARTIAL_BYTES // 16 + 1
    for other in (View(rows_per_thread * n - n, 1, 1, width, 1),
                  View(64 * n, 1, 1, too_wide, 1),
                  View(rows_per_thread * n, 2, 1, width, 1)):
        assert not cpu._thread_blocks_pay(flat, other, n)


# (each pair of dtypes compiles the parallel kernel anew: 12 to 16 s)
@pytest.mark.parametrize("dtype, out_dtype", [("float16", "float64"),
                                              ("float16", "input"),
                                              ("bfloat16", "input")])
@pytest.mark.parametrize("rows", [3, cpu.AFFINE_BLOCK_ROWS,
                                  cpu.AFFINE_BLOCK_ROWS + 9])
def test_column_sums_of_16_bit_rows_match_float64(dtype, out_dtype, rows,
                                                   rng):
    """Over wide rows of 16-bit storage, summed by blocks of columns
    (``column_sums``, items of several blocks), each block's affine sums
    are float32 sums of the rows, written as they are over up to
    ``AFFINE_BLOCK_ROWS`` rows, else added into float64 every
    ``AFFINE_BLOCK_ROWS`` rows: over a few rows, exactly that many and
    more, the sums match float64, written into float64 or rounded once
    into the input's dtype, and the group sums too."""
    dt = (pytest.importorskip("ml_dtypes").bfloat16 if dtype == "bfloat16"
          else np.dtype(dtype))
    view = View(rows, 1, 1, 20 * cpu.COLUMN_BLOCK + 123, 1)
    plan = reduction_plan(view, 2)
    # items of two whole column blocks and a part of one
    assert column_sums(plan, view) and plan.l_per > 2 * cpu.COLUMN_BLOCK
    (x, dy, mean, rstd, gscale), d, xhat = _random_backward_inputs(view, dt,
                                                                   rng)
    flat_x, flat_dy, mean, rstd, gscale = cpu._backward_inputs(
        dy, x, view, mean, rstd, gscale, True)
    kj = view.K * view.J
    out = [np.full(kj, np.nan, np.float64 if out_dtype == "float64" else dt)
           for _ in range(2)]
    group = cpu.column_sums_of(flat_dy, flat_x, *view.dims, tuple(plan), mean,
                               rstd, gscale, cpu._group_partials(view, plan),
                               *(cpu.as_kernel_array(o) for o in out))
    g = gscale.reshape(1, 1, 1, -1, 1) * d
    tol = SUMS_TOL[np.dtype(np.float16)]
    if out_dtype == "input":  # one rounding to the input's dtype
        tol += 2.0 ** -8 if dtype == "bfloat16" else 2.0 ** -11
    for got, want in ((group[:, 0, 0], g.sum(axis=(1, 3, 4))[:, 0]),
                      (group[:, 0, 1], (g * xhat).sum(axis=(1, 3, 4))[:, 0]),
                      (out[0], d.sum(axis=(0, 1, 4)).reshape(-1)),
                      (out[1], (d * xhat).sum(axis=(0, 1, 4)).reshape(-1))):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0,
                                   atol=tol * np.abs(want).max())


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("J, B", [(1, 49), (2, 24)])
@pytest.mark.parametrize("k_per", [25, 43], ids=["blocks-of-groups", "all-groups"])
def test_backward_sums_down_the_rows_in_blocks_of_columns(dtype, J, B, k_per,
                                                          rng):
    """Segments of up to ROWS_SUMS_SEGMENT values are summed down the rows
    a block of at most ROWS_SUMS_COLUMNS columns at a time, the blocks of
    each item starting at its first group: over two whole blocks of groups
    and a part (one item of all groups), items whose last block is cut
    short by the item's end, an odd number of rows beyond a whole
    AFFINE_BLOCK_ROWS, the group and per-channel sums match float64."""
    L = J * B
    assert L <= cpu.ROWS_SUMS_SEGMENT
    per_block = cpu.ROWS_SUMS_COLUMNS // L
    P, K = 2, 43
    assert 2 * per_block < K < 3 * per_block
    A = cpu.AFFINE_BLOCK_ROWS + 9
    _check_backward_sums(View(P, A, K, J, B),
                         Plan(1, P, k_per, -(-K // k_per), A, 1, L, 1), dtype,
                         rng)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("l_per", [2 * (cpu.TILE + 300), 2000],
                         ids=["whole-segments", "cut-segments"])
def test_backward_sums_of_segments_a_tile_at_a_time(dtype, l_per, rng):
    """Segments (``B > 1``) too long or too few rows to be summed down the
    rows are summed a segment at a time, in tiles of TILE values (a whole
    tile and a part), and a piece of one tile at most without a tile loop:
    over items of whole segments and items that cut a channel's segment
    (pieces of 1324, 676 and 648 values), two channels per group, the
    group and per-channel sums match float64."""
    P, A, K, J, B = 2, 3, 4, 2, cpu.TILE + 300
    L = J * B
    assert B > cpu.TILE and L > cpu.ROWS_SUMS_SEGMENT and A < cpu.ROW_STEP
    _check_backward_sums(View(P, A, K, J, B),
                         Plan(1, P, 2, 2, A, 1, l_per, -(-L // l_per)), dtype,
                         rng)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("use_dy", [False, True], ids=["map", "map-with-dy"])
@pytest.mark.parametrize("blocks", [2, 0], ids=["blocks-and-a-part", "one-part"])
def test_short_segments_are_mapped_in_blocks_of_groups(dtype, use_dy, blocks,
                                                       rng):
    """An item whose groups of short segments make rows of more than
    SHORT_MAP_VALUES values is mapped a block of whole groups at a time
    (segments shorter than BLOCK_MAP_SEGMENT, fewer than twice as many
    values as rows), its coefficient vectors in the item's scratch
    (``_map_scratch``, sized for the largest block, or for every group
    where they are fewer): every block, the last one partial, matches the
    map's formula ``(x - m) * (a*gamma + h) + dy * (e*gamma) + (beta +
    c)``, the forward's and the backward's (``dy``)."""
    P, A, L = 2, 8, 9
    K = blocks * (cpu.SHORT_MAP_VALUES // L) + 3   # whole blocks and a part
    assert (K * L > cpu.SHORT_MAP_VALUES) == (blocks > 0)
    assert L < cpu.BLOCK_MAP_SEGMENT and L < 2 * A
    view = View(P, A, K, 1, L)
    x = rng.normal(3.0, 2.0, size=view.dims).astype(dtype)
    dy = rng.normal(size=view.dims).astype(dtype)
    coef = rng.normal(size=(P, K, cpu.N_COEF))
    gamma = rng.uniform(0.5, 2.0, K)
    beta = rng.normal(size=K)
    flat = cpu.as_kernel_array(x)
    out = np.empty_like(flat)
    plan = (1, P, K, 1, A, 1, L, 1)   # one item per p, every group in it
    flat_dy = cpu.as_kernel_array(dy)
    cpu.apply(flat, flat_dy if use_dy else flat_dy[:0], out, *view.dims, plan,
              coef, *cpu._affine_params(gamma, beta, K, flat))
    _assert_map_follows_its_formula(out, x, dy if use_dy else None, coef,
                                    gamma, beta)


def _assert_map_follows_its_formula(out, x, dy, coef, gamma, beta):
    """The kernel array ``out`` of ``cpu.apply`` over ``x`` (the view's
    dims as its shape) is ``(x - m) * (a*gamma + h) + dy * (e*gamma) +
    (beta + c)`` with ``coef``'s ``(m, a, h, e, c)`` (no ``dy`` term for
    None), within the dtype's rounding."""
    K, J = x.shape[2:4]
    y = cpu.from_kernel_array(out, x.shape, x.dtype).astype(np.float64)
    m, a, h, e, c = (coef[:, None, :, None, None, i] for i in range(cpu.N_COEF))
    g = gamma.reshape(1, 1, K, J, 1)
    expected = ((x.astype(np.float64) - m) * (a * g + h)
                + beta.reshape(1, 1, K, J, 1) + c)
    if dy is not None:
        expected += dy.astype(np.float64) * (e * g)
    scale = np.abs(expected).max()
    tol = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5,
           np.dtype(np.float16): 2e-3}[x.dtype]
    np.testing.assert_allclose(y, expected, rtol=0, atol=tol * scale)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("use_dy", [False, True], ids=["map", "map-with-dy"])
@pytest.mark.parametrize("J, plan", [
    (1, (1, 2, 3, 1, 5, 1, 600, 1)),      # whole segments, every row
    (2, (1, 2, 3, 1, 2, 3, 350, 2)),      # chunks of rows and of segments
], ids=["whole-segments", "chunks"])
def test_segments_of_several_rows_and_groups_are_mapped_row_by_row(
        dtype, use_dy, J, plan, rng):
    """Where an item holds several rows ``a`` of several groups of long
    segments, the map goes row by row in memory order
    (``_map_rows_of_segments``, its columns' coefficients in the item's
    scratch): with every segment whole and with items cut across rows and
    across segments (a chunk of offsets ending inside a channel's
    segment), each value matches the map's formula ``(x - m) *
    (a*gamma + h) + dy * (e*gamma) + (beta + c)``."""
    P, A, K, L = 2, 5, 3, 600
    view = View(P, A, K, J, L // J)
    assert 2 * L > cpu.TILE   # not the short segments' blocks
    x = rng.normal(3.0, 2.0, size=view.dims).astype(dtype)
    dy = rng.normal(size=view.dims).astype(dtype)
    coef = rng.normal(size=(P, K, cpu.N_COEF))
    gamma = rng.uniform(0.5, 2.0, K * J)
    beta = rng.normal(size=K * J)
    flat = cpu.as_kernel_array(x)
    out = np.full_like(flat, np.nan if flat.itemsize > 2 else 0x7E00)
    flat_dy = cpu.as_kernel_array(dy)
    cpu.apply(flat, flat_dy if use_dy else flat_dy[:0], out, *view.dims, plan,
              coef, *cpu._affine_params(gamma, beta, K * J, flat))
    _assert_map_follows_its_formula(out, x, dy if use_dy else None, coef,
                                    gamma, beta)
