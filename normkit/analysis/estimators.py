"""How good are batch statistics as estimates?  Empirical against theory.

For a batch of ``m`` values with mean ``mu`` and variance ``sigma^2`` the
normalizers use the batch mean ``mu_B`` and the biased variance
``sigma_B^2 = 1/m sum (x - mu_B)^2``; running statistics receive the
unbiased ``s^2 = m / (m - 1) sigma_B^2``.  For i.i.d. values

.. math::

    E\\mu_B = \\mu, \\quad \\operatorname{Var}\\mu_B = \\sigma^2 / m, \\quad
    E\\sigma_B^2 = \\tfrac{m-1}{m}\\sigma^2, \\quad E s^2 = \\sigma^2, \\quad
    \\operatorname{Var} s^2 = \\frac{1}{m}\\left(\\mu_4 -
        \\tfrac{m-3}{m-1}\\sigma^4\\right)

(``mu_4`` the fourth central moment; ``Var sigma_B^2 = ((m-1)/m)^2 Var s^2``),
and for Gaussian values ``m sigma_B^2 / sigma^2`` is chi-square with
``m - 1`` degrees of freedom.  For Gaussian values with covariance
``Sigma`` (the correlated case, a stationary AR(1) sequence within each
batch) the exact values follow from quadratic forms: with
``Q = (I - 11^T / m) / m``, ``E sigma_B^2 = tr(Q Sigma)`` and
``Var sigma_B^2 = 2 tr(Q Sigma Q Sigma)``, and
``Var mu_B = 1^T Sigma 1 / m^2``.

Batch statistics come from :func:`normkit.engine.moments` over a view with
one statistics group per simulated batch.
"""

import numpy as np
from scipy import stats

from normkit import engine

from ._threads import single_threaded

#: Degrees of freedom of the heavy-tailed Student t (finite 8th moment, so
#: the spread of the variance estimates is itself well estimated).
T_DOF = 10

#: Correlation of neighbouring values in the AR(1) batches.
AR_RHO = 0.5

#: Name -> (short description, population variance, fourth central moment
#: or None for the Gaussian-covariance formulas).
DISTRIBUTIONS = {
    "gaussian": ("i.i.d. N(0, 1)", 1.0, 3.0),
    "student_t": (f"i.i.d. Student t, {T_DOF} dof (heavy tails)",
                  T_DOF / (T_DOF - 2),
                  3.0 * T_DOF ** 2 / ((T_DOF - 2) * (T_DOF - 4))),
    "exponential": ("i.i.d. Exponential(1) (skewed)", 1.0, 9.0),
    "ar1": (f"Gaussian AR(1), rho={AR_RHO}, within each batch (correlated)",
            1.0, None),
}


def draw(distribution, draws, m, rng):
    """``(draws, m)`` float64 values, one simulated batch per row."""
    if distribution == "gaussian":
        return rng.standard_normal((draws, m))
    if distribution == "student_t":
        return rng.standard_t(T_DOF, (draws, m))
    if distribution == "exponential":
        return rng.exponential(1.0, (draws, m))
    if distribution == "ar1":
        noise = rng.standard_normal((draws, m))
        x = np.empty((draws, m))
        x[:, 0] = noise[:, 0]
        scale = np.sqrt(1.0 - AR_RHO ** 2)
        for t in range(1, m):
            x[:, t] = AR_RHO * x[:, t - 1] + scale * noise[:, t]
        return x
    raise ValueError(f"draw: unknown distribution {distribution!r}; choose "
                     f"from {', '.join(DISTRIBUTIONS)}")


def batch_statistics(x):
    """Batch mean and biased variance of each row of ``x`` via the engine."""
    mean, var = engine.moments(x, engine.trailing_view(x.shape, 1))
    return mean[:, 0], var[:, 0]


def theory(distribution, m):
    """Theoretical bias and variance of ``mu_B``, ``sigma_B^2`` and ``s^2``
    (keys ``<estimator>_bias`` / ``<estimator>_var`` with estimators
    ``mean``, ``var_biased``, ``var_unbiased``)."""
    _, sigma2, mu4 = DISTRIBUTIONS[distribution]
    if mu4 is None:
        lags = np.abs(np.subtract.outer(np.arange(m), np.arange(m)))
        cov = sigma2 * AR_RHO ** lags
        q = (np.eye(m) - 1.0 / m) / m
        qc = q @ cov
        mean_var = cov.sum() / m ** 2
        biased_mean = np.trace(qc)
        biased_var = 2.0 * np.sum(qc * qc.T)
    else:
        mean_var = sigma2 / m
        biased_mean = (m - 1) / m * sigma2
        unbiased_var = (mu4 - (m - 3) / (m - 1) * sigma2 ** 2) / m
        biased_var = ((m - 1) / m) ** 2 * unbiased_var
    factor = m / (m - 1)
    return {"mean_bias": 0.0, "mean_var": mean_var,
            "var_biased_bias": biased_mean - sigma2, "var_biased_var": biased_var,
            "var_unbiased_bias": factor * biased_mean - sigma2,
            "var_unbiased_var": factor ** 2 * biased_var}


def _population_mean(distribution):
    return 1.0 if distribution == "exponential" else 0.0


@single_threaded
def estimator_study(batch_sizes=(2, 4, 8, 16, 32, 64),
                    distributions=tuple(DISTRIBUTIONS), draws=20000, seed=0):
    """Empirical against theoretical bias and variance of batch statistics.

    For every distribution and batch size ``m``, ``draws`` simulated
    batches; each estimator's empirical bias and variance come with their
    standard errors (``*_se``), next to the theoretical value
    (``*_theory``).  For Gaussian data, ``chi2_ks_pvalue`` is the
    Kolmogorov-Smirnov p-value of ``m sigma_B^2 / sigma^2`` against
    chi-square with ``m - 1`` degrees of freedom (None otherwise).

    Returns
    -------
    list of dict
        One row per (distribution, m).
    """
    unknown = [d for d in distributions if d not in DISTRIBUTIONS]
    if unknown:
        raise ValueError(f"estimator_study: unknown distribution(s) {unknown}; "
                         f"choose from {', '.join(DISTRIBUTIONS)}")
    if min(batch_sizes) < 2:
        raise ValueError(f"estimator_study: batch sizes must be >= 2, got "
                         f"{list(batch_sizes)}")
    rows = []
    for d_index, distribution in enumerate(distributions):
        sigma2 = DISTRIBUTIONS[distribution][1]
        for m in batch_sizes:
            rng = np.random.default_rng([seed, d_index, m])
            mean, biased = batch_statistics(draw(distribution, draws, m, rng))
            estimates = {"mean": mean - _population_mean(distribution),
                         "var_biased": biased - sigma2,
                         "var_unbiased": biased * m / (m - 1) - sigma2}
            row = {"distribution": distribution, "m": m, "draws": draws}
            expected = theory(distribution, m)
            for name, error in estimates.items():
                row.update(_empirical(name, error))
                row[f"{name}_bias_theory"] = expected[f"{name}_bias"]
                row[f"{name}_var_theory"] = expected[f"{name}_var"]
            row["chi2_ks_pvalue"] = (
                float(stats.kstest(m * biased / sigma2, "chi2", args=(m - 1,)).pvalue)
                if distribution == "gaussian" else None)
            rows.append(row)
    return rows


def _empirical(name, error):
    """Bias and variance of an estimator from its errors, with standard
    errors (the variance's from the spread of the squared deviations)."""
    n = error.size
    deviation2 = (error - error.mean()) ** 2
    return {f"{name}_bias": float(error.mean()),
            f"{name}_bias_se": float(error.std(ddof=1) / np.sqrt(n)),
            f"{name}_var": float(error.var(ddof=1)),
            f"{name}_var_se": float(deviation2.std(ddof=1) / np.sqrt(n))}
