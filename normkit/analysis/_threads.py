"""Run the study's small arrays on one thread: Numba's and BLAS's.

The study's arrays are far below the size where a second thread pays off,
and on a busy machine waking a thread pool costs more than the work.
One thread also makes every result independent of how many processes run
side by side (the engine's work plan depends on Numba's thread count, and
a BLAS may split a product differently on more threads).
"""

import contextlib
import functools

import numba


def _blas_one_thread():
    """A context limiting BLAS to one thread (threadpoolctl, which
    scikit-learn brings; a no-op without it)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def single_threaded(func):
    """Decorator: ``func`` runs with ``numba.set_num_threads(1)`` and one
    BLAS thread; the previous settings are restored afterwards."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        threads = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            with _blas_one_thread():
                return func(*args, **kwargs)
        finally:
            numba.set_num_threads(threads)
    return wrapper
