"""Conformance checks that any normalizer can run, built-in or plug-in.

Call them from your own tests (pytest or anything else: a failed check
raises ``AssertionError`` naming the check and what differed)::

    import numpy as np
    from normkit.testing import check_conformance

    def my_reference(x, state, training):      # float64, from the formula
        ...
        return y                               # or (y, expected_state)

    def test_my_norm_conforms():
        x = np.random.default_rng(0).standard_normal((4, 6, 3, 3))
        check_conformance(lambda: MyNorm(6), x, my_reference)

A *factory* is a callable with no arguments returning a fresh layer in its
initial state; the layer follows the :class:`normkit.Normalizer` protocol
(``layer(x)``, ``layer.backward(dy)`` filling ``layer.grads`` keyed by
state names, ``train()`` / ``eval()``, ``state_dict()`` /
``load_state_dict()``).  ``x`` is a small float input (the gradient check
uses it in float64).  The checks:

- :func:`check_forward`: parity with the author's float64 reference in
  training and inference mode, including the state after the call;
- :func:`check_gradients`: ``dx`` and every parameter gradient against
  central finite differences of ``sum(layer(x) * dy)``, with the state
  restored before every evaluation;
- :func:`check_state_dict`: round trip into a fresh layer (same state,
  same outputs), copies not views, bad state rejected without change;
- :func:`check_bad_input`: wrong dtype, wrong type, wrong shape, backward
  before forward and a bad ``dy`` raise ``TypeError`` / ``ValueError`` /
  ``RuntimeError`` naming what was given, and change nothing;
- :func:`check_train_eval`: mode switching, inference that changes no
  state and is deterministic (and, optionally, per sample).
"""

import numpy as np

__all__ = ["check_conformance", "check_forward", "check_gradients",
           "check_state_dict", "check_bad_input", "check_train_eval",
           "FORWARD_TOLERANCE"]

#: Largest forward error allowed, relative to ``max(1, max|reference|)``.
FORWARD_TOLERANCE = {np.dtype(np.float16): 5e-3, np.dtype(np.float32): 2e-5,
                     np.dtype(np.float64): 1e-10}

_MODES = ("train", "eval")


def _layer(factory, mode):
    layer = factory()
    layer.train(mode == "train")
    return layer


def _scaled_error(actual, expected):
    """``max|actual - expected| / max(1, max|expected|)``."""
    expected = np.asarray(expected, np.float64)
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    return float(np.abs(np.asarray(actual, np.float64) - expected).max(initial=0.0)) / scale


def _assert_same_state(before, after, what):
    assert sorted(before) == sorted(after), (
        f"{what}: state keys changed from {sorted(before)} to {sorted(after)}")
    for name in before:
        assert np.array_equal(before[name], after[name], equal_nan=True), (
            f"{what}: state {name!r} changed")


def check_forward(factory, x, reference, modes=_MODES, tolerance=None):
    """Forward parity with ``reference(x, state, training)``.

    ``reference`` gets the layer's ``state_dict()`` before the call and
    returns the expected output, or ``(output, state)`` where ``state``
    holds the expected values of (some of) the state entries after it.
    The output must have ``x``'s shape and dtype and be within
    ``tolerance`` (default :data:`FORWARD_TOLERANCE` of ``x.dtype``) of the
    reference, relative to ``max(1, max|reference|)``.
    """
    tolerance = FORWARD_TOLERANCE[x.dtype] if tolerance is None else tolerance
    for mode in modes:
        layer = _layer(factory, mode)
        state = layer.state_dict()
        expected = reference(x, state, mode == "train")
        expected_state = {}
        if isinstance(expected, tuple):
            expected, expected_state = expected
        y = layer(x)
        assert y.shape == expected.shape and y.dtype == x.dtype, (
            f"check_forward ({mode}): output {y.shape} {y.dtype}, expected "
            f"{expected.shape} {x.dtype}")
        error = _scaled_error(y, expected)
        assert error <= tolerance, (
            f"check_forward ({mode}): output differs from the reference by "
            f"{error:.3g} (tolerance {tolerance:.3g})")
        after = layer.state_dict()
        for name, value in expected_state.items():
            error = _scaled_error(after[name], value)
            assert error <= tolerance, (
                f"check_forward ({mode}): state {name!r} after the call "
                f"differs from the reference by {error:.3g}")


def _sample(size, limit, rng):
    """All flat indices below ``size``, or ``limit`` of them at random."""
    if size <= limit:
        return np.arange(size)
    return rng.choice(size, limit, replace=False)


def check_gradients(factory, x, modes=_MODES, step=1e-6, tolerance=1e-6,
                    max_entries=48, seed=0):
    """``dx`` and ``layer.grads`` against central finite differences.

    The loss is ``sum(layer(x) * dy)`` for a random ``dy``; the state is
    reloaded before every evaluation, so running statistics or other state
    that a forward updates does not drift.  At most ``max_entries`` entries
    of each array are checked (chosen at random from ``seed``).  The error
    is relative to ``max(1, max|finite difference|)``.
    """
    rng = np.random.default_rng(seed)
    x = np.asarray(x, np.float64)
    for mode in modes:
        layer = _layer(factory, mode)
        state = layer.state_dict()
        dy = rng.standard_normal(layer(x).shape)
        layer.load_state_dict(state)
        layer(x)
        analytic = {"x": layer.backward(dy), **layer.grads}
        missing = sorted(set(layer.grads) - set(state))
        assert not missing, (f"check_gradients: grads {missing} are not state "
                             f"entries (state: {sorted(state)})")

        def loss(inputs, params):
            layer.load_state_dict(params)
            return float(np.vdot(layer(inputs), dy))

        for name, grad in analytic.items():
            base = x if name == "x" else state[name]
            assert grad is not None and grad.shape == base.shape, (
                f"check_gradients ({mode}): gradient of {name!r} has shape "
                f"{None if grad is None else grad.shape}, expected {base.shape}")
            numeric = []
            for i in _sample(base.size, max_entries, rng):
                values = []
                for delta in (step, -step):
                    moved = base.copy()
                    moved.flat[i] += delta
                    if name == "x":
                        values.append(loss(moved, state))
                    else:
                        values.append(loss(x, {**state, name: moved}))
                numeric.append((i, (values[0] - values[1]) / (2 * step)))
            index, fd = (np.array(v) for v in zip(*numeric))
            error = _scaled_error(np.asarray(grad, np.float64).flat[index], fd)
            assert error <= tolerance, (
                f"check_gradients ({mode}): gradient of {name!r} differs from "
                f"finite differences by {error:.3g} (tolerance {tolerance:.3g})")
        layer.load_state_dict(state)


def _shifted_inputs(x, steps):
    """``steps`` inputs near ``x`` (shifted and scaled), for training runs."""
    return [(x * (1.0 + 0.1 * k) + 0.1 * k).astype(x.dtype) for k in range(steps)]


def check_state_dict(factory, x, train_steps=3):
    """State round trip and rejection of bad state.

    A layer trained on ``train_steps`` inputs near ``x`` hands its
    ``state_dict()`` to a fresh layer, which must then report the same
    state and give identical outputs in inference and in training.  The
    returned arrays are copies.  A state with a missing, unexpected or
    mis-shaped entry raises ``KeyError`` / ``ValueError`` and changes
    nothing.
    """
    trained = _layer(factory, "train")
    for inputs in _shifted_inputs(x, train_steps):
        trained(inputs)
    state = {name: np.copy(value) for name, value in trained.state_dict().items()}
    scratch = trained.state_dict()
    for value in scratch.values():
        value[...] += 1
    _assert_same_state(state, trained.state_dict(),
                       "check_state_dict (state_dict must return copies)")
    fresh = factory()
    fresh.load_state_dict(state)
    _assert_same_state(state, fresh.state_dict(), "check_state_dict (loaded)")
    for mode in ("eval", "train"):
        trained.train(mode == "train")
        fresh.train(mode == "train")
        assert np.array_equal(trained(x), fresh(x), equal_nan=True), (
            f"check_state_dict ({mode}): a layer loaded from the state gives "
            f"a different output")
        _assert_same_state(trained.state_dict(), fresh.state_dict(),
                           f"check_state_dict ({mode}, after a forward)")
    _check_bad_state(fresh)


def _check_bad_state(layer):
    """Bad ``load_state_dict`` arguments raise and leave ``layer`` as it was."""
    state = layer.state_dict()
    bad = [("unexpected key", KeyError, {**state, "not_a_state_entry": np.zeros(1)})]
    for name, value in state.items():
        bad.append((f"missing {name!r}", KeyError,
                    {k: v for k, v in state.items() if k != name}))
        bad.append((f"mis-shaped {name!r}", ValueError,
                    {**state, name: np.zeros(np.shape(value) + (2,))}))
    for what, error, bad_state in bad:
        try:
            layer.load_state_dict(bad_state)
        except error:
            pass
        else:
            raise AssertionError(f"check_state_dict: a state with {what} was "
                                 f"accepted (expected {error.__name__})")
        _assert_same_state(state, layer.state_dict(),
                           f"check_state_dict (rejected {what})")


def _expect_error(call, errors, mention, what):
    """``call()`` must raise one of ``errors`` with ``mention`` in its text."""
    try:
        call()
    except errors as exc:
        assert mention in str(exc), (
            f"check_bad_input: the error for {what} does not say what was "
            f"given ({mention!r} not in {str(exc)!r})")
    else:
        names = "/".join(e.__name__ for e in errors)
        raise AssertionError(f"check_bad_input: {what} was accepted "
                             f"(expected {names})")


def check_bad_input(factory, x, bad_shapes=None):
    """Clear errors for bad input, raised before anything changes.

    Checked: ``backward`` before any forward (``RuntimeError``); an integer
    array and a list as input (``TypeError`` naming the dtype or type);
    inputs of ``bad_shapes`` (default: ``x`` flattened to 1-D, when that
    changes its shape; ``ValueError``); after a good forward, ``dy`` of a
    wrong shape (``ValueError``), integer dtype or list type
    (``TypeError``).  After each error the state, ``grads`` and the
    recorded forward are unchanged.
    """
    layer = _layer(factory, "train")
    _expect_error(lambda: layer.backward(np.ones_like(x)), (RuntimeError,),
                  "backward", "backward before any forward")
    if bad_shapes is None:
        bad_shapes = [(x.size,)] if x.ndim != 1 else []
    bad_inputs = [("an integer array", (TypeError,), np.ones(x.shape, np.int64), "int64"),
                  ("a list", (TypeError,), x.tolist(), "list")]
    bad_inputs += [(f"an input of shape {shape}", (ValueError,),
                    np.ones(shape, x.dtype), str(shape[-1])) for shape in bad_shapes]

    def reject_all(state):
        for what, errors, bad, mention in bad_inputs:
            _expect_error(lambda: layer(bad), errors, mention, what)
            _assert_same_state(state, layer.state_dict(),
                               f"check_bad_input (after {what})")

    reject_all(layer.state_dict())
    _expect_error(lambda: layer.backward(np.ones_like(x)), (RuntimeError,),
                  "backward", "backward after only failed forwards")
    y = layer(x)
    dy = np.random.default_rng(0).standard_normal(y.shape).astype(x.dtype)
    dx = layer.backward(dy)
    grads = {name: np.copy(g) for name, g in layer.grads.items()}
    state = layer.state_dict()
    reject_all(state)
    bad_dys = [("dy of shape " + str((y.size + 1,)), (ValueError,),
                np.ones(y.size + 1, x.dtype), str(y.size + 1)),
               ("an integer dy", (TypeError,), np.ones(y.shape, np.int64), "int64"),
               ("a list dy", (TypeError,), dy.tolist(), "list")]
    for what, errors, bad, mention in bad_dys:
        _expect_error(lambda: layer.backward(bad), errors, mention, what)
        _assert_same_state(state, layer.state_dict(), f"check_bad_input ({what})")
        _assert_same_state(grads, layer.grads, f"check_bad_input (grads, {what})")
    assert np.array_equal(layer.backward(dy), dx, equal_nan=True), (
        "check_bad_input: after rejected calls, backward no longer matches "
        "the last good forward")


def check_train_eval(factory, x, per_sample=True):
    """Training and inference modes.

    ``train()`` / ``eval()`` return the layer and set ``training``; a new
    layer is in training mode.  After a training step, an inference
    forward changes no state and repeats exactly; a training forward from
    the same state repeats exactly.  With ``per_sample``, the inference
    output of the first sample alone equals its output within the batch.
    """
    layer = factory()
    assert layer.training is True, "check_train_eval: a new layer must be in training mode"
    assert layer.eval() is layer and layer.training is False, (
        "check_train_eval: eval() must return the layer and clear training")
    assert layer.train() is layer and layer.training is True, (
        "check_train_eval: train() must return the layer and set training")
    assert layer.train(False).training is False, (
        "check_train_eval: train(False) must switch to inference")
    layer.train()
    layer(x)
    state = layer.state_dict()
    again = []
    for _ in range(2):
        layer.load_state_dict(state)
        again.append(layer(x))
    assert np.array_equal(*again, equal_nan=True), (
        "check_train_eval: training forwards from the same state differ")
    layer.load_state_dict(state)
    layer.eval()
    first = layer(x)
    _assert_same_state(state, layer.state_dict(), "check_train_eval (inference forward)")
    assert np.array_equal(first, layer(x), equal_nan=True), (
        "check_train_eval: repeated inference forwards differ")
    if per_sample:
        alone = layer(x[:1])
        error = _scaled_error(alone, first[:1])
        assert error <= FORWARD_TOLERANCE[x.dtype], (
            f"check_train_eval: in inference the first sample's output depends "
            f"on the rest of the batch (difference {error:.3g})")


def check_conformance(factory, x, reference=None, *, modes=_MODES,
                      per_sample=True, bad_shapes=None, gradient_modes=None,
                      tolerance=None):
    """Run every check on ``factory`` and ``x``.

    Parameters
    ----------
    factory : callable
        ``factory()`` returns a fresh layer.
    x : ndarray
        A small valid input (a few hundred values keep it fast).
    reference : callable, optional
        ``reference(x, state, training)`` for :func:`check_forward`.
    modes : tuple of str
        ``"train"`` and/or ``"eval"``: the modes of the forward check.
    per_sample : bool
        Inference treats samples (axis 0) independently.
    bad_shapes : list of tuple, optional
        Input shapes the layer must reject (see :func:`check_bad_input`).
    gradient_modes : tuple of str, optional
        Modes of the gradient check (default ``modes``); leave out a mode
        whose backward is deliberately not the exact gradient there.
    tolerance : float, optional
        Of the forward check.
    """
    if reference is not None:
        check_forward(factory, x, reference, modes, tolerance)
    check_gradients(factory, x, modes if gradient_modes is None else gradient_modes)
    check_state_dict(factory, x)
    check_bad_input(factory, x, bad_shapes)
    check_train_eval(factory, x, per_sample)
