"""The two custom operators every normkit torch module runs through.

``normkit::scheme_forward(x, params, buffers, key, signature, training)
-> (y, mean, rstd, aux, new_buffers)`` runs the ``_forward`` of the scheme
registered under ``key`` on NumPy views (CPU) or Numba views (CUDA) of the
tensors; ``signature`` names its class and settings
(:func:`scheme_signature`, see :func:`forward` for why it travels).  It is
functional, as torch requires of an operator with an autograd formula:
the scheme updates copies of the running statistics, returned as
``new_buffers``, which the module copies into its buffers (``C`` values
each; under ``torch.compile`` that copy is part of the graph).
``normkit::scheme_backward(dy, x, params, mean, rstd, aux, key,
signature, training) -> [dx, *dparams]`` rebuilds the scheme's
:class:`~normkit.Saved` record and runs its ``_backward``.

How the :class:`~normkit.Saved` record crosses from one to the other
--------------------------------------------------------------------
A custom operator may only return tensors of shapes its fake (meta)
implementation can predict, while a scheme's record holds arrays of its
own choosing (``mean``, ``rstd``, Batch Renormalization's ``r`` and ``d``,
``var``, a plug-in's ``extras``) next to plain Python values (the view,
flags, the gradient function).  The record is therefore split in two:

- its arrays travel as flat float64 tensors: ``mean``, ``rstd``, and
  ``aux``, every other array (``var``, ``r``, ``d`` and each array in
  ``extras``, in that order) and every number in ``extras``
  (SyncBatchNorm's global ``count``, which depends on the other ranks'
  batches, not on this one's shape) concatenated;
- the rest is a *layout*: the record with its arrays taken out, plus the
  shapes of ``mean`` and ``rstd`` and the name, shape and dtype of each
  piece of ``aux``.  A scheme's layout must depend only on its settings,
  the input's shape, dtype and memory layout and the mode (true of every
  built-in; a plug-in whose record changes shape with the data cannot
  run here), so it is cached per scheme under that key by every forward.
  The fake implementation reads the three sizes from it; when it is asked
  first (``torch.compile`` tracing, ``opcheck``), it runs the scheme once
  on a zero input of the same shape with copies of the buffers (nothing
  the caller owns changes) to learn it.  That dry run contacts no other
  process: a scheme setting that is a
  :class:`~normkit.distributed.Communicator` is replaced for it by a
  rehearsal of the same size whose collectives return placeholders of
  the right shape (a trace on one rank must not start a collective the
  others never join).

Where the input's sizes are symbols (``torch.compile`` with dynamic
shapes, ``torch.export`` with a ``Dim``), the sizes of the three tensors
are products of those symbols, which dry runs at the symbols' hints and
at each hint doubled find (:func:`_traced_sizes`), so that one graph
serves every batch or image size; an input size that moves them in any
other way is specialized, and torch traces again for another value.

The backward joins the two again: the cached layout, the tensors saved by
autograd, and NumPy views of the parameters as they are now.

Eager mode
----------
Through the operators, a call pays for their dispatch (their list
arguments flattened and rebuilt, their autograd wrapper) and for their
functional form (buffers cloned and copied back, the record packed into
tensors and unpacked).  The modules call :func:`forward`, which, when
nothing needs the operators (no ``torch.compile``/``torch.export``
trace, no dispatch mode such as fake tensors, functionalization or
debugging modes, no ``torch.func`` transform, no tensor subclass), runs
the same forward and backward as one ``torch.autograd.Function``
(:class:`_Eager`): the scheme updates the buffers in place, and the
scheme and its record stay on the autograd context for the backward.
Results are the same bit for bit; a second derivative raises either way.

torch.func transforms
---------------------
torch 2.13 runs a custom operator's autograd formula as an
``autograd.Function`` without ``setup_context``, which ``grad`` and
``jacrev`` refuse, and has no ``vmap`` rule for it.  Under a transform
(outside any trace or dispatch mode) :func:`forward` therefore runs
:class:`_Transformed`, the operators' work (functional, as theirs) as an
``autograd.Function`` the transforms accept, whose backward is another
(:class:`_TransformedBackward`) and whose ``vmap`` rules run the scheme
once per slice.

Memory and streams
------------------
The tensors the operators return (``y``, ``dx``), in the input's memory
format, are allocated by torch on CUDA (its caching allocator) and by
NumPy on the CPU (``torch.from_numpy``: NumPy asks the kernel for huge
pages for arrays of 4 MiB and more, torch's CPU allocator does not, and
the first write of a fresh large output in 4 KiB pages costs a page
fault every 4 KiB; docs/benchmarks.rst, "normkit.torch against torch's
modules", has the before and after), and handed to the scheme as
``out`` / ``dx_out``
(:func:`normkit.schemes.base.forward_into`), so the kernels write them
directly; the input reaches the kernels without a copy.  On
CUDA every launch, allocation and host <-> device copy of normkit runs on
torch's current stream of the input's device
(:func:`normkit.backend.cuda.launch_stream` with
``numba.cuda.external_stream``), so it is ordered with torch's own work
without synchronizing, and tensors are imported without Numba's
per-array synchronization (``as_cuda_array(..., sync=False)``).
"""

import builtins
import contextlib
import itertools
import math
import numbers
import weakref

import numpy as np
import torch
from torch.fx.experimental.symbolic_shapes import (guard_int,
                                                   is_concrete_int,
                                                   optimization_hint)
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import __version__, backend
from ..backend.plan import thread_count
from ..distributed import Communicator
from ..schemes.base import Saved, backward_into, forward_into

__all__ = ["scheme_forward", "scheme_backward", "register_scheme",
           "NormkitInputError"]

_SAVED_ARRAYS = ("var", "r", "d")

def _bfloat16_dtype():
    """``ml_dtypes``' bfloat16 NumPy dtype (the kernels read it in place),
    or None without ``ml_dtypes``."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


#: NumPy's view of torch.bfloat16 on the CPU, when ml_dtypes is installed.
_BFLOAT16 = _bfloat16_dtype()


def _in_place(t):
    """Whether the kernels read and write ``t``'s memory as it is: every
    dtype but bfloat16 on a GPU, or without ``ml_dtypes``."""
    return t.dtype != torch.bfloat16 or (not t.is_cuda and _BFLOAT16 is not None)


#: The NumPy dtype the kernels see for each tensor dtype.
_NUMPY_DTYPES = {torch.float16: np.float16,
                 torch.bfloat16: np.float32 if _BFLOAT16 is None else _BFLOAT16,
                 torch.float32: np.float32, torch.float64: np.float64}


class NormkitInputError(TypeError, RuntimeError):
    """A tensor of the wrong dtype or device for a normkit torch module.

    A ``RuntimeError`` where torch raises one for the same problem, and a
    ``TypeError`` as normkit's NumPy checks raise."""


# --------------------------------------------------------------------------
# schemes by key
# --------------------------------------------------------------------------

class _Entry:
    """A registered scheme template, its state names and cached layouts."""

    def __init__(self, scheme, param_names, buffer_names):
        self.scheme = scheme
        self.param_names = tuple(param_names)
        self.buffer_names = tuple(buffer_names)
        self.layouts = {}
        self.channel_axis = getattr(scheme, "axis", None) == 1
        self.signature = scheme_signature(scheme)


_ENTRIES = weakref.WeakValueDictionary()
#: Keys from 2**32: ``torch.compile`` never reads a size of 0 or 1 as a
#: symbol (:func:`forward`), and gives one symbol to sizes of the same
#: value when it first meets them ("duck sizing"): a key equal to an
#: input's size (a batch of 2 beside key 2) would tie the two, and a
#: second batch size would trace again.  No input has a size this large.
_KEYS = itertools.count(1 << 32)


def register_scheme(scheme, param_names, buffer_names):
    """Register ``scheme`` (a template whose settings every call copies) and
    return ``(key, entry)``: a number unique in this process, and the
    entry, which lives as long as the caller keeps it.  The operators take
    the key and the entry's ``signature`` (:func:`scheme_signature`).
    Starts Numba's thread pool keeping torch's thread count
    (:func:`~normkit.backend.plan.thread_count`): where the pool started
    inside a ``torch.compile`` trace (the layout's dry run as a process's
    first normkit work) after ``torch.set_num_threads(k)``, its change of
    the shared OpenMP runtime's count made dynamo refuse the trace
    ("Global num_threads state changed while dynamo tracing"); every
    scheme the operators run is registered here first, outside any trace
    and off the per-call path."""
    thread_count()
    entry = _Entry(scheme, param_names, buffer_names)
    key = next(_KEYS)
    _ENTRIES[key] = entry
    return key, entry


def scheme_signature(scheme):
    """``scheme``'s class and settings as text, the same in every process
    for the same settings and normkit version: ``normkit <version>:
    module.Class(name=value, ...)``, arrays by shape and dtype.  The
    layout of its record depends on nothing else but the input (see *How
    the Saved record crosses*); the version keeps inductor's on-disk cache
    from serving a graph made by another normkit, whose operators may
    pack the record otherwise.  A setting whose ``repr`` holds an address
    only makes the text differ between processes."""
    cls = type(scheme)
    settings = []
    for name, value in sorted(vars(scheme).items()):
        if isinstance(value, np.ndarray):
            settings.append(f"{name}=array{value.shape}:{value.dtype}")
        elif not (name.startswith("_") or name in ("training", "grads")
                  or (name in scheme.state_names and value is not None)):
            settings.append(f"{name}={value!r}")  # not a counter's value
    return (f"normkit {__version__}: {cls.__module__}.{cls.__qualname__}"
            f"({', '.join(settings)})")


def _traced_entry(key, signature):
    """The entry a fake implementation reads: ``key``'s, or, where the key
    is symbolic (one graph for every module whose signature is
    ``signature``, see :func:`forward`), any live entry with that
    signature, whose record has the same layout."""
    if isinstance(key, int):
        return _entry(key)
    for entry in list(_ENTRIES.values()):
        if entry.signature == signature:
            return entry
    raise RuntimeError(f"normkit: no scheme registered as {signature}")


def _entry(key):
    try:
        return _ENTRIES[key]
    except KeyError:
        raise RuntimeError(f"normkit: no scheme registered under key {key}: "
                           f"its module was deleted, or the graph calling it "
                           f"was made in another process (a compiled or "
                           f"exported graph runs in the process whose "
                           f"modules it calls)") from None


class _Rehearsal:
    """A communicator for the layout's dry run: the size and rank of the
    real one, no process contacted.  Its all-gathers return 2s (every
    rank holding values) and its all-reduces 0s (no rank failed), shaped
    as the real collectives' results; the dry run keeps only shapes."""

    device_arrays = False

    def __init__(self, real):
        self.rank, self.size = real.rank, real.size

    def allgather(self, a):
        return np.full((self.size,) + tuple(a.shape), 2.0)

    def allreduce(self, a):
        return np.zeros(tuple(a.shape))


def _bind(entry, training, state, channels_last, rehearse=False):
    """A scheme over the given arrays with the template's settings
    (``rehearse``: communicators replaced by :class:`_Rehearsal`)."""
    template = entry.scheme
    settings = dict(vars(template))
    for name in ("_tape", "grads", "training"):
        settings.pop(name, None)
    if rehearse:
        settings = {name: _Rehearsal(value)
                    if isinstance(value, Communicator) else value
                    for name, value in settings.items()}
    settings.update(state)
    if channels_last:
        settings["axis"] = -1
    return type(template).bound(template.label, training, **settings)


# --------------------------------------------------------------------------
# tensors as arrays, without copies
# --------------------------------------------------------------------------

def _channels_last(x, entry):
    """True when ``x`` is handed to the kernels as its channels-last view:
    a 4-D or 5-D tensor laid out channels-last but not contiguous, for a
    scheme with a channel ``axis`` (1, switched to -1 for the view), unless
    it is the scheme's unbatched input (no batch axis to keep first)."""
    if (not entry.channel_axis or x.dim() not in (4, 5)
            or x.is_contiguous()
            or x.dim() == getattr(entry.scheme, "unbatched_ndim", None)):
        return False
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return x.is_contiguous(memory_format=fmt)


def _perm(ndim):
    return (0,) + tuple(range(2, ndim)) + (1,)


def _inverse_perm(ndim):
    return (0, ndim - 1) + tuple(range(1, ndim - 1))


def _kernel_shape(shape, channels_last):
    """The shape of the array the kernels see for an input of ``shape``:
    that one, or the (N, spatial..., C) permutation's."""
    shape = tuple(int(s) for s in shape)
    if channels_last:
        shape = tuple(shape[i] for i in _perm(len(shape)))
    return shape


def _array(t, channels_last=False):
    """A NumPy view (CPU) or Numba device array (CUDA) of ``t``'s memory;
    ``channels_last``: of the (N, spatial..., C) permutation.  bfloat16 is
    viewed as ``ml_dtypes.bfloat16`` on the CPU, and widened to float32
    (one copy) on a GPU or without ``ml_dtypes``."""
    t = t.detach()
    if channels_last:
        t = t.permute(_perm(t.dim()))
    if t.dtype == torch.bfloat16:
        if _in_place(t):
            return t.view(torch.int16).numpy().view(_BFLOAT16)
        t = t.float()
    if t.is_cuda:
        from numba import cuda
        # no synchronization on import: normkit's work is queued on torch's
        # current stream (_torch_stream), after whatever produced t
        return cuda.as_cuda_array(t, sync=False)
    return t.numpy()


def _host_empty(like, channels_last, dtype):
    """An uninitialized CPU tensor of ``like``'s shape, of ``dtype``, laid
    out as :func:`_empty_like_input` lays it out, in memory NumPy
    allocated: NumPy asks the kernel for huge pages for arrays of 4 MiB
    and more, and torch's CPU allocator does not (see *Memory and
    streams* above)."""
    shape = _kernel_shape(like.shape, channels_last)
    if dtype == torch.bfloat16:  # torch takes no NumPy bfloat16: its bits
        t = torch.from_numpy(np.empty(shape, np.int16)).view(dtype)
    else:
        t = torch.from_numpy(np.empty(shape, _NUMPY_DTYPES[dtype]))
    return t.permute(_inverse_perm(len(shape))) if channels_last else t


def _output(like, entry, channels_last):
    """The result for input ``like`` (its shape, device and memory format,
    :func:`_empty_like_input`; on the CPU in NumPy's memory,
    :func:`_host_empty`; ``channels_last``: :func:`_channels_last` of
    ``like``), the buffer the kernels write into (the same tensor, or a
    float32 one where bfloat16 cannot be read in place,
    :func:`_in_place`), and a function returning the result once they
    have."""
    if like.is_cuda:
        result = _empty_like_input(like, entry)
        work = (result if _in_place(result)
                else torch.empty_like(result, dtype=torch.float32))
    else:
        result = _host_empty(like, channels_last, like.dtype)
        work = (result if _in_place(result)
                else _host_empty(like, channels_last, torch.float32))
    if work is result:
        return result, result, lambda: result
    return result, work, lambda: result.copy_(work)


def _torch_stream(x):
    """For a CUDA tensor ``x``: a context in which normkit's launches,
    allocations and copies run on torch's current stream of ``x``'s device
    (with that device current for Numba); for CPU tensors, one that does
    nothing (a shared ``nullcontext``, cheaper than a generator's)."""
    return _device_stream(x) if x.is_cuda else _NO_STREAM


_NO_STREAM = contextlib.nullcontext()


@contextlib.contextmanager
def _device_stream(x):
    """:func:`_torch_stream` of a CUDA tensor."""
    from numba import cuda
    from ..backend.cuda import launch_stream
    index = x.device.index
    if index is None:
        index = torch.cuda.current_device()
    with cuda.gpus[index]:
        stream = torch.cuda.current_stream(x.device)
        with launch_stream(cuda.external_stream(stream.cuda_stream)):
            yield


def _tensor(a, like, channels_last=False, dtype=None):
    """``a`` (a kernel result) as a tensor on ``like``'s device, without a
    copy where possible; ``channels_last`` permutes back."""
    if isinstance(a, np.ndarray) and a.dtype == _BFLOAT16:
        t = torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(
            torch.bfloat16)
    elif isinstance(a, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(a))
    else:
        t = torch.as_tensor(a, device=like.device)
    if channels_last:
        t = t.permute(_inverse_perm(t.dim()))
    dtype = like.dtype if dtype is None else dtype
    return t if t.dtype == dtype else t.to(dtype)


def _empty_like_input(x, entry):
    """The tensor the operators return for ``x``'s shape: contiguous, or
    channels-last when the input is handed over channels-last."""
    if _channels_last(x, entry):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return torch.empty(x.shape, dtype=x.dtype, device=x.device,
                           memory_format=fmt)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _state(entry, params, buffers):
    """Scheme state: arrays viewing ``params`` and ``buffers``, counters as
    ints.  Returns ``(state, write_back)`` where ``write_back`` lists the
    ``(tensor, name)`` pairs to copy back after the call (counters and
    bfloat16 buffers)."""
    state, write_back = {}, []
    for name, t in zip(entry.param_names, params):
        state[name] = _array(t)
    for name, t in zip(entry.buffer_names, buffers):
        if not t.is_floating_point():
            state[name] = int(t.item())
            write_back.append((t, name))
        else:
            state[name] = _array(t)
            if not _in_place(t):
                write_back.append((t, name))
    return state, write_back


# --------------------------------------------------------------------------
# the Saved record as tensors
# --------------------------------------------------------------------------

def _layout_key(x, training, entry, shape=None):
    """What a record's layout depends on: ``shape`` (default ``x``'s, as
    ints), ``x``'s dtype, memory layout and device, and the mode."""
    shape = tuple(int(s) for s in (x.shape if shape is None else shape))
    return (shape, x.dtype, _channels_last(x, entry), x.device.type,
            bool(training))


def _host64(a):
    if isinstance(a, np.ndarray) or np.isscalar(a):
        return np.asarray(a, np.float64)
    return np.asarray(backend.to_host(a), np.float64)  # on the launch stream


def _is_number(value):
    """A plain number (Python or NumPy scalar, not a flag): it travels in
    ``aux`` and comes back as the same type."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _pack(saved):
    """``(mean, rstd, aux, layout)`` of a Saved record: the first three as
    float64 NumPy arrays."""
    pieces = []
    for name in _SAVED_ARRAYS:
        value = getattr(saved, name)
        if value is not None:
            pieces.append((("field", name), value))
    extras = {}
    for name, value in saved.extras.items():
        if _is_number(value):
            pieces.append((("number", name), value))
        elif hasattr(value, "shape") and hasattr(value, "dtype"):
            pieces.append((("extra", name), value))
        else:
            extras[name] = value
    arrays = [_host64(value).reshape(-1) for _, value in pieces]
    aux = np.concatenate(arrays) if arrays else np.zeros(0)
    mean, rstd = _host64(saved.mean), _host64(saved.rstd)
    layout = {
        "skeleton": saved.replace(mean=None, rstd=None, weight=None, r=None,
                                  d=None, var=None, extras=extras),
        "mean": mean.shape, "rstd": rstd.shape,
        "aux": [(where, tuple(np.shape(value)),
                 type(value) if where[0] == "number" else np.dtype(value.dtype))
                for where, value in pieces],
    }
    return mean, rstd, aux, layout


def _unpack(layout, mean, rstd, aux, weight):
    """The Saved record of ``layout`` with its arrays from the tensors."""
    def host(t):
        return t.detach().cpu().numpy()

    def place(a, dtype):
        a = a.astype(dtype, copy=False)
        if mean.is_cuda:
            return backend.to_device(a)  # on the launch stream
        return a

    fields, extras = {}, dict(layout["skeleton"].extras)
    flat, offset = host(aux), 0
    for (kind, name), shape, dtype in layout["aux"]:
        size = math.prod(shape)
        if kind == "number":
            value = dtype(flat[offset].item())
        else:
            value = place(flat[offset:offset + size].reshape(shape), dtype)
        offset += size
        (fields if kind == "field" else extras)[name] = value
    return layout["skeleton"].replace(
        mean=place(host(mean).reshape(layout["mean"]), np.float64),
        rstd=place(host(rstd).reshape(layout["rstd"]), np.float64),
        weight=weight, extras=extras, **fields)


#: Python's own functions under the names that ``torch.export``'s
#: non-strict trace replaces while it runs (with a ``functools.partial``
#: and a lambda that also take tensors).
_BUILTINS = {(builtins, "max"): builtins.max, (builtins, "min"): builtins.min,
             (math, "pow"): math.pow}


@contextlib.contextmanager
def _python_builtins():
    """:data:`_BUILTINS` restored for the duration (then whatever was
    there before).  The layout's dry run may be the process's first Numba
    compilation, or its first load from Numba's cache, which resolves
    ``max`` and ``min`` in the kernels and registers ``math.pow`` in
    Numba's typing tables: under the trace's replacements the first fails
    to type and the second raises ``AttributeError`` from Numba."""
    present = {place: getattr(*place) for place in _BUILTINS}
    for (module, name), value in _BUILTINS.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for (module, name), value in present.items():
            setattr(module, name, value)


def _layout(entry, x, training, shape=None):
    """The cached layout for ``x`` (or for an input like ``x`` of
    ``shape``); computed by a dry run on zeros with copies of the buffers
    when no forward of this kind has run yet."""
    key = _layout_key(x, training, entry, shape)
    layout = entry.layouts.get(key)
    if layout is None:
        channels_last = key[2]
        zeros = np.zeros(_kernel_shape(key[0], channels_last),
                         _NUMPY_DTYPES[x.dtype])
        state = {}
        for name in entry.param_names:
            state[name] = np.ones(np.shape(getattr(entry.scheme, name)))
        for name in entry.buffer_names:
            value = getattr(entry.scheme, name)
            state[name] = value if isinstance(value, int) else np.array(value)
        scheme = _bind(entry, training, state, channels_last, rehearse=True)
        with _python_builtins():
            _, saved = scheme._forward(zeros)
        layout = _pack(saved)[3]
        entry.layouts[key] = layout
    return layout


def _record_sizes(layout):
    """The sizes of the record's tensors ``(mean, rstd, aux)`` (each
    flattened) for ``layout``."""
    return (math.prod(layout["mean"]), math.prod(layout["rstd"]),
            sum(math.prod(shape) for _, shape, _ in layout["aux"]))


def _traced_sizes(entry, x, training):
    """:func:`_record_sizes` for a traced input ``x``, whose sizes may be
    symbols (``torch.compile`` with dynamic shapes).

    A record size proportional to some of the input's symbolic sizes (a
    mean per sample, per ghost batch or per channel: every built-in's) is
    returned as their product with a constant, so that one graph serves
    every value of those sizes.  Which sizes it is proportional to, dry
    runs tell: one at the symbols' hints, then one with each symbol's hint
    doubled in turn (the record size doubles, or stays).  An input size
    that moves a record size in any other way, or whose doubled dry run
    fails (a channel count must match the parameters), is specialized to
    its hint: torch guards on it and traces again for another value.
    """
    shape = tuple(x.shape)
    if all(is_concrete_int(size) for size in shape):
        return _record_sizes(_layout(entry, x, training))
    hints = tuple(optimization_hint(size) for size in shape)
    base = _record_sizes(_layout(entry, x, training, hints))
    constants, factors = list(base), [[] for _ in base]
    for axis, size in enumerate(shape):
        if is_concrete_int(size):
            continue
        hint = hints[axis]
        try:
            doubled = _record_sizes(_layout(
                entry, x, training,
                hints[:axis] + (2 * hint,) + hints[axis + 1:]))
        except Exception:  # whatever the scheme refuses: not proportional
            doubled = None
        if doubled is None or not all(
                new == old or (new == 2 * old and constant % hint == 0)
                for old, new, constant in zip(base, doubled, constants)):
            guard_int(size)
            continue
        for i, (old, new) in enumerate(zip(base, doubled)):
            if new != old:
                constants[i] //= hint
                factors[i].append(size)
    return tuple(math.prod(symbols, start=constant)
                 for constant, symbols in zip(constants, factors))


# --------------------------------------------------------------------------
# the operators
# --------------------------------------------------------------------------

def _run_forward(entry, x, params, buffers, training):
    """``(y, scheme, saved)``: the forward of ``entry``'s scheme (bound to
    views of the tensors, returned) and its record; the scheme updates
    ``buffers`` in place."""
    channels_last = _channels_last(x, entry)
    if not channels_last and not x.is_contiguous():
        x = x.contiguous()
    y, work, finish = _output(x, entry, channels_last)
    with _torch_stream(x):
        state, write_back = _state(entry, params, buffers)
        scheme = _bind(entry, training, state, channels_last)
        _, saved = forward_into(scheme, _array(x, channels_last),
                                _array(work, channels_last))
        for t, name in write_back:
            value = getattr(scheme, name)
            if isinstance(value, (int, np.integer)):
                t.fill_(int(value))
            else:
                t.copy_(_tensor(value, t))
    if not isinstance(saved, Saved):
        raise TypeError(f"{scheme.label}: normkit.torch needs a scheme "
                        f"whose _forward returns a normkit.Saved record, "
                        f"got {type(saved).__name__}")
    return finish(), scheme, saved


def _scheme_forward(x: torch.Tensor, params: list[torch.Tensor],
                    buffers: list[torch.Tensor], key: int, signature: str,
                    training: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                               torch.Tensor, list[torch.Tensor]]:
    """Forward of the scheme registered under ``key``: ``(y, mean, rstd,
    aux, new_buffers)``.

    The operator is functional (torch allows an autograd formula only for
    those): the scheme updates copies of the buffers, returned as
    ``new_buffers`` for the caller to copy back (a few values per channel).
    """
    entry = _entry(key)
    buffers = [b.clone() for b in buffers]
    y, _, saved = _run_forward(entry, x, params, buffers, training)
    with _torch_stream(x):
        mean, rstd, aux, layout = _pack(saved)
    entry.layouts[_layout_key(x, training, entry)] = layout
    stats = [torch.from_numpy(np.array(a, np.float64).reshape(-1)).to(
        x.device) for a in (mean, rstd, aux)]
    return (y, *stats, buffers)


scheme_forward = torch.library.custom_op(
    "normkit::scheme_forward", mutates_args=())(_scheme_forward)


@scheme_forward.register_fake
def _(x, params, buffers, key, signature, training):
    entry = _traced_entry(key, signature)
    stats = [x.new_empty((size,), dtype=torch.float64)
             for size in _traced_sizes(entry, x, training)]
    return (_empty_like_input(x, entry), *stats,
            [torch.empty_like(b) for b in buffers])


def _run_backward(entry, dy, x, params, prepare):
    """``[dx, *dparams]`` of ``entry``'s scheme for ``x`` and ``dy``:
    ``prepare(channels_last)`` returns the scheme and its
    :class:`~normkit.Saved` record (``channels_last``:
    :func:`_channels_last` of ``x``); a parameter the scheme returns no
    gradient for gets zeros."""
    channels_last = _channels_last(x, entry)
    if not channels_last and not x.is_contiguous():
        x = x.contiguous()
    if channels_last:
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        dy = dy.contiguous(memory_format=fmt)
    dx, work, finish = _output(x, entry, channels_last)
    with _torch_stream(x):
        scheme, saved = prepare(channels_last)
        _, grads = backward_into(scheme, _array(dy, channels_last),
                                 _array(x, channels_last), saved,
                                 _array(work, channels_last))
        out = [finish()]
        for name, t in zip(entry.param_names, params):
            grad = grads.get(name)
            if grad is None:
                out.append(torch.zeros_like(t))
                continue
            grad = _tensor(grad, t)
            # a reshape costs microseconds even to the same shape
            out.append(grad if grad.shape == t.shape else grad.reshape(t.shape))
    return out


def _scheme_backward(dy: torch.Tensor, x: torch.Tensor,
                     params: list[torch.Tensor], mean: torch.Tensor,
                     rstd: torch.Tensor, aux: torch.Tensor, key: int,
                     signature: str, training: bool) -> list[torch.Tensor]:
    """``[dx, *dparams]`` for the forward whose record is ``(mean, rstd,
    aux)``; a parameter the scheme returns no gradient for gets zeros."""
    entry = _entry(key)
    layout = _layout(entry, x, training)

    def prepare(channels_last):
        # the parameters as they are now, the record from the tensors
        state = {name: _array(t) for name, t in zip(entry.param_names, params)}
        return (_bind(entry, training, state, channels_last),
                _unpack(layout, mean, rstd, aux, state.get("weight")))
    return _run_backward(entry, dy, x, params, prepare)


scheme_backward = torch.library.custom_op(
    "normkit::scheme_backward", mutates_args=())(_scheme_backward)


@scheme_backward.register_fake
def _(dy, x, params, mean, rstd, aux, key, signature, training):
    return ([_empty_like_input(x, _traced_entry(key, signature))]
            + [torch.empty_like(t) for t in params])


def _setup_context(ctx, inputs, output):
    x, params, _buffers, key, signature, training = inputs
    _y, mean, rstd, aux, _new_buffers = output
    ctx.save_for_backward(x, mean, rstd, aux, *params)
    ctx.key, ctx.signature, ctx.training = key, signature, training
    ctx.n_buffers = len(_buffers)


def _backward(ctx, dy, _dmean, _drstd, _daux, _dbuffers):
    x, mean, rstd, aux, *params = ctx.saved_tensors
    grads = scheme_backward(dy, x, params, mean, rstd, aux, ctx.key,
                            ctx.signature, ctx.training)
    return (grads[0], list(grads[1:]), [None] * ctx.n_buffers, None, None,
            None)


scheme_forward.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------
# eager mode without the operators' dispatch
# --------------------------------------------------------------------------

class _Eager(torch.autograd.Function):
    """The operators' work as one ``torch.autograd.Function``, for eager
    calls (:func:`forward`): the same forward and backward, without the
    operators' dispatch (their list arguments flattened and rebuilt,
    their autograd wrapper) and without their functional form: the scheme
    updates the buffers in place, and the scheme and its
    :class:`~normkit.Saved` record stay on the autograd context for the
    backward instead of being bound again and travelling as tensors.
    ``state`` is the parameters, then the buffers."""

    # forward(ctx, ...) rather than a separate setup_context, which would
    # have apply() bind the arguments to forward's signature on every call
    @staticmethod
    def forward(ctx, x, entry, training, n_params, *state):
        params = state[:n_params]
        y, scheme, record = _run_forward(entry, x, params, state[n_params:],
                                         training)
        ctx.save_for_backward(x, *params)
        # the scheme views the parameters' memory, which autograd's version
        # check on the saved parameters guards until the backward
        ctx.entry, ctx.scheme_and_record = entry, (scheme, record)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, *params = ctx.saved_tensors
        grads = _run_backward(ctx.entry, dy, x, params,
                              lambda channels_last: ctx.scheme_and_record)
        return (grads[0], None, None, None, *grads[1:],
                *[None] * (len(ctx.needs_input_grad) - 4 - len(params)))


# --------------------------------------------------------------------------
# torch.func transforms
# --------------------------------------------------------------------------

def _slice(t, dim, i):
    """Slice ``i`` of ``t`` along its vmapped ``dim`` (``t`` itself for
    ``dim`` None): a view, so a scheme writing a buffer's slice writes the
    buffer."""
    return t if dim is None else t.select(dim, i)


class _PerSlice(list):
    """What :class:`_Transformed`'s ``vmap`` rule returns for the record:
    one entry per slice (a ``(scheme, record)`` pair, or another
    ``_PerSlice`` under nested vmaps)."""


def _record_of(records, i):
    """The record of slice ``i``: its own entry of a :class:`_PerSlice`,
    or the one record of a forward that was not mapped."""
    return records[i] if isinstance(records, _PerSlice) else records


class _Transformed(torch.autograd.Function):
    """The operators' work as a ``torch.autograd.Function`` that the
    ``torch.func`` transforms accept (a separate ``setup_context``, a
    ``vmap`` rule), for :func:`forward` under a transform.  Functional as
    the operators are: the forward returns ``y``, its ``(scheme, record)``
    pair (a :class:`_PerSlice` of them under ``vmap``) and the updated
    copies of the buffers (None for a buffer left as it was, as in eval
    mode), which :func:`forward` copies back with torch's own ``copy_``,
    so the transforms treat that update as they treat torch's layers'
    (refused into a tensor the function captured, under ``grad`` as under
    ``vmap``).  The backward is
    :class:`_TransformedBackward`, so that it too runs under the
    transforms.  ``vmap`` runs the scheme once per slice of the mapped
    dimension: each slice is normalized on its own, as ``vmap`` means;
    in training, buffers the scheme updates must be mapped too (one set
    per slice), or ``vmap`` raises, as for torch's layers.  ``state`` is
    the parameters, then the buffers."""

    @staticmethod
    def forward(x, entry, training, n_params, *state):
        buffers = [b.clone() for b in state[n_params:]]
        y, scheme, record = _run_forward(entry, x, state[:n_params], buffers,
                                         training)
        return (y, (scheme, record),
                *[None if torch.equal(new, old) else new
                  for new, old in zip(buffers, state[n_params:])])

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, entry, _training, n_params, *state = inputs
        ctx.save_for_backward(x, *state[:n_params])
        ctx.mark_non_differentiable(*[t for t in output[2:]
                                      if t is not None])
        ctx.entry, ctx.record = entry, output[1]
        ctx.n_buffers = len(state) - n_params

    @staticmethod
    def backward(ctx, dy, _record, *_buffers):
        x, *params = ctx.saved_tensors
        grads = _TransformedBackward.apply(dy, x, ctx.entry, ctx.record,
                                           *params)
        return (grads[0], None, None, None, *grads[1:],
                *[None] * ctx.n_buffers)

    @staticmethod
    def vmap(info, in_dims, x, entry, training, n_params, *state):
        slices = [_Transformed.apply(
            _slice(x, in_dims[0], i), entry, training, n_params,
            *[_slice(t, d, i) for t, d in zip(state, in_dims[4:])])
            for i in range(info.batch_size)]
        ys, records, *updated = zip(*slices)
        buffers, buffer_dims = [], []
        for old, dim, new in zip(state[n_params:], in_dims[4 + n_params:],
                                 updated):
            if all(t is None for t in new):
                buffers.append(None)     # left alone (eval)
                buffer_dims.append(None)
            elif dim is None:
                raise RuntimeError(
                    f"{entry.scheme.label}: vmap would update its running "
                    f"statistics once per slice, and they are not mapped: "
                    f"map them too (one set per slice), or use eval() or "
                    f"track_running_stats=False")
            else:
                buffers.append(torch.stack([
                    _slice(old, dim, i) if t is None else t
                    for i, t in enumerate(new)]))
                buffer_dims.append(0)
        return ((torch.stack(ys), _PerSlice(records), *buffers),
                (0, None, *buffer_dims))


class _TransformedBackward(torch.autograd.Function):
    """``[dx, *dparams]`` of :class:`_Transformed`'s forward from its
    ``(scheme, record)`` pairs; per slice under ``vmap`` (the per-sample
    gradients of ``vmap(grad(...))``).  No second derivative."""

    @staticmethod
    def forward(dy, x, entry, record, *params):
        return tuple(_run_backward(entry, dy, x, params,
                                   lambda channels_last: record))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.label = inputs[2].scheme.label

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"{ctx.label}: normkit computes no second "
                           f"derivative")

    @staticmethod
    def vmap(info, in_dims, dy, x, entry, record, *params):
        grads = [_TransformedBackward.apply(
            _slice(dy, in_dims[0], i), _slice(x, in_dims[1], i), entry,
            _record_of(record, i),
            *[_slice(t, d, i) for t, d in zip(params, in_dims[4:])])
            for i in range(info.batch_size)]
        return (tuple(torch.stack(each) for each in zip(*grads)),
                (0,) * len(grads[0]))


#: Tensor types run eagerly by :func:`forward` (no subclass: a fake,
#: functional or distributed tensor goes through the operators).
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _route(tensors):
    """How :func:`forward` runs: :class:`_Eager` (``"eager"``) for plain
    CPU or CUDA tensors made outside inference mode, with no
    ``torch.compile``/``torch.export`` trace, no dispatch mode (fake
    tensors, functionalization, debugging modes) and no ``torch.func``
    transform active; :class:`_Transformed` (``"transformed"``) under a
    transform outside any trace or dispatch mode; the operators
    (``"operators"``) otherwise."""
    if (torch.compiler.is_compiling()
            or _get_current_dispatch_mode() is not None):
        return "operators"
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return "transformed"
    for t in tensors:
        # inference tensors too: torch refuses to change one outside
        # inference mode, which the operators' copy back tells before any
        # buffer is written, and the views would not
        if (type(t) not in _PLAIN or t.device.type not in ("cpu", "cuda")
                or t.is_inference()):
            return "operators"
    return "eager"


def forward(x, params, buffers, module, training):
    """The output of ``scheme_forward(x, params, buffers, key, signature,
    training)`` for ``module`` (a :class:`~normkit.torch.SchemeModule`),
    with its autograd, and the buffers updated: through the operators when
    tracing, under a dispatch mode, or for tensor subclasses, and through
    :class:`_Transformed` under a ``torch.func`` transform (the new
    buffers copied in, see *torch.func transforms* above); otherwise
    through :class:`_Eager` with the module's entry, which skips the
    operators' dispatch (see *Eager mode* above).

    The operators take the module's ``_operator_key``: its entry's
    signature, a constant of the graph, and its key, the second size of
    its ``_normkit_key`` tensor,
    which ``torch.compile`` reads as a symbol once a second module's key
    has come by: one graph then serves every module of one signature (the
    blocks of a model compiled one by one), not one per module.  The
    signature also keeps apart the graphs that inductor's on-disk cache
    serves to later processes, where another scheme may have the same
    number.

    Returns
    -------
    torch.Tensor
    """
    route = _route([x, *params, *buffers])
    if route == "eager":
        # the scheme writes the buffers through views: their versions move
        # as copy_ would move them
        for buffer in buffers:
            torch.autograd.graph.increment_version(buffer)
        return _Eager.apply(x, module._entry, training, len(params), *params,
                            *buffers)
    if route == "transformed":
        y, _, *new = _Transformed.apply(x, module._entry, training,
                                        len(params), *params, *buffers)
    else:
        y, _, _, _, new = scheme_forward(x, params, buffers,
                                         *module._operator_key, training)
    for buffer, value in zip(buffers, new):
        if value is not None:  # None: left alone under a transform
            buffer.copy_(value.detach())
    return y
