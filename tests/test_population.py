"""Population re-estimation against a direct float64 computation."""

import numpy as np
import pytest

import normkit


def pooled(batches, axis=1, per_sample=False):
    """Pooled mean and unbiased within-batch variance per channel, plainly:
    ``sum x / sum m`` and ``sum (x - mu_B)^2 / sum (m_B - 1)``."""
    total = squares = values = dof = 0.0
    for x in batches:
        x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
        groups = (x.reshape(x.shape[0], -1, x.shape[-1]) if per_sample
                  else x.reshape(1, -1, x.shape[-1]))
        mu = groups.mean(axis=1, keepdims=True)
        total = total + groups.sum(axis=(0, 1))
        squares = squares + ((groups - mu) ** 2).sum(axis=(0, 1))
        values += groups.shape[0] * groups.shape[1]
        dof += groups.shape[0] * (groups.shape[1] - 1)
    return total / values, squares / dof


def channel_batches(rng, sizes, shape=(3, 4, 5), dtype=np.float32):
    scale = rng.uniform(0.5, 3.0, (shape[0], 1, 1))
    offset = rng.normal(0.0, 5.0, (shape[0], 1, 1))
    return [(offset + scale * rng.standard_normal((n,) + shape)).astype(dtype)
            for n in sizes]


def test_batch_norm_unequal_batches_match_pooled_float64(rng):
    batches = channel_batches(rng, (3, 7, 2, 5))
    layer = normkit.BatchNorm2d(3, momentum=0.3)
    layer.weight[...] = rng.uniform(0.5, 2.0, 3)
    weight, bias = layer.weight.copy(), layer.bias.copy()
    running_mean, running_var = layer.running_mean, layer.running_var
    layer.eval()
    [result] = normkit.reestimate_population_statistics([layer], batches)
    mean, var = pooled(batches)
    # float32 data: the engine accumulates in float32 within cache tiles
    np.testing.assert_allclose(layer.running_mean, mean, rtol=1e-6)
    np.testing.assert_allclose(layer.running_var, var, rtol=1e-6)
    assert layer.running_mean is running_mean and layer.running_var is running_var
    np.testing.assert_array_equal(layer.weight, weight)
    np.testing.assert_array_equal(layer.bias, bias)
    assert layer.num_batches_tracked == 0 and not layer.training
    assert result["batches"] == 4 and result["values"] == 17 * 20
    np.testing.assert_array_equal(result["running_var"], layer.running_var)


def test_equal_batches_give_the_papers_formula(rng):
    batches = channel_batches(rng, (4, 4, 4), shape=(2, 3, 3), dtype=np.float64)
    layer = normkit.BatchNorm(2)
    normkit.reestimate_population_statistics(layer, batches)
    m = 4 * 9
    mu = [b.mean(axis=(0, 2, 3)) for b in batches]
    sigma2 = [b.var(axis=(0, 2, 3)) for b in batches]
    np.testing.assert_allclose(layer.running_mean, np.mean(mu, axis=0), rtol=1e-12)
    np.testing.assert_allclose(layer.running_var,
                               m / (m - 1) * np.mean(sigma2, axis=0), rtol=1e-12)


def test_batch_renorm_running_std_channels_last(rng):
    batches = [np.moveaxis(b, 1, -1) for b in channel_batches(rng, (5, 3, 6))]
    layer = normkit.BatchRenorm(3, eps=1e-3, axis=-1).train()
    normkit.reestimate_population_statistics(layer, batches)
    mean, var = pooled(batches, axis=-1)
    np.testing.assert_allclose(layer.running_mean, mean, rtol=1e-6)
    np.testing.assert_allclose(layer.running_std, np.sqrt(var + 1e-3), rtol=1e-6)
    assert layer.training and layer.num_batches_tracked == 0


def test_instance_norm_pools_instances(rng):
    batches = channel_batches(rng, (2, 5), dtype=np.float64)
    layer = normkit.InstanceNorm(3, track_running_stats=True)
    normkit.reestimate_population_statistics(layer, batches)
    mean, var = pooled(batches, per_sample=True)
    np.testing.assert_allclose(layer.running_mean, mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.running_var, var, rtol=1e-12)


def two_layer_network(rng):
    """x -> BatchNorm -> (times 2, plus 1) -> BatchRenorm, on (N, 3)."""
    first = normkit.BatchNorm1d(3)
    first.weight[...] = [1.0, 2.0, 0.5]
    first.running_mean[...] = [9.0, -9.0, 0.0]   # stale on purpose
    second = normkit.BatchRenorm(3)
    second.running_mean[...] = [3.0, 3.0, 3.0]

    def forward(x):
        return second(2.0 * first(x) + 1.0)

    return first, second, forward


def test_joint_pass_sees_training_mode_inputs(rng):
    batches = [rng.normal(4.0, 3.0, (n, 3)) for n in (6, 9, 4)]
    first, second, forward = two_layer_network(rng)
    before = second.running_mean.copy(), second.running_std.copy()
    normkit.reestimate_population_statistics([first, second], batches, forward)
    # layer 1 in training mode normalizes each batch with its own statistics
    hidden = [2.0 * ((b - b.mean(0)) / np.sqrt(b.var(0) + 1e-5) * first.weight)
              + 1.0 for b in batches]
    mean, var = pooled(batches)
    np.testing.assert_allclose(first.running_mean, mean, rtol=1e-12)
    np.testing.assert_allclose(first.running_var, var, rtol=1e-12)
    mean, var = pooled(hidden)
    np.testing.assert_allclose(second.running_mean, mean, rtol=1e-10)
    np.testing.assert_allclose(second.running_std, np.sqrt(var + 1e-5), rtol=1e-10)
    assert not np.allclose(second.running_mean, before[0])


def test_sequential_pass_sees_inference_mode_inputs(rng):
    batches = [rng.normal(4.0, 3.0, (n, 3)) for n in (6, 9, 4)]
    first, second, forward = two_layer_network(rng)
    normkit.reestimate_population_statistics([first, second], batches, forward,
                                             sequential=True)
    mean, var = pooled(batches)
    np.testing.assert_allclose(first.running_mean, mean, rtol=1e-12)
    # layer 1 in inference mode with its new population statistics
    hidden = [2.0 * ((b - mean) / np.sqrt(var + 1e-5) * first.weight) + 1.0
              for b in batches]
    mean2, var2 = pooled(hidden)
    np.testing.assert_allclose(second.running_mean, mean2, rtol=1e-10)
    np.testing.assert_allclose(second.running_std, np.sqrt(var2 + 1e-5), rtol=1e-10)
    assert first.training and second.training


def test_bad_arguments_raise_and_leave_state_alone(rng):
    batches = channel_batches(rng, (3, 3))
    with pytest.raises(TypeError, match=r"layers\[0\] must be a layer with running"):
        normkit.reestimate_population_statistics(normkit.GroupNorm(1, 3), batches)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        normkit.reestimate_population_statistics(normkit.InstanceNorm(3), batches)
    with pytest.raises(TypeError, match="re-iterable"):
        normkit.reestimate_population_statistics(
            normkit.BatchNorm(3), iter(batches), sequential=True)
    unused, used = normkit.BatchNorm(3), normkit.BatchNorm(3)
    with pytest.raises(ValueError, match=r"layers\[1\] is listed twice"):
        normkit.reestimate_population_statistics([used, used], batches)
    with pytest.raises(ValueError, match="received no input"):
        normkit.reestimate_population_statistics([used, unused], batches, used)
    np.testing.assert_array_equal(used.running_mean, np.zeros(3))
    np.testing.assert_array_equal(used.running_var, np.ones(3))
    assert used.num_batches_tracked == 0 and "_forward" not in vars(used)
    layer = normkit.BatchNorm(3).eval()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        normkit.reestimate_population_statistics(
            layer, [np.ones((4, 3)), np.ones((1, 3))], sequential=True)
    np.testing.assert_array_equal(layer.running_var, np.ones(3))
    assert not layer.training


def test_ghost_batch_norm_pools_its_virtual_batches(rng):
    """Runs once Ghost BatchNorm (another branch) is part of normkit."""
    if not hasattr(normkit, "GhostBatchNorm"):
        pytest.skip("normkit.GhostBatchNorm is not available")
    batches = channel_batches(rng, (6, 4), dtype=np.float64)
    layer = normkit.GhostBatchNorm(3, virtual_batch_size=2)
    normkit.reestimate_population_statistics(layer, batches)
    ghosts = [b[i:i + 2] for b in batches for i in range(0, len(b), 2)]
    mean, var = pooled(ghosts)
    np.testing.assert_allclose(layer.running_mean, mean, rtol=1e-12)
    np.testing.assert_allclose(layer.running_var, var, rtol=1e-12)
