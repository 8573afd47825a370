"""Give decoded images' memory back to the system in a long-running process (the watch service with its HTTP
API, the review page).

glibc's malloc serves allocations of at least M_MMAP_THRESHOLD with their own mmap (unmapped on free) and the
rest from heaps ("arenas", one per thread that allocates at the same time), which keep freed memory for reuse.
The threshold starts at 128 KiB but by default rises to the size of each large block freed (up to 32 MiB), so
after the first large image the 16 MiB blocks Pillow decodes into, and the request bodies, stay in the arenas:
measured through POST /inspect before issue 19, eight concurrent 7000x7000 decodes left the service at 304 MB
where it idled at 108 MB (docs/measured-figures.md). A fixed threshold (mallopt, which also turns the rising
off) sends every block of 1 MiB or more to mmap, so it goes back at free(); smaller allocations are unaffected.
No-op where the C library is not glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20


def return_large_blocks() -> bool:
    """Set glibc's mmap threshold to 1 MiB (fixed); True when done, False where unsupported."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError, TypeError):
        return False
