"""Timing helpers shared by ``python -m normkit`` and ``benchmarks/compare.py``.

A :class:`Case` names one configuration (variant, shape, channel axis,
dtype).  :func:`make_inputs` builds its data and keyword arguments, which
the normkit forward, the float64 reference (:mod:`normkit.reference`) and
``torch.nn.functional`` all accept under the same names.
:func:`implementations` then returns every timed callable of the case (the
copy baseline, normkit, the reference and, when installed, torch), all in
training mode, for :func:`median_times` to run.
"""

import argparse
import ctypes
from dataclasses import dataclass, replace
import os
import platform
import statistics
import time

import numba
import numpy as np

import normkit
from normkit import engine, reference

try:
    import torch
except ImportError:  # torch is optional: its columns are left empty
    torch = None
else:
    torch.set_num_threads(numba.get_num_threads())

#: Variants timed, in table order.
VARIANTS = ("batch_norm", "instance_norm", "layer_norm", "group_norm",
            "batch_renorm")

#: Variants that ``torch.nn.functional`` has under the same name.
TORCH_VARIANTS = ("batch_norm", "instance_norm", "layer_norm", "group_norm",
                  "rms_norm")

#: Variants normalizing the trailing axis (``axis`` is ignored).
ROW_VARIANTS = ("layer_norm", "rms_norm")


@dataclass(frozen=True)
class Case:
    """One configuration to check or time.

    Attributes
    ----------
    variant : str
        One of :data:`VARIANTS`, or "rms_norm" or "ghost_batch_norm" (timed
        by the benchmark script, not by ``normkit check``).
    shape : tuple of int
        Shape of the input as stored (channels-last shapes end with ``C``).
    axis : int
        Channel axis, 1 (channels-first) or -1 (channels-last); layer_norm
        always normalizes the last axis and ignores it.
    dtype : str
        ``"float16"``, ``"bfloat16"`` (needs ``ml_dtypes``), ``"float32"``
        or ``"float64"``.
    groups : int
        Number of groups of group_norm.
    virtual_batch_size : int
        Samples per ghost batch of ghost_batch_norm.
    normalized_ndim : int
        Trailing axes that layer_norm and rms_norm normalize over (3: a
        whole (C, H, W) sample).
    """

    variant: str
    shape: tuple
    axis: int = 1
    dtype: str = "float32"
    groups: int = 32
    virtual_batch_size: int = 8
    normalized_ndim: int = 1

    @property
    def layout(self):
        """``"rows"`` for layer_norm and rms_norm (``"sample"`` over more
        than one trailing axis), else ``"first"`` or ``"last"``."""
        if self.variant in ROW_VARIANTS:
            return "rows" if self.normalized_ndim == 1 else "sample"
        return "first" if self.axis == 1 else "last"

    @property
    def label(self):
        """``"variant AxBxC layout"``, and the dtype unless float32: one
        row's name in the benchmark scripts' tables."""
        dtype = "" if self.dtype == "float32" else f" {self.dtype}"
        shape = "x".join(map(str, self.shape))
        return f"{self.variant} {shape} {self.layout}{dtype}"


@dataclass
class Inputs:
    """Data of a :class:`Case`: input ``x``, gradient ``dy`` and ``kwargs``.

    ``kwargs`` holds every argument after ``x`` by keyword, in the names
    shared by the normkit forward, the reference forward and backward, and
    ``torch.nn.functional`` (``axis`` excepted).  The forwards in training
    mode update running statistics in place in normkit (the reference
    works on copies), so compute reference results first when comparing.
    """

    x: np.ndarray
    dy: np.ndarray
    kwargs: dict


def _affine(rng, channels, dtype):
    return {"weight": (1.0 + 0.1 * rng.standard_normal(channels)).astype(dtype),
            "bias": (0.1 * rng.standard_normal(channels)).astype(dtype)}


def numpy_dtype(name):
    """The NumPy dtype called ``name``; ``"bfloat16"`` is ``ml_dtypes``'."""
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _variant_kwargs(case, rng):
    """Keyword arguments of ``case.variant`` in training mode."""
    channels = case.shape[case.axis]
    dtype = numpy_dtype(case.dtype)
    if case.variant in ROW_VARIANTS:
        normalized = case.shape[len(case.shape) - case.normalized_ndim:]
        params = _affine(rng, normalized, dtype)
        if case.variant == "rms_norm":
            del params["bias"]
        return {"normalized_shape": normalized, **params}
    kwargs = {**_affine(rng, channels, dtype), "axis": case.axis}
    if case.variant == "batch_norm":
        kwargs.update(running_mean=np.zeros(channels, dtype),
                      running_var=np.ones(channels, dtype), training=True)
    elif case.variant == "ghost_batch_norm":
        kwargs.update(running_mean=np.zeros(channels, dtype),
                      running_var=np.ones(channels, dtype), training=True,
                      virtual_batch_size=case.virtual_batch_size)
    elif case.variant == "group_norm":
        kwargs["num_groups"] = case.groups
    elif case.variant == "batch_renorm":
        # running statistics away from the batch's, so that r != 1, d != 0
        kwargs.update(
            running_mean=(3.0 + 0.1 * rng.standard_normal(channels)).astype(dtype),
            running_std=rng.uniform(1.0, 3.0, channels).astype(dtype),
            training=True)
    elif case.variant != "instance_norm":
        raise ValueError(f"unknown variant {case.variant!r}")
    return kwargs


def tiny(case):
    """``case`` over two samples with every axis but the channels (or the
    normalized row) of length 1: a call whose time is a pass's fixed
    cost."""
    if case.variant in ROW_VARIANTS:
        kept = {len(case.shape) - 1}
    else:
        kept = {case.axis % len(case.shape)}
    shape = tuple(2 if i == 0 else n if i in kept else 1
                  for i, n in enumerate(case.shape))
    return replace(case, shape=shape)


def make_inputs(case, seed=0):
    """Random inputs of ``case``: ``x`` with mean 3 and std 2, ``dy`` normal.

    Returns
    -------
    Inputs
    """
    rng = np.random.default_rng(seed)
    dtype = numpy_dtype(case.dtype)
    x = (3.0 + 2.0 * rng.standard_normal(case.shape)).astype(dtype)
    dy = rng.standard_normal(case.shape).astype(dtype)
    return Inputs(x, dy, _variant_kwargs(case, rng))


# --------------------------------------------------------------------------
# the implementations
# --------------------------------------------------------------------------

def normkit_forward(variant, inputs):
    """normkit training forward: ``y``."""
    return getattr(normkit, variant)(inputs.x, **inputs.kwargs)


def normkit_forward_backward(variant, inputs):
    """normkit forward and backward: ``(y, dx, dweight, dbias)``."""
    y, saved = getattr(normkit, variant)(inputs.x, **inputs.kwargs,
                                         return_saved=True)
    backward = getattr(normkit, f"{variant}_backward")
    return (y, *backward(inputs.dy, inputs.x, saved))


def engine_callables(saved, inputs):
    """The forward and the backward that the record ``saved`` of a
    training forward over ``inputs`` describes, through the engine alone:
    ``(forward, backward)``, :func:`normkit.engine.normalize_batch` over
    the recorded view with the inputs' weight and bias, and
    :func:`normkit.engine.backward` with the recorded statistics and
    weight.  They compute what the API's forward and backward compute,
    without its checks, record, running statistics or the gradients'
    casts: the backend's kernels and their dispatch."""
    weight = inputs.kwargs.get("weight")
    bias = inputs.kwargs.get("bias")
    gscale = None if saved.weight is None else saved.weight.reshape(-1)
    need_affine = saved.weight is not None or saved.has_bias

    def forward():
        return engine.normalize_batch(inputs.x, saved.view, weight, bias)

    def backward():
        return engine.backward(
            inputs.dy, inputs.x, saved.view, saved.mean, saved.rstd, gscale,
            saved.batch_stats, need_affine, saved.centered)

    return forward, backward


def reference_forward(variant, inputs):
    """float64 reference forward: ``y`` (running statistics dropped)."""
    out = getattr(reference, variant)(inputs.x, **inputs.kwargs)
    return out[0] if isinstance(out, tuple) else out


def reference_forward_backward(variant, inputs):
    """float64 reference forward and backward: ``(y, dx, dweight, dbias)``."""
    y = reference_forward(variant, inputs)
    backward = getattr(reference, f"{variant}_backward")
    return (y, *backward(inputs.dy, inputs.x, **inputs.kwargs))


def _torch_tensor(array, channels_last, device="cpu"):
    """``array`` as a tensor on ``device``; channels-last data becomes an
    (N, C, ...) tensor whose memory stays channels-last
    (``torch.channels_last`` for 4-D)."""
    if array.dtype.name == "bfloat16":  # torch does not know ml_dtypes'
        t = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(array)
    t = t.to(device)
    if channels_last:
        t = t.movedim(-1, 1)
        if t.ndim == 4:
            t = t.contiguous(memory_format=torch.channels_last)
    return t


def torch_callables(case, inputs, device="cpu"):
    """torch forward and forward+backward (autograd) of ``case``, with the
    tensors on ``device`` (``"cuda"`` for the GPU benchmarks).

    Returns
    -------
    (forward, forward_backward) : zero-argument callables
        Or None when torch is not installed or lacks the variant.
    """
    if torch is None or case.variant not in TORCH_VARIANTS:
        return None
    channels_last = case.layout == "last"
    x = _torch_tensor(inputs.x, channels_last, device).requires_grad_()
    dy = _torch_tensor(inputs.dy, channels_last, device)
    kwargs = {}
    for name, value in inputs.kwargs.items():
        if isinstance(value, np.ndarray):
            value = _torch_tensor(value.copy(), False, device).requires_grad_(
                name in ("weight", "bias"))
        if name != "axis":
            kwargs[name] = value
    leaves = [x] + [t for t in kwargs.values()
                    if isinstance(t, torch.Tensor) and t.requires_grad]
    function = getattr(torch.nn.functional, case.variant)

    def forward():
        return function(x, **kwargs)

    def forward_backward():
        for leaf in leaves:
            leaf.grad = None
        function(x, **kwargs).backward(dy)

    return forward, forward_backward


def implementations(case, inputs):
    """Every timed callable of ``case`` that is available, by column name.

    Returns
    -------
    dict of str to callable
        ``"copy"`` (``x.copy()``, the allocating copy that every
        normalizer's output costs at least), ``"fwd"`` and ``"fwd+bwd"``
        (normkit), ``"ref fwd"`` and ``"ref fwd+bwd"`` (the float64
        reference) and, when torch has the variant, ``"torch fwd"`` and
        ``"torch fwd+bwd"``.  All run in training mode.
    """
    v = case.variant
    timed = {"copy": inputs.x.copy,
             "fwd": lambda: normkit_forward(v, inputs),
             "fwd+bwd": lambda: normkit_forward_backward(v, inputs),
             "ref fwd": lambda: reference_forward(v, inputs),
             "ref fwd+bwd": lambda: reference_forward_backward(v, inputs)}
    pair = torch_callables(case, inputs)
    if pair is not None:
        timed["torch fwd"], timed["torch fwd+bwd"] = pair
    return timed


# --------------------------------------------------------------------------
# timing and reporting
# --------------------------------------------------------------------------

def balanced_order(n):
    """Indices ``0 .. n-1`` in a cyclic order of ``n**2`` calls in which
    every index follows every index, itself included, exactly once.

    Read cyclically: the last call is followed by the first.  The order is
    an Euler circuit of the complete directed graph on ``n`` vertices with
    loops (Hierholzer's algorithm: a closed walk, then closed walks over the
    pairs still unused spliced in where they start).  Each step takes the
    index called least recently, which spreads every index's ``n`` calls
    over the cycle.
    """
    successors_left = [list(range(n)) for _ in range(n)]
    last_call = [0] + [-1] * (n - 1)
    order = [0]
    position = 0
    while position < len(order):
        loop = []
        current = order[position]
        while successors_left[current]:
            following = min(successors_left[current],
                            key=lambda j: (last_call[j], j))
            successors_left[current].remove(following)
            loop.append(following)
            last_call[following] = position + len(loop)
            current = following
        order[position + 1:position + 1] = loop
        position += 1
    return order[:-1]


def runs_per_callable(repeat, n):
    """Timed runs of each of ``n`` callables that :func:`median_times`
    makes for ``repeat``: ``repeat`` rounded up to whole cycles of
    :func:`balanced_order`, ``n`` runs of each per cycle."""
    return n * -(-repeat // n)


def median_times(fns, repeat=5, warmup=2):
    """Median wall time in seconds of each callable in the dict ``fns``.

    After ``warmup`` untimed runs of each (compilation, page faults,
    caches), the callables are timed in whole cycles of
    :func:`balanced_order` (:func:`runs_per_callable` runs of each, at
    least ``repeat``): every callable follows every callable, itself
    included, equally often, and each one's runs are spread over the whole
    measurement.  A thread pool that keeps its threads spinning for a
    moment after a parallel pass (Numba's and torch's both do), or a
    callable that leaves the caches full of its own data, then weighs on
    each of them alike, and so does a drift of the machine's speed.
    """
    names = list(fns)
    if not names:
        return {}
    order = balanced_order(len(names))
    if warmup:
        # end on the callable that ends each cycle: the first timed run
        # follows what it follows in every later cycle
        first = (order[-1] + 1) % len(names)
        for name in names[first:] + names[:first]:
            for _ in range(warmup):
                fns[name]()
    times = {name: [] for name in names}
    for _ in range(runs_per_callable(repeat, len(names)) // len(names)):
        for index in order:
            start = time.perf_counter()
            fns[names[index]]()
            times[names[index]].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


#: glibc's ``mallopt`` parameters (``malloc.h``).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Bytes below which :func:`keep_freed_memory` has glibc keep freed blocks.
KEPT_BYTES = 1 << 30


def keep_freed_memory():
    """Have glibc's ``malloc`` keep the memory that this process frees,
    up to :data:`KEPT_BYTES` a block, and serve later allocations from it.

    By default glibc gives a large freed block back to the system (a block
    of more than its mmap threshold, which grows with the blocks freed up
    to 32 MiB, or the top of the heap beyond twice that), so a pass that
    allocates its outputs afresh may, or may not, pay a page fault for
    every page it writes, depending on what the process allocated before
    (``python benchmarks/heap.py``).  With the two thresholds fixed at
    :data:`KEPT_BYTES`, every pass after the first writes memory already
    mapped.  This changes the allocator of the whole process, for normkit,
    NumPy and torch alike: for benchmarks, not for a library to do behind
    its users' backs (``GLIBC_TUNABLES=glibc.malloc.trim_threshold=...:
    glibc.malloc.mmap_threshold=...`` does the same from outside).

    Returns
    -------
    bool
        Whether glibc accepted both settings (False without glibc).
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    return (mallopt(_M_TRIM_THRESHOLD, KEPT_BYTES) == 1
            and mallopt(_M_MMAP_THRESHOLD, KEPT_BYTES) == 1)


def median_after(fns, before, repeat):
    """Median wall time in seconds of each callable in the dict ``fns``,
    each timed alone right after an untimed call of ``before`` (the
    callables taking turns, ``repeat`` rounds): what a call costs where
    ``before`` has left the caches and the thread pools."""
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            before()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


#: The passes of ``benchmarks/compare.py``'s normkit.torch table: torch's
#: module, normkit.torch's eager and compiled modules, and normkit on the
#: NumPy arrays.
ADAPTER_TIMED = ("torch", "normkit.torch", "normkit.torch compiled", "numpy")


def adapter_times(seconds, step):
    """One pass (``step``: ``"fwd"`` or ``"fwd+bwd"``) of a normkit.torch
    cell: ``{name: seconds[f"{name} {step}"]}`` for each of
    :data:`ADAPTER_TIMED`."""
    return {name: seconds[f"{name} {step}"] for name in ADAPTER_TIMED}


def positive_int(text):
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def machine_info():
    """One line: CPU count, numba threads and library versions."""
    versions = [f"numpy {np.__version__}", f"numba {numba.__version__}",
                f"torch {torch.__version__}" if torch else "torch not installed"]
    return (f"{platform.machine()} {os.cpu_count()} CPUs, "
            f"{numba.get_num_threads()} numba threads, normkit "
            f"{normkit.__version__}, " + ", ".join(versions))


def format_table(headers, rows, markdown=False):
    """Aligned text table; numbers right-aligned, text left-aligned.

    Parameters
    ----------
    headers : sequence of str
    rows : sequence of sequences of str
        Already formatted cells.
    markdown : bool
        Pipe-delimited markdown instead of space-separated columns.
    """
    rows = [list(map(str, row)) for row in rows]
    widths = [max(len(cell) for cell in column)
              for column in zip(headers, *rows)]
    numeric = [bool(rows) and all(_is_number(row[i]) for row in rows)
               for i in range(len(headers))]

    def line(cells):
        padded = [cell.rjust(w) if num else cell.ljust(w)
                  for cell, w, num in zip(cells, widths, numeric)]
        return ("| " + " | ".join(padded) + " |") if markdown else "  ".join(padded)

    if markdown:
        rule = "|" + "|".join(("-" * (w + 1) + ":") if num else "-" * (w + 2)
                              for w, num in zip(widths, numeric)) + "|"
    else:
        rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule] + [line(row) for row in rows])


def _is_number(cell):
    """True for numeric cells and for the placeholders of missing ones."""
    if cell in ("-", "skipped"):
        return True
    try:
        float(cell.rstrip("x"))
    except ValueError:
        return False
    return True
