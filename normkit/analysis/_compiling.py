"""Say when Numba compiles, and only then (``normkit check`` and the study).

Numba fires its ``numba:compile`` event when a function is compiled, not
when its machine code is loaded from the on-disk cache, so a message tied
to that event appears on a cold cache and never on a warm one.
"""

import contextlib
import sys

from numba.core import event


class _FirstCompile(event.Listener):
    def __init__(self, message, stream):
        self.message = message
        self.stream = stream
        self.compiled = 0

    def on_start(self, ev):
        if self.compiled == 0 and self.message:
            stream = sys.stderr if self.stream is None else self.stream
            print(self.message, file=stream, flush=True)
        self.compiled += 1

    def on_end(self, ev):
        pass


@contextlib.contextmanager
def announce_compilation(message, stream=None):
    """Within the block, print ``message`` (to ``stream``, stderr by
    default) when Numba starts compiling a function for the first time.

    Yields an object whose ``compiled`` attribute counts the compilations
    (nested ones included) so far.
    """
    listener = _FirstCompile(message, stream)
    event.register("numba:compile", listener)
    try:
        yield listener
    finally:
        event.unregister("numba:compile", listener)
