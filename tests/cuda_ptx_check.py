"""Compile every CUDA kernel launch of the test suite to PTX, without a GPU.

The CUDA tests run on Numba's simulator where there is no GPU, and the
simulator executes kernels as Python: it never types them, so a kernel
that the CUDA compiler would reject passes there.  This check closes that
gap.  It runs ``tests/test_cuda.py`` on the simulator, records the
argument types of every kernel launch, then compiles each recorded
``(kernel, signature)`` with the real numba-cuda compiler for a given
compute capability (default 9.0, H100), in a process without the simulator.
It needs NVVM, from the CUDA toolkit or ``pip install "numba-cuda[cu12]"``,
and no driver.  Usage::

    python tests/cuda_ptx_check.py [--cc 9.0]

It exits 1 if any kernel fails to compile (or none was recorded).
"""

import argparse
import fcntl
import importlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent

#: Kernels created per accumulator dtype by ``normkit.backend.cuda._kernels``.
CLOSURE_KERNELS = ("reduce", "apply", "pack", "forward_fused", "backward_fused")


def _argument_type(value):
    """A JSON description of one launch argument's Numba type."""
    import numpy as np
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
    if isinstance(value, FakeCUDAArray):
        array = value._ary
        layout = "C" if array.flags.c_contiguous else "A"
        return ["array", array.dtype.str, array.ndim, layout]
    if isinstance(value, (bool, np.bool_)):
        return ["bool"]
    if isinstance(value, (int, np.integer)):
        return ["int"]
    if isinstance(value, (float, np.floating)):
        return ["float"]
    raise TypeError(f"unexpected kernel argument {type(value).__name__}")


def install_recorder():
    """Record every kernel launch the simulator makes from now on; returns
    the set the launches go into (``(name, argument types)`` pairs)."""
    from numba.cuda.simulator import kernel as simulator_kernel

    launches = set()
    launch = simulator_kernel.FakeCUDAKernel.__call__

    def recording_launch(kernel, *args):
        if not kernel._device:  # device functions are typed with their kernel
            types = json.dumps([_argument_type(a) for a in args])
            key = getattr(kernel.fn, "__normkit_key__", None)
            if key is None:
                launches.add((kernel.fn.__name__, types))
            else:  # a channelwise function's generated kernel
                scalar = kernel.fn.__globals__["f"].fn
                launches.add((json.dumps([scalar.__module__, scalar.__qualname__,
                                          key]), types))
        return launch(kernel, *args)

    simulator_kernel.FakeCUDAKernel.__call__ = recording_launch
    return launches


def write_launches(launches, path):
    """Add recorded launches to those saved in ``path`` for
    :func:`compile_all`.  Other processes may add theirs at the same time
    (pytest-xdist's workers, test sessions in subprocesses): the file is
    read and rewritten under an exclusive lock."""
    with open(path, "a+") as file:
        fcntl.flock(file, fcntl.LOCK_EX)  # released when the file closes
        file.seek(0)
        saved = file.read()
        known = ({tuple(item) for item in json.loads(saved)} if saved.strip()
                 else set())
        file.seek(0)
        file.truncate()
        file.write(json.dumps(sorted(known | launches)))


def record(path):
    """Run the CUDA tests on the simulator; write the launches to ``path``."""
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    import pytest
    launches = install_recorder()
    status = pytest.main(["-q", "-p", "no:cacheprovider",
                          str(ROOT / "tests" / "test_cuda.py"),
                          str(ROOT / "tests" / "test_cuda_protocol.py"),
                          str(ROOT / "tests" / "test_examples.py")])
    write_launches(launches, path)
    return int(status)


def compile_all(path, cc):
    """Compile every launch in ``path`` to PTX for compute capability ``cc``."""
    import numpy as np
    from numba import cuda, types
    from numba.cuda import dispatcher
    from numba.np.numpy_support import from_dtype

    class TargetDevice:
        """Stands in for the current device when device functions are
        compiled for their caller: no driver is needed."""
        compute_capability = cc

    dispatcher.get_current_device = TargetDevice
    for folder in (ROOT / "examples").iterdir():  # the worked examples' modules
        sys.path.insert(0, str(folder))
    from normkit.backend import cuda as _cuda

    def numba_type(desc):
        if desc[0] == "array":
            return types.Array(from_dtype(np.dtype(desc[1])), desc[2], desc[3])
        return {"int": types.int64, "float": types.float64,
                "bool": types.boolean}[desc[0]]

    launches = json.loads(pathlib.Path(path).read_text())
    failures = skipped = 0
    for name, encoded in launches:
        descs = json.loads(encoded)
        if name.startswith("["):  # channelwise: rebuild from its function
            module, qualname, key = json.loads(name)
            if "<locals>" in qualname or module.split(".")[-1].startswith("test_"):
                # defined in a test module (needs the simulator to import)
                skipped += 1
                continue
            scope = importlib.import_module(module)
            function = getattr(scope, qualname)
            if not hasattr(function, "compiled"):  # wrapped under another name
                function = next(v for v in vars(scope).values()
                                if getattr(v, "function", None) is function)
            kernel = _cuda.kernel_for(function, (key[0], tuple(key[1])))
            name = f"{qualname}{tuple(key[1])}"
        elif name in CLOSURE_KERNELS:
            # pack's last argument holds the accumulator dtype; the others
            # accumulate float16/float32 storage in float32, float64 in float64
            dtype = np.dtype(descs[-1][1] if name == "pack" else descs[0][1])
            kernel = _cuda._kernels(np.float64 if dtype == np.float64
                                    else np.float32)[name]
        else:
            kernel = getattr(_cuda, name)
        signature = types.void(*map(numba_type, descs))
        try:
            cuda.compile_ptx(kernel.py_func, signature, cc=cc)
        except Exception as error:  # report every kernel, then fail
            failures += 1
            print(f"FAIL {name}{signature.args}\n{error}\n", file=sys.stderr)
    print(f"{len(launches) - failures - skipped} of {len(launches)} recorded "
          f"kernel launches compile to PTX for sm_{cc[0]}{cc[1]} ({skipped} "
          f"channelwise kernels defined in test modules not compiled)")
    return 1 if failures or not launches else 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cc", default="9.0",
                        help="compute capability, e.g. 8.0 or 9.0")
    parser.add_argument("--record", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--compile", metavar="PATH",
                        help="compile the launches recorded in PATH (by a test "
                             "run with NORMKIT_RECORD_LAUNCHES=PATH) instead of "
                             "running the CUDA tests again")
    args = parser.parse_args(argv)
    cc = tuple(int(part) for part in args.cc.split("."))
    if args.record:
        return record(args.record)
    if args.compile:
        return compile_all(args.compile, cc)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "launches.json")
        env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
        status = subprocess.call([sys.executable, __file__, "--record", path],
                                 env=env, cwd=ROOT)
        if status:
            return status
        return subprocess.call([sys.executable, __file__, "--compile", path,
                                "--cc", args.cc], env=env, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
