"""normkit needs neither numba-cuda nor a GPU unless device arrays are used."""

import subprocess
import sys

PROGRAM = """
import sys
sys.modules["numba.cuda"] = None          # as if numba-cuda were absent
import numpy as np
import normkit
x = np.random.default_rng(0).standard_normal((4, 3, 5))
y, saved = normkit.batch_norm(x, training=True, return_saved=True)
dx, _, _ = normkit.batch_norm_backward(np.ones_like(y), x, saved)
layer = normkit.BatchNorm(3)
layer(x)
assert isinstance(layer.state_dict()["running_mean"], np.ndarray)
assert "normkit.backend.cuda" not in sys.modules
print("ok")
"""


def test_cpu_path_without_numba_cuda():
    done = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
