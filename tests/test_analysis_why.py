"""The studies of why normalization helps: each measurement against an
independent computation on a tiny network (finite differences, a direct
recomputation), and the four studies run end to end, resumable, with a
plug-in scheme defined here."""

import copy
import json

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("mlxtend")

import normkit  # noqa: E402
from normkit import registry  # noqa: E402
from normkit.analysis import STUDIES, run_study, why  # noqa: E402
from normkit.analysis import landscape, mlp, trainer, variants  # noqa: E402

from conftest import numerical_grad  # noqa: E402


class RowScale(normkit.Normalizer):
    """The plug-in of these tests: each sample's features divided by their
    root mean square (centered=False), one gain per feature."""

    centered = False

    def __init__(self, num_features):
        super().__init__((num_features,), bias=False)

    def view(self, shape):
        return normkit.View(P=shape[0], A=1, K=1, J=shape[1], B=1)


@pytest.fixture
def plugin(monkeypatch):
    monkeypatch.setitem(registry._REGISTERED, "row_scale", RowScale)
    return "row_scale"


def _tiny(variant, rng, activation="sigmoid", placement="before", noise=0.0):
    """A 4 -> 3 -> 3 -> 3 network in float64, parameters moved off their
    initial values (a gain of exactly 1 and a bias of 0 are special)."""
    network, norms, noises = trainer.build_mlp(
        variant, rng, 6, 4, width=3, depth=2, classes=3,
        activation=activation, placement=placement, noise=noise, seed=3)
    for layer, name in network.parameters():
        value = np.asarray(getattr(layer, name), np.float64)
        setattr(layer, name, value + rng.normal(0, 0.3, value.shape))
    x = rng.normal(size=(6, 4))
    y = np.array([0, 1, 2, 0, 1, 2])
    return network, norms, noises, x, y


def _loss_at(network, x, y):
    """Loss of a copy of ``network`` (training mode) as a function of the
    flat parameter vector: the independent side of the checks."""
    def loss(vector):
        moved = copy.deepcopy(network)
        landscape.set_parameters(moved, vector)
        moved.train()
        return trainer.softmax_cross_entropy(moved(x), y)[0]
    return loss


@pytest.mark.parametrize("variant", ["none", "batch_norm", "layer_norm",
                                     "row_scale"])
def test_gradient_direction_matches_finite_differences(variant, plugin, rng):
    network, _, _, x, y = _tiny(variant, rng)
    loss = _loss_at(network, x, y)
    w = landscape.parameters(network)
    sizes = [0.05, 0.2, 0.8]
    found = landscape.gradient_direction(network, x, y, sizes)
    g = numerical_grad(loss, w)
    assert found["loss"] == pytest.approx(loss(w), rel=1e-12)
    assert found["gradient_norm"] == pytest.approx(np.linalg.norm(g), rel=1e-6)
    ratios = []
    for eta, moved_loss, change in zip(sizes, found["losses"],
                                       found["gradient_changes"]):
        assert moved_loss == pytest.approx(loss(w - eta * g), rel=1e-7)
        expected = np.linalg.norm(numerical_grad(loss, w - eta * g) - g)
        assert change == pytest.approx(expected, rel=1e-5)
        ratios.append(expected / (eta * np.linalg.norm(g)))
    assert found["beta"] == pytest.approx(max(ratios), rel=1e-5)
    # the network measured is untouched
    np.testing.assert_array_equal(landscape.parameters(network), w)


def test_gradient_change_has_the_closed_form_of_a_quadratic():
    """For a loss ``L(w) = 0.5 w'Hw`` the gradient change along the
    gradient is ``eta ||H g||`` and beta is ``||H g|| / ||g||``: a
    one-layer linear network with a squared error is such a loss; checked
    through the same functions by substituting it for the cross-entropy."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 3))
    target = rng.normal(size=(5, 2))
    network = trainer.Sequential([trainer.Dense(3, 2, rng)])
    network.layers[0].weight = network.layers[0].weight.astype(np.float64)
    network.layers[0].bias = network.layers[0].bias.astype(np.float64)

    def squared(z, labels):
        return 0.5 * float(((z - target) ** 2).sum()), z - target

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "softmax_cross_entropy", squared)
        found = landscape.gradient_direction(network, x, None, [0.1, 0.3])
    # parameters (W row-major, then b); moving them by -eta g moves the
    # residual by -eta (x g_W' + g_b), so the gradient by -eta H g with
    # H g = [d' x, sum_n d] for that residual change d
    w = network.layers[0].weight
    b = network.layers[0].bias
    residual = x @ w.T + b - target
    g_w, g_b = residual.T @ x, residual.sum(axis=0)
    # H g through the design: the change of the residual along -g
    d_residual = x @ g_w.T + g_b
    h_g = np.concatenate([(d_residual.T @ x).ravel(), d_residual.sum(axis=0)])
    g = np.concatenate([g_w.ravel(), g_b])
    assert found["gradient_changes"] == pytest.approx(
        [0.1 * np.linalg.norm(h_g), 0.3 * np.linalg.norm(h_g)], rel=1e-10)
    assert found["beta"] == pytest.approx(np.linalg.norm(h_g) / np.linalg.norm(g),
                                          rel=1e-10)


@pytest.mark.parametrize("variant", ["none", "batch_norm", "row_scale"])
def test_internal_covariate_shift_matches_a_direct_recomputation(variant, plugin,
                                                                 rng):
    """G'_i by finite differences of the loss in layer i's weight, with the
    layers below i moved by hand by SGD's first step, w - lr * g."""
    network, _, _, x, y = _tiny(variant, rng)
    lr = 0.3
    optimizer = trainer.SGD(network.parameters(), lr, momentum=0.9,
                            weight_decay=0.0)
    rows = landscape.internal_covariate_shift(network, optimizer, x, y)
    w = landscape.parameters(network)
    loss = _loss_at(network, x, y)
    g = numerical_grad(loss, w)
    sizes = [np.size(getattr(layer, name)) for layer, name in network.parameters()]
    starts = np.cumsum([0] + sizes)
    owners = [network.layers.index(layer) for layer, _ in network.parameters()]
    dense = [i for i, layer in enumerate(network.layers)
             if isinstance(layer, trainer.Dense)]
    assert [r["layer"] for r in rows] == list(range(len(dense)))
    for row, index in zip(rows, dense):
        weight = next(k for k, (layer, name) in enumerate(network.parameters())
                      if owners[k] == index and name == "weight")
        block = slice(starts[weight], starts[weight + 1])
        mixed = w.copy()
        for k, owner in enumerate(owners):
            if owner < index:
                part = slice(starts[k], starts[k + 1])
                mixed[part] = w[part] - lr * g[part]
        before, after = g[block], numerical_grad(loss, mixed)[block]
        assert row["l2"] == pytest.approx(np.linalg.norm(before - after),
                                          rel=1e-5, abs=1e-9)
        assert row["cosine"] == pytest.approx(
            before @ after / np.linalg.norm(before) / np.linalg.norm(after),
            rel=1e-6)
        assert row["gradient_norm"] == pytest.approx(np.linalg.norm(before),
                                                     rel=1e-6)
    assert rows[0]["l2"] == 0.0 and rows[0]["cosine"] == pytest.approx(1.0)
    assert rows[1]["l2"] > 0


def test_step_noise_is_fixed_within_a_step_and_moves_between_steps(rng):
    layer = trainer.StepNoise(5, 1.0, (0, 1))
    x = rng.normal(size=(4, 5))
    first = layer(x)
    np.testing.assert_array_equal(layer(x), first)
    a, b = layer.coefficients()
    assert np.all((a >= 1) & (a <= 2)) and np.all(np.abs(b) <= 1)
    np.testing.assert_allclose(first, x * a + b, rtol=1e-15)
    dy = rng.normal(size=x.shape)
    np.testing.assert_allclose(
        layer.backward(dy),
        numerical_grad(lambda v: float((layer(v) * dy).sum()), x), rtol=1e-7)
    layer.step = 1
    assert not np.allclose(layer(x), first)
    layer.eval()
    np.testing.assert_allclose(layer(x), 1.5 * x, rtol=1e-15)


def test_sigmoid_layer(rng):
    layer = trainer.Sigmoid()
    x = np.array([[-800.0, -3.0, 0.0, 2.0, 800.0]])
    from scipy.special import expit
    with np.errstate(over="raise"):
        np.testing.assert_allclose(layer(x), expit(x), rtol=1e-12, atol=1e-300)
    x = rng.normal(size=(3, 4))
    dy = rng.normal(size=x.shape)
    layer(x)
    np.testing.assert_allclose(
        layer.backward(dy),
        numerical_grad(lambda v: float((layer(v) * dy).sum()), x), rtol=1e-7)


@pytest.mark.parametrize("placement", ["before", "after"])
def test_placement_orders_the_layers(placement, rng):
    network, norms, noises = trainer.build_mlp(
        "batch_norm", rng, 8, 4, width=3, depth=2, placement=placement,
        noise=0.5)
    kinds = [type(layer).__name__ for layer in network.layers]
    block = (["BatchNorm", "StepNoise", "Sigmoid"] if placement == "before"
             else ["Sigmoid", "BatchNorm", "StepNoise"])
    assert kinds == ["Dense", *block, "Dense", *block, "Dense"]
    assert len(norms) == 2 and len(noises) == 2


def test_checkpoint_percentiles_are_those_of_the_last_sigmoid_input(rng):
    network, _, _, x, y = _tiny("batch_norm", rng)
    network.train()
    network(x)                           # running statistics move off 0/1
    found = mlp.checkpoint(network, x, y, unit=2)
    assert network.layers[1].training       # back in training mode
    network.eval()
    h = x
    for layer in network.layers[:network.layers.index(
            [layer for layer in network.layers
             if isinstance(layer, trainer.Sigmoid)][-1])]:
        h = layer(h)
    assert found["percentiles"] == pytest.approx(
        np.percentile(h[:, 2], mlp.PERCENTILES).tolist(), rel=1e-12)
    assert found["accuracy"] == np.mean(network(x).argmax(axis=1) == y)


def test_registered_schemes_are_variants(plugin, monkeypatch):
    layer = variants.row(plugin).dense((7,), 4)
    assert isinstance(layer, RowScale) and layer.weight.shape == (7,)
    assert variants.row("group_norm") is variants.VARIANTS["group_norm"]
    assert variants.check_variants([plugin]) == (plugin,)
    with pytest.raises(ValueError, match="variant 'weight_norm'.*num_units"):
        variants.check_variants(["weight_norm"])
    with pytest.raises(ValueError, match="unknown variant\\(s\\) 'nope'"):
        variants.check_variants(["nope"])
    assert "row_scale" in variants._choices()
    assert "weight_norm" not in variants._choices()


def test_settings_name_the_bad_field():
    for field, value in (("activation", "tanh"), ("placement", "middle"),
                         ("steps", 0), ("lr", 0.0), ("unit", 100),
                         ("dataset", "cifar")):
        with pytest.raises(ValueError, match=f"^{field} "):
            mlp.MLPSettings(**{field: value})


def test_run_study_rejects_bad_arguments():
    with pytest.raises(ValueError, match="^name: unknown study 'nope'"):
        run_study("nope", out=None)
    with pytest.raises(ValueError, match="^seeds:"):
        run_study("placement", out=None, seeds=[0, 0])
    with pytest.raises(ValueError, match="^batch_sizes:"):
        run_study("placement", out=None, batch_sizes=[1])
    with pytest.raises(ValueError, match="^steps:"):
        run_study("placement", out=None, steps=0)


TINY = dict(seeds=[0, 1], steps=6, plots=False, progress=False, warm=False)


@pytest.fixture(scope="module")
def null():
    with open("/dev/null", "w") as stream:
        yield stream


@pytest.mark.parametrize("name", list(STUDIES))
def test_every_study_runs_a_plugin_and_resumes(name, plugin, tmp_path,
                                               monkeypatch, null):
    """Each study with the plug-in and no normalization: summaries agree
    with the cells they come from, the cells are deterministic, and a
    second run in the same folder recomputes nothing."""
    chosen = [plugin, "none"]
    if name == "landscape":
        chosen.append("batch_norm")      # brings the noisy control
    results = run_study(name, tmp_path, chosen, stream=null, **TINY)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(results["summary"]))
    cells = [c for one in results["sweeps"] for c in one["cells"]]
    assert {c["variant"] for c in cells} == set(chosen)
    assert all(c["steps"] == 6 for c in cells)

    one = cells[0]
    again = mlp.train_mlp_cell(one["variant"], one["batch_size"], one["seed"],
                               mlp.MLPSettings(**one["settings"]))
    assert again == one

    _check_summary(name, results)

    calls = []
    real = mlp.train_mlp_cell
    monkeypatch.setattr(mlp, "train_mlp_cell",
                        lambda *args: calls.append(args) or real(*args))
    resumed = run_study(name, tmp_path, chosen, stream=null, **TINY)
    assert calls == [] and resumed["sweeps"] == results["sweeps"]


def _check_summary(name, results):
    sweeps = results["sweeps"]
    if name == "mnist-sigmoid":
        for row in results["summary"]:
            cells = [c for c in sweeps[0]["cells"] if c["variant"] == row["variant"]]
            assert row["accuracy_mean"] == pytest.approx(
                np.mean([c["test_accuracy"] for c in cells]))
            drift = [np.ptp([p["percentiles"][2] for p in c["curve"][1:]])
                     for c in cells]
            assert row["p85_drift_mean"] == pytest.approx(np.mean(drift))
            assert row["p85_drift_std"] == pytest.approx(np.std(drift, ddof=1))
            assert [p["step"] for p in cells[0]["curve"]] == list(range(0, 7))
    elif name == "landscape":
        labels = [row["variant"] for row in results["summary"]]
        assert "batch_norm + noise" in labels
        noisy = [c for c in sweeps[1]["cells"]]
        assert all(c["settings"]["noise"] == why.NOISE_LEVEL for c in noisy)
        row = results["summary"][0]
        cells = [c for c in sweeps[0]["cells"] if c["variant"] == row["variant"]]
        per_cell = [np.mean([p["beta"] for p in c["probes"] if p["step"] > 0])
                    for c in cells]
        assert row["beta_mean"] == pytest.approx(np.mean(per_cell))
        first = [next(p["gradient_changes"] for p in c["probes"] if p["step"] > 0)
                 for c in cells]
        assert row["gradient_change_first_mean"] == pytest.approx(
            np.mean([max(changes) for changes in first]))
        per_cell = [np.mean([next(r["cosine"] for r in p["ics"] if r["layer"] == 2)
                             for p in c["probes"] if p["step"] > 0])
                    for c in cells]
        assert row["ics2_cosine_mean"] == pytest.approx(np.mean(per_cell))
    else:
        labels = {one["label"] for one in sweeps}
        assert len(labels) == (6 if name == "learning-rate" else 2)
        for row in results["summary"]:
            [one] = [s for s in sweeps if s["label"] == row["sweep"]]
            cells = [c for c in one["cells"] if c["variant"] == row["variant"]
                     and c["batch_size"] == row["batch_size"]]
            assert row["accuracy_mean"] == pytest.approx(
                np.mean([c["test_accuracy"] for c in cells]))
        if name == "learning-rate":
            lrs = sorted({s["settings"]["lr"] for s in sweeps})
            assert lrs == pytest.approx([why.BASE_LR * m for m in why.LR_MULTIPLES])


def test_a_learning_rate_far_too_large_diverges(null):
    results = run_study("learning-rate", None, ["none"], seeds=[0], steps=40,
                        plots=False, progress=False, warm=False, stream=null)
    relu30 = next(r for r in results["summary"] if r["sweep"] == "relu, lr 30x")
    assert relu30["diverged"] == 1
    [cell] = [c for s in results["sweeps"] if s["label"] == "relu, lr 30x"
              for c in s["cells"]]
    assert cell["diverged"] and cell["train_loss"] is None and cell["steps"] < 40


def test_figures(tmp_path, null):
    pytest.importorskip("matplotlib")
    for name in STUDIES:
        results = run_study(name, tmp_path / name, ["none", "batch_norm"],
                            seeds=[0], steps=4, progress=False, warm=False,
                            stream=null)
        pngs = sorted(p.name for p in (tmp_path / name).glob("*.png"))
        assert pngs == {"mnist-sigmoid": ["accuracy.png", "percentiles.png"],
                        "learning-rate": ["learning_rate.png"],
                        "landscape": ["ics.png", "landscape.png"],
                        "placement": ["placement.png"]}[name]
        assert results["study"] == name


@pytest.mark.parametrize("argv,named", [
    (["study", "nope"], "argument NAME: invalid choice: 'nope'"),
    (["study", "landscape", "--steps", "0"], "argument --steps"),
    (["study", "landscape", "--variants", "nope"], "argument --variants"),
    (["study", "placement", "--variants", "weight_norm"], "argument --variants"),
    (["study", "placement", "--batch-sizes", "1"], "argument --batch-sizes"),
    (["study", "placement", "--seeds", "0,0"], "argument --seeds"),
    (["study", "placement", "--jobs", "0"], "argument --jobs")])
def test_study_command_names_the_bad_option(argv, named, capsys):
    from normkit import cli
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert named in capsys.readouterr().err.splitlines()[-1]


def test_study_command_runs_and_resumes(tmp_path, capsys):
    from normkit import cli
    argv = ["study", "placement", "--variants", "batch_norm", "--seeds", "0",
            "--batch-sizes", "8", "--steps", "3", "--jobs", "1",
            "--no-plots", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    [before, after] = results["summary"]
    assert (before["sweep"], after["sweep"]) == ("before the activation",
                                                  "after the activation")
    for row in (before, after):
        line = next(line.split() for line in out.splitlines()
                    if line.split()[:2] == ["batch_norm", row["placement"]])
        assert line[2:] == [f"{100 * row['accuracy_mean']:.1f}", "±", "0.0"]
    assert len(list((tmp_path / "cells").iterdir())) == 2
    assert cli.main(argv) == 0
    assert json.loads((tmp_path / "results.json").read_text())["sweeps"] == \
        results["sweeps"]
