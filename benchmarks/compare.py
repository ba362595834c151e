"""Time normkit against the float64 NumPy reference and torch CPU.

Usage::

    python benchmarks/compare.py [--repeat N] [--json out.json] [--quick]
                                 [--torch-adapter | --adapter-only]
                                 [--layers] [--keep-memory]
                                 [--only VARIANT [VARIANT ...]]

Every variant's training forward and forward+backward is timed (median of
``--repeat`` runs or more after warm-up, interleaved so that each pass
follows each equally often) side by side in one process, next to
``x.copy()`` of the same array, the cheapest pass that allocates an output
of the input's size: each time is also reported as a multiple of it.
torch runs with numba's thread count; channels-last inputs are handed to
it as (N, C, H, W) tensors in ``torch.channels_last`` memory format over
the same data.  Nothing here asserts on a time.

``--torch-adapter`` adds a second table (the first is unchanged): for
:data:`ADAPTER_CASES`, torch's own module, the same layer from
``normkit.torch`` in eager mode and under ``torch.compile(fullgraph=True)``
(Inductor; compile time excluded, reported), and normkit on the NumPy
arrays, so the adapter's overhead is visible.

``--layers`` times :data:`LAYER_CASES` instead of the table's cells, in
the same columns: everyday layers smaller than the table's, where a
call's fixed cost (checks, plans, allocations, the kernels' launch) is a
large part of its time.

``--keep-memory`` has glibc keep the memory the process frees: by default
a pass whose outputs land on pages given back to the system pays a page
fault per page it writes, or does not, depending on what ran before it in
the process (``benchmarks/heap.py``).
"""

import argparse
import copy
import json
import sys
import time

import numpy as np

from normkit import _bench
from normkit._bench import ADAPTER_TIMED, Case

CHANNEL_VARIANTS = ("batch_norm", "instance_norm", "group_norm", "batch_renorm")

#: The configurations timed: float32 unless a dtype is given.
CASES = (
    [Case(v, (32, 64, 56, 56), 1) for v in CHANNEL_VARIANTS]
    + [Case(v, (32, 56, 56, 64), -1) for v in CHANNEL_VARIANTS]
    + [Case("layer_norm", (8192, 1024), -1),
       Case("batch_norm", (4096, 3, 64, 64), 1),
       # many channels over a few pixels: a ResNet's last stage
       Case("batch_norm", (32, 2048, 7, 7), 1)]
    + [Case(v, (2, 64, 56, 56), 1) for v in ("batch_norm", "group_norm")]
    + [Case(v, (2, 56, 56, 64), -1) for v in ("batch_norm", "group_norm")]
    + [Case("rms_norm", (8192, 1024), -1),
       Case("ghost_batch_norm", (32, 64, 56, 56), 1),
       Case("ghost_batch_norm", (32, 56, 56, 64), -1)]
    # wide rows, few long rows, a whole (C, H, W) sample
    + [Case("layer_norm", (2048, 4096), -1),
       Case("layer_norm", (2, 4194304), -1),
       Case("layer_norm", (32, 64, 56, 56), -1, normalized_ndim=3)]
    # half precision, read and written by the kernels themselves
    + [Case(v, shape, axis, dtype)
       for dtype in ("float16", "bfloat16")
       for v, shape, axis in (("batch_norm", (32, 64, 56, 56), 1),
                              ("group_norm", (32, 56, 56, 64), -1),
                              ("layer_norm", (8192, 1024), -1),
                              ("layer_norm", (2048, 4096), -1))]
)

#: The cells of ``--layers``: BatchNorm1d over features (an MLP's hidden
#: layers), LayerNorm over a transformer's tokens, GroupNorm over a
#: network's last, small feature maps.
LAYER_CASES = (
    [Case("batch_norm", shape, 1)
     for shape in ((64, 128), (256, 1024), (64, 4096), (256, 4096))]
    + [Case("layer_norm", shape, -1) for shape in ((64, 768), (512, 768))]
    + [Case("group_norm", (32, 256, 7, 7), 1)]
)

#: The cells of the ``--torch-adapter`` table.
ADAPTER_CASES = (
    [Case("batch_norm", (32, 64, 56, 56), 1),
     Case("batch_norm", (32, 56, 56, 64), -1),
     Case("group_norm", (32, 64, 56, 56), 1),
     Case("layer_norm", (8192, 1024), -1),
     Case("rms_norm", (8192, 1024), -1),
     Case("batch_norm", (2, 64, 56, 56), 1),
     Case("group_norm", (2, 64, 56, 56), 1),
     # torch's 16-bit training dtype on the CPU, read in place by the kernels
     Case("batch_norm", (32, 64, 56, 56), 1, "bfloat16"),
     Case("layer_norm", (8192, 1024), -1, "bfloat16")]
)


#: With ``--quick``, the reference is not timed when one run takes longer.
QUICK_REFERENCE_LIMIT_S = 0.5

#: Columns timed, in table order (torch's only where torch has the variant).
TIMED = ("copy", "fwd", "fwd+bwd", "ref fwd", "torch fwd", "torch fwd+bwd")


def measure(case, repeat, quick=False):
    """Median seconds of each of :data:`TIMED` for ``case``.

    Parameters
    ----------
    case : normkit._bench.Case
    repeat : int
        Timed runs per measurement.
    quick : bool
        Skip the reference when a single run of it exceeds
        :data:`QUICK_REFERENCE_LIMIT_S`.

    Returns
    -------
    dict
        Column name to seconds, or to None where not timed (torch lacks
        the variant or is not installed; ``quick`` skipped the reference).
    """
    timed = _bench.implementations(case, _bench.make_inputs(case))
    skipped = False
    if quick:
        start = time.perf_counter()
        timed["ref fwd"]()
        skipped = time.perf_counter() - start > QUICK_REFERENCE_LIMIT_S
    if skipped:
        del timed["ref fwd"]
    # The float64 reference is orders of magnitude slower and would evict
    # the caches between the other runs: it is timed on its own, 3 times.
    reference = {name: timed.pop(name) for name in ("ref fwd", "ref fwd+bwd")
                 if name in timed}
    medians = _bench.median_times({name: timed[name] for name in TIMED
                                   if name in timed}, repeat)
    if "ref fwd" in reference:
        medians.update(_bench.median_times({"ref fwd": reference["ref fwd"]}, 3,
                                           warmup=0))
    return {name: medians.get(name) for name in TIMED}


def _ms(seconds):
    return "-" if seconds is None else f"{1e3 * seconds:.2f}"


def _ratio(numerator, denominator):
    if numerator is None or denominator is None:
        return "-"
    return f"{numerator / denominator:.2f}x"


#: Bytes a pass must move at least, in units of the input's size: a copy
#: and a forward read x and write y (2); a forward and backward also read x
#: and dy and write dx (2 + 3 = 5).
MIN_TRAFFIC = {"copy": 2, "fwd": 2, "fwd+bwd": 5, "torch fwd": 2,
               "torch fwd+bwd": 5}


def _input_bytes(case):
    return int(np.prod(case.shape)) * _bench.numpy_dtype(case.dtype).itemsize


def bandwidths(case, t):
    """Effective bandwidth in GB/s of each pass in :data:`MIN_TRAFFIC`: the
    bytes it must move at least over its time (None where not timed)."""
    nbytes = _input_bytes(case)
    return {name: None if t[name] is None
            else MIN_TRAFFIC[name] * nbytes / t[name] / 1e9
            for name in MIN_TRAFFIC}


def json_record(case, t):
    """Every measured cell of one case, for ``--json``.

    Times in milliseconds (None where not timed) and, for each pass in
    :data:`MIN_TRAFFIC`, its effective bandwidth in GB/s
    (:func:`bandwidths`).  ``frac_copy`` is that bandwidth over the
    copy's, so 1.0 means "as fast as a copy moves its bytes".
    """
    ms = {name: None if t[name] is None else 1e3 * t[name] for name in TIMED}
    gbps = bandwidths(case, t)
    frac = {name: None if gbps[name] is None else gbps[name] / gbps["copy"]
            for name in MIN_TRAFFIC if name != "copy"}
    return {"variant": case.variant, "shape": list(case.shape),
            "layout": case.layout, "dtype": case.dtype,
            "bytes": _input_bytes(case),
            "ms": ms, "gbps": gbps, "frac_copy": frac,
            "seconds": t}


def table_row(case, t):
    """Formatted cells of one row of the markdown table."""
    gbps = {name: "-" if value is None else f"{value:.1f}"
            for name, value in bandwidths(case, t).items()}
    return [case.variant, str(case.shape), case.layout, case.dtype,
            _ms(t["copy"]), gbps["copy"],
            _ms(t["fwd"]), _ratio(t["fwd"], t["copy"]), gbps["fwd"],
            _ms(t["fwd+bwd"]), _ratio(t["fwd+bwd"], t["copy"]),
            gbps["fwd+bwd"],
            "skipped" if t["ref fwd"] is None else _ms(t["ref fwd"]),
            _ms(t["torch fwd"]), _ms(t["torch fwd+bwd"]),
            _ratio(t["torch fwd"], t["fwd"]),
            _ratio(t["torch fwd+bwd"], t["fwd+bwd"])]


HEADERS = ["variant", "shape", "layout", "dtype", "copy ms", "copy GB/s",
           "fwd ms", "fwd/copy", "fwd GB/s", "fwd+bwd ms", "fwd+bwd/copy",
           "fwd+bwd GB/s", "numpy-ref fwd ms", "torch fwd ms",
           "torch fwd+bwd ms", "fwd vs torch", "fwd+bwd vs torch"]


def _adapter_modules(case):
    """``(torch module, normkit.torch module)`` of ``case``, training mode."""
    import torch
    import normkit.torch as nkt
    if case.variant in ("layer_norm", "rms_norm"):
        cls = {"layer_norm": torch.nn.LayerNorm,
               "rms_norm": torch.nn.RMSNorm}[case.variant]
        theirs = cls(case.shape[-1])
    else:
        channels = case.shape[case.axis]
        theirs = {"batch_norm": lambda: torch.nn.BatchNorm2d(channels),
                  "group_norm": lambda: torch.nn.GroupNorm(case.groups,
                                                           channels)
                  }[case.variant]()
    theirs.to(getattr(torch, case.dtype))
    return theirs, nkt.convert(copy.deepcopy(theirs))


def measure_adapter(case, repeat):
    """Median seconds of the training forward and forward+backward of
    ``case`` for each of :data:`ADAPTER_TIMED`, and the compile time of
    the compiled module's first forward+backward."""
    import torch
    inputs = _bench.make_inputs(case)
    channels_last = case.layout == "last"
    x = _bench._torch_tensor(inputs.x, channels_last).requires_grad_()
    dy = _bench._torch_tensor(inputs.dy, channels_last)
    theirs, ours = _adapter_modules(case)
    # every cell compiles the same forward code: without a reset, Dynamo
    # stops at its recompile limit (8) and fullgraph=True makes that fatal
    torch.compiler.reset()
    compiled = torch.compile(copy.deepcopy(ours), fullgraph=True)
    start = time.perf_counter()
    compiled(x).backward(dy)
    compile_s = time.perf_counter() - start
    modules = {"torch": theirs, "normkit.torch": ours,
               "normkit.torch compiled": compiled}
    fns = {}
    for name, module in modules.items():
        # autograd.grad, not backward(): accumulating into .grad would add
        # a pass over dx that the NumPy column does not make
        leaves = [x] + list(module.parameters())
        fns[f"{name} fwd"] = lambda m=module: m(x)
        fns[f"{name} fwd+bwd"] = lambda m=module, leaves=leaves: \
            torch.autograd.grad(m(x), leaves, dy)
    v = case.variant
    fns["numpy fwd"] = lambda: _bench.normkit_forward(v, inputs)
    fns["numpy fwd+bwd"] = lambda: _bench.normkit_forward_backward(v, inputs)
    medians = _bench.median_times(fns, repeat)
    return medians, compile_s


ADAPTER_HEADERS = (["variant", "shape", "layout", "dtype", "pass"]
                   + [f"{name} ms" for name in ADAPTER_TIMED]
                   + ["eager/numpy", "compiled/numpy", "torch/eager",
                      "compile s"])


def adapter_rows(case, medians, compile_s):
    """Two rows (fwd, fwd+bwd) of the adapter table."""
    rows = []
    for step in ("fwd", "fwd+bwd"):
        t = _bench.adapter_times(medians, step)
        rows.append([case.variant, str(case.shape), case.layout, case.dtype,
                     step]
                    + [_ms(t[name]) for name in ADAPTER_TIMED]
                    + [_ratio(t["normkit.torch"], t["numpy"]),
                       _ratio(t["normkit.torch compiled"], t["numpy"]),
                       _ratio(t["torch"], t["normkit.torch"]),
                       f"{compile_s:.1f}"])
    return rows


def main(argv=None):
    """Run :data:`CASES`, print the markdown table, optionally save JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=_bench.positive_int, default=None,
                        help="timed runs per measurement, at least: "
                             "rounded up to whole cycles in which every "
                             "timed pass follows each equally often "
                             "(default 9, 3 with --quick)")
    parser.add_argument("--json", metavar="PATH",
                        help="also write every measured cell to PATH as "
                             "JSON (milliseconds, GB/s, fraction of the "
                             "copy's bandwidth; see json_record)")
    parser.add_argument("--torch-adapter", action="store_true",
                        help="also time normkit.torch (eager and compiled) "
                             "against torch's modules and normkit on NumPy")
    parser.add_argument("--adapter-only", action="store_true",
                        help="only the --torch-adapter table")
    parser.add_argument("--quick", action="store_true",
                        help="fewer runs; skip the reference where one run "
                             f"takes over {QUICK_REFERENCE_LIMIT_S} s")
    parser.add_argument("--layers", action="store_true",
                        help="time the everyday layers of LAYER_CASES "
                             "instead of the table's cells")
    parser.add_argument("--keep-memory", action="store_true",
                        help="have glibc keep the memory this process frees "
                             "(normkit._bench.keep_freed_memory), so that "
                             "no pass pays page faults for outputs it "
                             "allocates (see benchmarks/heap.py)")
    parser.add_argument("--only", nargs="+", metavar="VARIANT",
                        choices=sorted({case.variant
                                        for case in CASES + LAYER_CASES}),
                        help="time only these variants' cells (default: "
                             "every cell), e.g. to rerun them after a change")
    args = parser.parse_args(argv)
    kept = args.keep_memory and _bench.keep_freed_memory()
    if args.keep_memory and not kept:
        parser.error("--keep-memory: the C library is not glibc, or it "
                     "refused the setting")
    repeat = args.repeat or (3 if args.quick else 9)
    chosen = (lambda cases: cases if args.only is None
              else [case for case in cases if case.variant in args.only])

    machine = _bench.machine_info()
    print(f"{machine}\ntraining mode, median of {repeat} runs or more "
          f"after 2 warm-ups, interleaved (each pass following each "
          f"equally often); freed memory "
          f"{'kept' if kept else 'left to glibc'}; compiling kernels "
          f"(first run only)...\n",
          flush=True)
    results, rows = [], []
    cells = LAYER_CASES if args.layers else CASES
    for case in ([] if args.adapter_only else chosen(cells)):
        t = measure(case, repeat, args.quick)
        rows.append(table_row(case, t))
        results.append(json_record(case, t))
    if not args.adapter_only:
        print(_bench.format_table(HEADERS, rows, markdown=True))
        print("\nx/copy: time over x.copy() of the same array; vs torch: "
              "torch time over normkit time (above 1: normkit faster); "
              "-: not available.")
    adapter = []
    if args.torch_adapter or args.adapter_only:
        rows = []
        for case in chosen(ADAPTER_CASES):
            medians, compile_s = measure_adapter(case, repeat)
            rows += adapter_rows(case, medians, compile_s)
            adapter.append({"variant": case.variant, "shape": list(case.shape),
                            "layout": case.layout, "dtype": case.dtype,
                            "seconds": medians,
                            "compile_seconds": compile_s})
        print("\nnormkit.torch: torch's module, normkit.torch eager and "
              "compiled (Inductor, fullgraph), normkit on NumPy arrays\n")
        print(_bench.format_table(ADAPTER_HEADERS, rows, markdown=True))
        print("\neager/numpy, compiled/numpy: adapter overhead (1.00x: "
              "none); torch/eager: above 1, normkit.torch is faster; "
              "compile s: first compiled forward+backward.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "repeat": repeat,
                       "freed_memory_kept": kept,
                       "command": " ".join(["python", "benchmarks/compare.py"]
                                           + list(sys.argv[1:] if argv is None
                                                  else argv)),
                       "min_traffic": MIN_TRAFFIC, "results": results,
                       **({"torch_adapter": adapter} if adapter else {})},
                      f, indent=1)


if __name__ == "__main__":
    main()
