"""Run small CPU work on the calling thread alone: below a certain size, waking the intra-op thread pool for a
kernel costs more than splitting it saves, most of all on shared cores where a woken thread waits for a core."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch's intra-op thread count is 1 inside, restored after (also on an exception).

    The count is per OS thread with torch's OpenMP backend (`omp_set_num_threads` sets the calling thread's
    value), so other threads that have used torch keep theirs; a switch costs about 0.2 us. (Torch gives a thread
    the last count set anywhere when it first uses torch, so a thread whose first torch call falls inside another
    thread's section starts with one: the engine's step thread has long used torch by then.)
    """
    threads = torch.get_num_threads()
    if threads == 1 or not torch.backends.openmp.is_available():
        # without OpenMP the count is process-wide: switching it would change other threads' count too
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
