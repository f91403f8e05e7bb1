"""Progress bars wherever a person waits: tqdm on stderr, one bar per phase.

`steps_callback` turns `Decoder.decode`'s `progress=` argument (True, False, None for
"when the call will take long", or a callable(step, steps)) into the callable the
sampler reports to; `busy` shows a phase without steps (building random weights,
reading a checkpoint, a VAE encode) with its elapsed time ticking, so no phase looks
hung.
"""
from __future__ import annotations

import sys
import threading
from contextlib import contextmanager

TICK_S = 1.0     # how often a bar without updates redraws its elapsed time


def bar(total=None, desc: str = "", unit: str = "it", disable: bool = False, leave: bool = False, **kwargs):
    """A tqdm bar on stderr that redraws at every update (steps are few and some are fast)."""
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr, leave=leave,
                dynamic_ncols=True, mininterval=0, miniters=1, **kwargs)


@contextmanager
def ticking(pbar, every: float = TICK_S):
    """Redraw `pbar` every `every` seconds until the block ends: its elapsed time moves
    while a long step runs."""
    if getattr(pbar, "disable", True):
        yield pbar
        return
    stop = threading.Event()

    def run():
        while not stop.wait(every):
            try:
                pbar.refresh()
            except Exception:   # a bar closed under us: nothing left to draw
                return
    t = threading.Thread(target=run, daemon=True, name="pidkern-progress")
    t.start()
    try:
        yield pbar
    finally:
        stop.set()
        t.join()


@contextmanager
def busy(desc: str, enabled: bool = True):
    """A bar without a total for a phase that reports no steps; shows the elapsed time."""
    with bar(desc=desc, disable=not enabled, bar_format="{desc}: {elapsed}") as b, ticking(b):
        yield b


def steps_callback(progress, steps: int, long: bool, desc: str = "decode"):
    """(callback or None, bar to close or None) for `Decoder.decode(progress=...)`.

    progress: a callable(step, steps) (used as is), True (a bar), False (nothing) or None
    (a bar when `long`: the call is expected to take seconds)."""
    if callable(progress):
        return progress, None
    if progress is None:
        progress = long
    if not isinstance(progress, bool):
        raise TypeError(f"progress={progress!r}: expected True, False, None (a bar when the decode takes long) or "
                        f"a callable(step, steps)")
    if not progress:
        return None, None
    b = StepBar(steps, desc)
    return b.update_to, b


class StepBar:
    """A bar over the steps of one call that keeps its elapsed time moving while a step
    runs (the first fast decode spends seconds racing and capturing before step 1)."""

    def __init__(self, steps: int, desc: str):
        self.bar = bar(total=steps, desc=desc, unit="step")
        self._ticks = ticking(self.bar)
        self._ticks.__enter__()

    def update_to(self, step, total=None):
        self.bar.update(max(0, step - self.bar.n))

    def close(self):
        self._ticks.__exit__(None, None, None)
        self.bar.close()
