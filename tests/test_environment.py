"""Process-wide helpers: handing freed memory back to the operating system."""
import gc
import platform
import weakref

import pytest
import torch

from fedpft_dist.environment import _malloc_trim, return_freed_memory


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_malloc_trim_is_found_on_glibc():
    assert _malloc_trim() is not None


def test_collect_frees_tensors_held_only_by_a_reference_cycle():
    class Node:
        pass

    gc.disable()   # no automatic collection between the two calls
    try:
        a, b = Node(), Node()
        a.other, b.other = b, a
        a.tensor = torch.zeros(1 << 20)
        alive = weakref.ref(a.tensor)
        del a, b
        return_freed_memory()            # a trim alone leaves the cycle, and the tensor, alive
        assert alive() is not None
        return_freed_memory(collect=True)
        assert alive() is None
    finally:
        gc.enable()


def test_a_fixed_mmap_threshold_is_set_on_glibc():
    # run.exact_memory's switch: glibc's mallopt accepts the threshold (it returns 1 on success)
    from fedpft_dist.environment import FIXED_MMAP_THRESHOLD, fix_mmap_threshold

    assert fix_mmap_threshold(FIXED_MMAP_THRESHOLD) is True
