"""The plug-in's own test: normkit's conformance kit on PositionNorm."""

import numpy as np

from normkit.testing import check_conformance

from normkit_position_norm import PositionNorm, reference


def test_position_norm_conforms():
    x = np.random.default_rng(0).standard_normal((3, 5, 2, 3))
    check_conformance(PositionNorm, x, lambda x, state, training: reference(x))
