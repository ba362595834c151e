"""The GPU benchmark suites import anywhere, skip without a usable device,
and run end to end on tiny shapes under the CUDA simulator."""

import os
import pathlib
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"

SKIPS = """
import gpu_suites as g
for suite in (g.Forward, g.ForwardBackward, g.Bandwidth, g.TorchRatio):
    try:
        suite().setup("batch_norm-first", "float32")
    except NotImplementedError:
        continue
    raise SystemExit(f"{suite.__name__} did not skip")
print("skipped")
"""

RUNS = """
import gpu_suites as g
case = ("group_norm-last", "float16")
for suite in (g.ForwardBackward, g.Bandwidth):
    s = suite()
    s.setup(*case)
    for name in dir(s):
        if name.startswith(("time_", "track_")):
            value = getattr(s, name)(*case)
            assert value is None or 0 < value, (name, value)
print("ran")
"""


def run(program, **env):
    done = subprocess.run([sys.executable, "-c", program], cwd=BENCHMARKS,
                          env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_gpu_suites_skip_on_the_simulator_with_full_shapes():
    pytest.importorskip("numba.cuda")
    assert run(SKIPS, NUMBA_ENABLE_CUDASIM="1", NORMKIT_GPU_BENCH_TINY="0") == "skipped"


def test_gpu_suites_run_end_to_end_on_tiny_shapes():
    pytest.importorskip("numba.cuda")
    assert run(RUNS, NUMBA_ENABLE_CUDASIM="1", NORMKIT_GPU_BENCH_TINY="1") == "ran"
