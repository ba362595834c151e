"""Run the study's small arrays on one Numba thread.

The study's arrays are far below the size where a second thread pays off,
and on a busy machine waking the thread pool costs more than the kernel.
One thread also makes every result independent of how many processes run
side by side (the engine's work plan depends on the thread count).
"""

import functools

import numba


def single_threaded(func):
    """Decorator: ``func`` runs with ``numba.set_num_threads(1)``, and the
    previous thread count is restored afterwards."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        threads = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            return func(*args, **kwargs)
        finally:
            numba.set_num_threads(threads)
    return wrapper
