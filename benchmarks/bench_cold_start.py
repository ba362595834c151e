"""asv suite of the cold start: ``import normkit`` and the first call.

normkit's kernels are compiled by Numba on their first call and cached on
disk (``cache=True``), so a program pays the compilation once per machine
and afterwards only loads the cache.  Each measurement runs in a fresh
interpreter whose ``NUMBA_CACHE_DIR`` is a new, empty directory: the first
run compiles ("without cache"), a second run with the same directory loads
what the first stored ("with cache").  The interpreter times itself with
``time.perf_counter`` around the import and around the first call, so
interpreter start-up is not counted.
"""

import json
import os
import subprocess
import sys
import tempfile

#: Code run in the fresh interpreter; prints the two durations as JSON.
#: The first call is a float32 BatchNorm training forward and backward.
PROBE = """
import json, time
start = time.perf_counter()
import normkit
imported = time.perf_counter()
import numpy as np
x = np.random.default_rng(0).standard_normal((8, 16, 8, 8)).astype(np.float32)
y, saved = normkit.batch_norm(x, training=True, return_saved=True)
normkit.batch_norm_backward(np.ones_like(y), x, saved)
called = time.perf_counter()
print(json.dumps({"import": imported - start, "first_call": called - imported}))
"""

CACHE_STATES = ("without cache", "with cache")


def probe(cache_dir):
    """Run :data:`PROBE` in a new interpreter using ``cache_dir``.

    Returns
    -------
    dict
        ``{"import": seconds, "first_call": seconds}``.
    """
    env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


class ColdStart:
    """Import time and first-call time, with and without the disk cache."""

    params = [CACHE_STATES]
    param_names = ["cache"]
    unit = "seconds"
    timeout = 600

    def setup_cache(self):
        with tempfile.TemporaryDirectory(prefix="normkit-numba-") as cache_dir:
            without = probe(cache_dir)  # compiles, fills cache_dir
            return {"without cache": without, "with cache": probe(cache_dir)}

    def track_import(self, measured, cache):
        return measured[cache]["import"]

    def track_first_call(self, measured, cache):
        return measured[cache]["first_call"]
