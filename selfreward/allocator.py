"""Keep freed memory for reuse instead of returning it to the system after every large tensor.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh mmap and unmaps it on
free, so each large tensor a training or decoding step creates (logits chunks, activations) is paged in
again, page by page: on the 2-core CPU machine 20-37 % of SFT's CPU time went to the kernel
(benchmarks/sft_speed.py prints the share). Serving them from the heap and not trimming it makes later
steps reuse the same pages, for a somewhat higher peak resident memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Tell glibc's allocator to keep freed memory (Linux only; a no-op elsewhere or when
    SELFREWARD_KEEP_FREED_MEMORY=0). Returns whether the setting was applied."""
    if not sys.platform.startswith("linux") or os.environ.get("SELFREWARD_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        applied = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    log.debug("allocator keeps freed memory: %s", applied)
    return applied
