"""Communicators: statistics across processes over existing engines.

:class:`~normkit.SyncBatchNorm` and
:func:`~normkit.reestimate_population_statistics` pool statistics over the
processes ("ranks") of a data-parallel job through a :class:`Communicator`,
a small protocol of two collectives on float64 arrays.  normkit ships no
transport of its own; the implementations wrap

- :func:`from_mpi`: mpi4py (``pip install normkit[mpi]`` brings mpi4py and
  the ``mpich`` wheel; launch with ``mpiexec -n 4 python train.py``);
- :func:`from_torch`: ``torch.distributed`` with any backend (gloo on the
  CPU; launch with ``torchrun --nproc_per_node 4 train.py``);
- :func:`local`: one process (size 1, the collectives return their input),
  what a layer without a communicator uses;
- :class:`CountingCommunicator`: any of them, counting the collectives
  (tests, and checking that a step makes the collectives it should).

A communicator that cannot take CUDA device arrays (``device_arrays``
false: MPI from pip, gloo) is handed host float64 copies of the small
per-channel arrays; the activations never leave the device.

Examples
--------
>>> import numpy as np
>>> from normkit import distributed
>>> comm = distributed.CountingCommunicator(distributed.local())
>>> comm.allgather(np.arange(3.0)).tolist(), comm.size, comm.count
([[0.0, 1.0, 2.0]], 1, 1)
"""

from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["Communicator", "from_mpi", "from_torch", "local",
           "CountingCommunicator", "check_communicator"]


@runtime_checkable
class Communicator(Protocol):
    """What a communicator provides.

    Every rank calls each collective with an array of the same shape, in
    the same order; the results are identical on every rank.

    Attributes
    ----------
    rank : int
        This process's index, ``0 <= rank < size``.
    size : int
        Number of processes.
    device_arrays : bool
        Whether the collectives take (and return) CUDA device arrays;
        false: host NumPy arrays only.
    """

    rank: int
    size: int
    device_arrays: bool

    def allgather(self, a):
        """Every rank's ``a`` (float64, any shape), stacked in rank order:
        an array of shape ``(size,) + a.shape``."""

    def allreduce(self, a):
        """The elementwise sum of every rank's ``a`` (float64), same shape."""


def check_communicator(communicator, func):
    """``communicator``, or :func:`local` for None; raises TypeError for an
    object that is not a :class:`Communicator`."""
    if communicator is None:
        return local()
    if not isinstance(communicator, Communicator):
        raise TypeError(f"{func}: communicator must be a "
                        f"normkit.distributed.Communicator (from_mpi(), "
                        f"from_torch(), local()), got "
                        f"{type(communicator).__name__}")
    return communicator


def _host64(a):
    return np.ascontiguousarray(a, dtype=np.float64)


class _Local:
    """One process: the collectives return (a copy of) their input."""

    rank = 0
    size = 1
    device_arrays = True

    def allgather(self, a):
        if isinstance(a, np.ndarray):
            return _host64(a)[None].copy()
        return a.reshape((1,) + tuple(a.shape))

    def allreduce(self, a):
        return _host64(a).copy() if isinstance(a, np.ndarray) else a

    def __repr__(self):
        return "local()"


def local():
    """A communicator of one process: the global batch is the local one.

    Returns
    -------
    Communicator
        ``rank`` 0, ``size`` 1; ``allgather(a)`` is ``a[None]`` and
        ``allreduce(a)`` is ``a``.

    Examples
    --------
    >>> import numpy as np
    >>> from normkit import distributed
    >>> distributed.local().allreduce(np.ones(2)).tolist()
    [1.0, 1.0]
    """
    return _Local()


class _MPI:
    def __init__(self, comm):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.device_arrays = False

    def allgather(self, a):
        a = _host64(a)
        out = np.empty((self.size,) + a.shape)
        self.comm.Allgather(a, out)
        return out

    def allreduce(self, a):
        a = _host64(a)
        out = np.empty_like(a)
        self.comm.Allreduce(a, out)
        return out

    def __repr__(self):
        return f"from_mpi(rank={self.rank}, size={self.size})"


def from_mpi(comm=None):
    """A communicator over an mpi4py communicator.

    Needs mpi4py and an MPI library (``pip install normkit[mpi]`` installs
    mpi4py with the ``mpich`` wheel).  The collectives are the buffer forms
    ``Allgather`` and ``Allreduce`` (``MPI.SUM``) on host float64 arrays.
    MPI has no timeout: a rank that never reaches a collective blocks the
    others until the launcher ends the job (``mpiexec`` does when a rank
    exits with an error; run scripts as ``python -m mpi4py script.py`` so
    that an uncaught exception calls ``MPI_Abort``).

    Parameters
    ----------
    comm : mpi4py.MPI.Comm, optional
        Default ``MPI.COMM_WORLD``.

    Returns
    -------
    Communicator

    Examples
    --------
    Run under ``mpiexec -n 2 python -m mpi4py script.py``:

    >>> from normkit import distributed
    >>> comm = distributed.from_mpi()          # doctest: +SKIP
    >>> comm.allreduce(np.ones(3))             # doctest: +SKIP
    array([2., 2., 2.])
    """
    if comm is None:
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise ImportError("normkit.distributed.from_mpi needs mpi4py and an "
                              "MPI library: pip install 'normkit[mpi]'") from exc
        comm = MPI.COMM_WORLD
    return _MPI(comm)


class _Torch:
    def __init__(self, group):
        import torch
        import torch.distributed as dist
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("normkit.distributed.from_torch: call "
                               "torch.distributed.init_process_group first")
        self.torch = torch
        self.dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        backend = str(dist.get_backend(group)).lower()
        #: NCCL moves device tensors; gloo and MPI host ones here.
        self.device_arrays = backend == "nccl"
        self.device = "cuda" if self.device_arrays else "cpu"

    def _tensor(self, a):
        torch = self.torch
        if isinstance(a, np.ndarray):
            return torch.from_numpy(_host64(a)).to(self.device)
        return torch.as_tensor(a, device=self.device).to(torch.float64)

    def _back(self, t, like):
        if isinstance(like, np.ndarray) or not self.device_arrays:
            return t.cpu().numpy()
        from numba import cuda
        return cuda.as_cuda_array(t.contiguous())

    def allgather(self, a):
        t = self._tensor(a)
        out = self.torch.empty((self.size,) + tuple(t.shape),
                               dtype=t.dtype, device=t.device)
        self.dist.all_gather(list(out.unbind(0)), t, group=self.group)
        return self._back(out, a)

    def allreduce(self, a):
        t = self._tensor(a).clone()
        self.dist.all_reduce(t, group=self.group)
        return self._back(t, a)

    def __repr__(self):
        return (f"from_torch(rank={self.rank}, size={self.size}, "
                f"backend={self.dist.get_backend(self.group)})")


def from_torch(group=None):
    """A communicator over a ``torch.distributed`` process group.

    Any backend: gloo moves host float64 arrays (CPU), NCCL device arrays
    (``Communicator.device_arrays``; float64 collectives).  The group's
    collectives time out after the ``timeout`` given to
    ``torch.distributed.init_process_group`` (a rank that never arrives
    makes the others raise then).

    Parameters
    ----------
    group : torch.distributed.ProcessGroup, optional
        Default the world group; ``init_process_group`` must have run.

    Returns
    -------
    Communicator

    Examples
    --------
    Run under ``torchrun --nproc_per_node 2 script.py``:

    >>> import torch.distributed as dist                # doctest: +SKIP
    >>> dist.init_process_group("gloo")                 # doctest: +SKIP
    >>> comm = normkit.distributed.from_torch()         # doctest: +SKIP
    >>> comm.allgather(np.ones(2)).shape                # doctest: +SKIP
    (2, 2)
    """
    return _Torch(group)


class CountingCommunicator:
    """A communicator that counts the collectives it forwards.

    Parameters
    ----------
    inner : Communicator, optional
        The communicator doing the work (default :func:`local`).

    Attributes
    ----------
    count : int
        Collectives made so far (``allgather`` and ``allreduce``).
    calls : list of tuple
        ``(name, shape)`` of each collective, in order.

    Examples
    --------
    >>> import numpy as np
    >>> import normkit
    >>> comm = normkit.distributed.CountingCommunicator()
    >>> bn = normkit.SyncBatchNorm(64, communicator=comm)
    >>> x = np.random.default_rng(0).standard_normal((4, 64, 3))
    >>> _ = bn(x); _ = bn.backward(np.ones_like(x))
    >>> comm.count, [name for name, _ in comm.calls]
    (2, ['allgather', 'allreduce'])
    """

    def __init__(self, inner=None):
        self.inner = local() if inner is None else inner
        self.count = 0
        self.calls = []

    @property
    def rank(self):
        return self.inner.rank

    @property
    def size(self):
        return self.inner.size

    @property
    def device_arrays(self):
        return self.inner.device_arrays

    def allgather(self, a):
        self.count += 1
        self.calls.append(("allgather", tuple(a.shape)))
        return self.inner.allgather(a)

    def allreduce(self, a):
        self.count += 1
        self.calls.append(("allreduce", tuple(a.shape)))
        return self.inner.allreduce(a)

    def reset(self):
        """Zero the count and forget the calls."""
        self.count = 0
        self.calls = []

    def __repr__(self):
        return f"CountingCommunicator({self.inner!r}, count={self.count})"

