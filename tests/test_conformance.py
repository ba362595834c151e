"""Every built-in scheme runs the public conformance kit (normkit.testing),
and the kit itself catches the faults it is meant to catch."""

import functools

import numpy as np
import pytest

import normkit
from normkit import reference as ref
from normkit.testing import (check_bad_input, check_conformance, check_forward,
                             check_gradients, check_state_dict,
                             check_train_eval)

C = 4


def _input(shape, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return (1.5 + 2.0 * rng.standard_normal(shape)).astype(dtype)


def _affine(layer, seed=1):
    """Non-trivial weight and bias, so that their gradients are tested."""
    rng = np.random.default_rng(seed)
    for name in ("weight", "bias"):
        value = getattr(layer, name, None)
        if value is not None:
            value[...] = rng.uniform(0.5, 1.5, value.shape) * (1 if name == "weight" else 0.3)
    return layer


def _running(layer, seed=2):
    """Running statistics away from their initial values."""
    rng = np.random.default_rng(seed)
    layer.running_mean[...] = rng.uniform(-1, 1, layer.num_features)
    spread = getattr(layer, layer.spread_name)
    spread[...] = rng.uniform(0.5, 2.0, layer.num_features)
    return layer


def _with_running(ref_forward, spread="running_var"):
    """Adapt a running-statistics reference to ``(x, state, training)``."""
    def reference(x, state, training):
        y, mean, var = ref_forward(x, state["running_mean"], state[spread],
                                   state.get("weight"), state.get("bias"),
                                   training)
        return y, {"running_mean": mean, spread: var}
    return reference


def _bn_reference(axis):
    return _with_running(lambda x, m, v, w, b, t: ref.batch_norm(
        x, m, v, w, b, t, 0.1, 1e-5, axis))


def _ghost_reference(virtual_batch_size, axis):
    return _with_running(lambda x, m, v, w, b, t: ref.ghost_batch_norm(
        x, virtual_batch_size, m, v, w, b, t, 0.1, 1e-5, axis))


def _renorm_reference(x, state, training):
    y, mean, std = ref.batch_renorm(x, state["running_mean"], state["running_std"],
                                    state["weight"], state["bias"], training,
                                    0.1, 1e-5, 1.5, 0.5, 1)
    return y, {"running_mean": mean, "running_std": std}


def _instance_reference(x, state, training):
    return ref.instance_norm(x, None, None, state["weight"], state["bias"],
                             True, 0.1, 1e-5, 1)[0]


def _clipped_renorm():
    """Batch Renormalization whose r and d are clipped (constants, so finite
    differences see the same gradient as the paper's backward)."""
    layer = _affine(normkit.BatchRenorm(C, rmax=1.5, dmax=0.5))
    layer.running_mean[...] = 50.0
    layer.running_std[...] = 0.05
    return layer


@functools.cache
def _spectral_vectors(shape):
    layer = normkit.SpectralNorm(shape, n_power_iterations=200)
    layer(_input(shape, seed=5))
    return layer.u, layer.v


def _converged_spectral(shape):
    """Spectral norm whose u, v have converged on the test weight, so that
    the training-mode gradient (u, v constants) is the exact one."""
    def factory():
        layer = normkit.SpectralNorm(shape, n_power_iterations=1)
        layer.u, layer.v = (vector.copy() for vector in _spectral_vectors(shape))
        return layer
    return factory


def _spectral_reference(x, state, training):
    y, u, v = ref.spectral_norm(x, state["u"], state["v"], 1, 1e-12, training)
    return y, {"u": u, "v": v}


CASES = {
    "batch_norm_first": dict(
        factory=lambda: _running(_affine(normkit.BatchNorm(C))),
        x=_input((5, C, 3)), reference=_bn_reference(1)),
    "batch_norm_last": dict(
        factory=lambda: _running(_affine(normkit.BatchNorm(C, axis=-1))),
        x=_input((3, 2, 2, C)), reference=_bn_reference(-1)),
    "batch_norm_2d": dict(
        factory=lambda: _running(_affine(normkit.BatchNorm2d(C))),
        x=_input((3, C, 2, 3)), reference=_bn_reference(1),
        bad_shapes=[(3, C, 6)]),
    "instance_norm": dict(
        factory=lambda: _affine(normkit.InstanceNorm(C, affine=True)),
        x=_input((3, C, 5)), reference=_instance_reference),
    "instance_norm_tracked": dict(
        factory=lambda: _running(_affine(normkit.InstanceNorm(
            C, affine=True, track_running_stats=True))),
        x=_input((3, C, 5)),
        reference=_with_running(lambda x, m, v, w, b, t: ref.instance_norm(
            x, m, v, w, b, t, 0.1, 1e-5, 1))),
    "layer_norm": dict(
        factory=lambda: _affine(normkit.LayerNorm((C, 3))),
        x=_input((4, C, 3)),
        reference=lambda x, s, t: ref.layer_norm(x, (C, 3), s["weight"], s["bias"])),
    "group_norm": dict(
        factory=lambda: _affine(normkit.GroupNorm(2, C)),
        x=_input((3, C, 5)),
        reference=lambda x, s, t: ref.group_norm(x, 2, s["weight"], s["bias"])),
    "batch_renorm": dict(
        factory=_clipped_renorm, x=_input((6, C, 2)),
        reference=_renorm_reference),
    "rms_norm": dict(
        factory=lambda: _affine(normkit.RMSNorm((C, 3))),
        x=_input((4, C, 3)),
        reference=lambda x, s, t: ref.rms_norm(x, (C, 3), s["weight"])),
    "ghost_batch_norm_first": dict(
        factory=lambda: _running(_affine(normkit.GhostBatchNorm(C, 3))),
        x=_input((6, C, 2)), reference=_ghost_reference(3, 1),
        bad_shapes=[(4, C, 2)]),
    "ghost_batch_norm_last": dict(
        factory=lambda: _running(_affine(normkit.GhostBatchNorm(C, 2, axis=-1))),
        x=_input((4, 3, C)), reference=_ghost_reference(2, -1)),
    "weight_norm": dict(
        factory=lambda: normkit.WeightNorm(6).initialize(_input((6, 5), seed=9)),
        x=_input((6, 5)), per_sample=False,
        reference=lambda x, s, t: ref.weight_norm(x, s["g"])),
    "spectral_norm": dict(
        factory=_converged_spectral((6, 3, 2)), x=_input((6, 3, 2), seed=5),
        per_sample=False, reference=_spectral_reference),
}


@pytest.mark.parametrize("name", CASES)
def test_builtin_scheme_conforms(name):
    case = dict(CASES[name])
    check_conformance(case.pop("factory"), case.pop("x"), **case)


def test_float32_forward_parity_of_new_schemes():
    for name in ("rms_norm", "ghost_batch_norm_first", "weight_norm"):
        case = CASES[name]
        check_forward(case["factory"], case["x"].astype(np.float32),
                      case["reference"])


BUILTINS = ("batch_norm", "instance_norm", "layer_norm", "group_norm",
            "batch_renorm", "rms_norm", "ghost_batch_norm", "weight_norm",
            "spectral_norm")


def test_every_builtin_is_registered_and_has_a_conformance_case():
    suffixes = ("_first", "_last", "_2d", "_tracked")
    covered = {next((name.removesuffix(end) for end in suffixes if name.endswith(end)),
                    name) for name in CASES}
    assert covered == set(BUILTINS)
    assert set(BUILTINS) <= set(normkit.available())


# --------------------------------------------------------------------------
# the kit catches faults
# --------------------------------------------------------------------------

class _WrongGradient(normkit.LayerNorm):
    """LayerNorm whose backward forgets the mean term."""

    def _backward(self, dy, x, saved):
        dx, grads = super()._backward(dy, x, saved)
        return dx + 0.01 * dy, grads


class _LeakyEval(normkit.BatchNorm):
    """BatchNorm that updates its running mean in inference too."""

    def _forward(self, x):
        out = super()._forward(x)
        if not self.training:
            self.running_mean += 1.0
        return out


class _ChangesStateOnBadInput(normkit.BatchNorm):
    """Counts a batch before validating its input."""

    def _forward(self, x):
        self.num_batches_tracked += 1
        return super()._forward(x)


class _SharedState(normkit.LayerNorm):
    """state_dict returning views of the parameters, not copies."""

    def state_dict(self):
        return {"weight": self.weight, "bias": self.bias}


def test_kit_catches_a_wrong_gradient():
    with pytest.raises(AssertionError, match="gradient of 'x'"):
        check_gradients(lambda: _WrongGradient(3), _input((4, 3)), modes=("train",))


def test_kit_catches_a_wrong_forward():
    with pytest.raises(AssertionError, match="differs from the reference"):
        check_forward(lambda: normkit.LayerNorm(3), _input((4, 3)),
                      lambda x, s, t: ref.rms_norm(x, 3, s["weight"]))


def test_kit_catches_a_state_change_in_inference():
    with pytest.raises(AssertionError, match="inference forward"):
        check_train_eval(lambda: _LeakyEval(C), _input((3, C, 2)))


def test_kit_catches_a_state_change_on_bad_input():
    with pytest.raises(AssertionError, match="state 'num_batches_tracked' changed"):
        check_bad_input(lambda: _ChangesStateOnBadInput(C), _input((3, C, 2)))


def test_kit_catches_state_dict_views():
    with pytest.raises(AssertionError, match="copies"):
        check_state_dict(lambda: _SharedState(3), _input((4, 3)))
