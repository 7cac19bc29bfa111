"""Host memory while a model is materialised and loaded: glibc's malloc must not keep freed temporaries.

    pin_mmap_threshold()     # before building the model
    ...                      # materialise, initialise, read init_from (full-size temporaries, one at a time)
    unpin_mmap_threshold()   # before training

Initialising or loading a sharded model allocates and frees one full-size tensor per parameter next to
the shards. glibc's malloc serves a block above its mmap threshold (128 KiB) with its own `mmap` and
returns it on free, but on freeing such a block it raises the threshold to that block's size (up to
32 MiB) and the heap's trim threshold to twice that. From then on tensors up to the largest one come
from the heap, and up to twice the largest tensor of freed heap stays resident: measured on a 305M model
at 2 ranks (FSDP2), 59 MiB above the shards after the engine was built, against 5 MiB with the threshold
fixed (docs/scale.md). Fixing the threshold (any `mallopt` of it turns the dynamic adjustment off) keeps
every tensor-sized block in its own mapping while loading; afterwards it is set to glibc's 32 MiB
ceiling, the value the dynamic rule settles at in training, where reusing heap blocks saves page faults.
Elsewhere than on glibc both are no-ops.
"""

import ctypes
import ctypes.util
import functools
import mmap
import sys

# mallopt's parameter number for the mmap threshold (malloc.h).
M_MMAP_THRESHOLD = -3
LOADING_THRESHOLD = 128 * 1024
TRAINING_THRESHOLD = 32 * 1024 * 1024
MADV_DONTNEED = 4  # madvise's advice number (sys/mman.h)


@functools.cache
def _libc():
    """glibc (or the platform's C library) on Linux; None elsewhere or where it cannot be loaded."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def _mallopt(param: int, value: int) -> bool:
    mallopt = getattr(_libc(), "mallopt", None)  # musl has no mallopt: nothing to set
    return bool(mallopt(ctypes.c_int(param), ctypes.c_int(value))) if mallopt is not None else False


def pin_mmap_threshold() -> bool:
    """Serve every block over 128 KiB by its own mapping, returned on free; True if glibc took it."""
    return _mallopt(M_MMAP_THRESHOLD, LOADING_THRESHOLD)


def unpin_mmap_threshold() -> bool:
    """After loading: blocks up to 32 MiB from the heap again (glibc's ceiling of its dynamic rule)."""
    return _mallopt(M_MMAP_THRESHOLD, TRAINING_THRESHOLD)


def drop_pages(piece) -> None:
    """Let the kernel drop the file pages behind tensor `piece` (part of a `torch.load(mmap=True)`
    tensor) from this process's resident memory (`madvise(MADV_DONTNEED)`): touched pages of a file
    mapping count in the RSS for as long as they stay mapped, which over a whole load would add the
    N / W bytes read next to the shard they were copied into. The pages are clean (never written), so
    the mapping reads them from the file again if touched again. Linux only; elsewhere a no-op."""
    libc = _libc()
    if libc is None or piece.numel() == 0:
        return
    page = mmap.PAGESIZE
    begin = piece.data_ptr() // page * page
    end = -(-(piece.data_ptr() + piece.numel() * piece.element_size()) // page) * page
    libc.madvise(ctypes.c_void_p(begin), ctypes.c_size_t(end - begin), MADV_DONTNEED)
