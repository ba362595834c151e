"""The sweep's cells on a Dask distributed cluster (extra ``normkit[dask]``).

:func:`run_cells` is what :func:`normkit.analysis.run_sweep` calls with a
``scheduler``: every cell is one task running the same
:func:`~normkit.analysis.sweep.train_cell` as a local worker process, and
the finished cells come back to this process, which writes the cell files,
so resuming and interruption work as for a local run.  Every worker should
import the same normkit and Numba as this process (one environment on
every host).
"""

from . import sweep

#: How long to wait for a scheduler (and for a LocalCluster to start).
CONNECT_TIMEOUT = "30s"


class SchedulerUnreachable(ConnectionError):
    """The Dask scheduler given could not be reached (or started)."""


def _warm_on_worker(variants, batch_sizes, settings):
    """Runs on one worker per host: the local warm-up (a spawned process of
    the worker, so the worker itself still loads the kernels from the
    cache)."""
    return sweep.warm_kernel_cache(variants, batch_sizes, settings,
                                   announce=False)


def connect(scheduler, jobs):
    """``(client, cluster)`` for ``scheduler``: an address, ``"local"`` (a
    new ``LocalCluster`` of ``jobs`` single-threaded worker processes on
    127.0.0.1; ``cluster`` is then to be closed by the caller) or a
    ``Client`` (returned as is, with ``cluster`` None)."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise ImportError("running cells on a Dask cluster needs the dask "
                          "extra: python -m pip install 'normkit[dask]'") from None
    if isinstance(scheduler, Client):
        return scheduler, None
    if scheduler == "local":
        try:
            cluster = LocalCluster(n_workers=jobs, threads_per_worker=1,
                                   processes=True, host="127.0.0.1",
                                   dashboard_address=None,
                                   timeout=CONNECT_TIMEOUT)
        except Exception as error:
            raise SchedulerUnreachable(
                f"could not start a LocalCluster on 127.0.0.1: {error}") from error
        try:
            return Client(cluster, timeout=CONNECT_TIMEOUT), cluster
        except BaseException:
            cluster.close()
            raise
    try:
        return Client(scheduler, timeout=CONNECT_TIMEOUT), None
    except Exception as error:
        raise SchedulerUnreachable(
            f"cannot reach a Dask scheduler at {scheduler!r} "
            f"({type(error).__name__}: {error})") from error


def _one_worker_per_host(client):
    hosts = {}
    for address, info in client.scheduler_info()["workers"].items():
        hosts.setdefault(info.get("host", address), address)
    return sorted(hosts.values())


def run_cells(scheduler, todo, jobs, finish, warm=None, on_start=None):
    """Compute ``todo`` (``(task, path)`` pairs of :func:`run_sweep`) on the
    cluster and ``finish(path, cell)`` each as it completes; ``warm`` is
    ``(variants, batch_sizes, settings)`` for the warm-up, or None."""
    from dask.distributed import as_completed
    own = not hasattr(scheduler, "submit")
    client, cluster = connect(scheduler, jobs)
    try:
        if warm is not None:
            for address in _one_worker_per_host(client):
                client.submit(_warm_on_worker, *warm, workers=[address],
                              pure=False, allow_other_workers=False).result()
        if on_start is not None:
            on_start(len(todo))
        futures = {client.submit(sweep._train_task, task, pure=False,
                                 key=f"normkit-cell-{sweep.cell_key(*task)}"):
                   path for task, path in todo}
        try:
            for future in as_completed(futures):
                finish(futures[future], future.result())
        except BaseException:
            client.cancel(list(futures))
            raise
    finally:
        _close(client if own else None, cluster)


def _close(client, cluster):
    """Close what this module opened; the nanny's warnings about workers
    slow to exit on a busy machine are not the user's concern."""
    import logging
    logger = logging.getLogger("distributed")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    finally:
        logger.setLevel(level)
