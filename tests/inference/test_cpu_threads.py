"""one_thread: torch's intra-op thread count is 1 inside, restored after (also on errors), per OS thread."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from inference.cpu_threads import one_thread


@pytest.fixture
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_one_thread_inside_and_restored_after(two_threads: None) -> None:
    with one_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_restored_after_an_exception(two_threads: None) -> None:
    with pytest.raises(ValueError, match="boom"), one_thread():
        assert torch.get_num_threads() == 1
        raise ValueError("boom")
    assert torch.get_num_threads() == 2


def test_nested_sections_restore_the_outer_count(two_threads: None) -> None:
    with one_thread():
        with one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


@pytest.mark.skipif(
    not torch.backends.openmp.is_available(), reason="the count is per thread with OpenMP only"
)
def test_other_threads_keep_their_count(two_threads: None) -> None:
    """A thread that has used torch keeps its count (torch sets a thread's count from the last one set anywhere
    only on its first use)."""
    ready, inside, checked = threading.Event(), threading.Event(), threading.Event()
    seen: list[int] = []

    def other() -> None:
        torch.set_num_threads(2)
        seen.append(torch.get_num_threads())
        ready.set()
        assert inside.wait(10)
        seen.append(torch.get_num_threads())
        checked.set()

    worker = threading.Thread(target=other)
    worker.start()
    assert ready.wait(10)
    with one_thread():
        inside.set()
        assert checked.wait(10)
    worker.join(10)
    assert seen == [2, 2]
