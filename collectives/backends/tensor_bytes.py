"""Byte views of CPU tensors' memory, made once per address and length (:class:`ByteViews`).

``p2p.byte_view`` makes a tensor's byte view through four torch calls and numpy: ~4 us warm,
and several times that in the first op after a rank wakes from a barrier, when the dispatcher's
memory is out of the CPU's caches.  The arena's small collectives view every buffer they touch,
on every call, so there those calls were most of a 1 KiB op's CPU.  A view made with ctypes over
the tensor's address, and kept under (address, length), costs a dict lookup from then on.

Why a kept view is safe: an entry is a bare window on memory, keeping no tensor and no storage
alive.  It is handed out only for a tensor that, at that moment, is a contiguous CPU tensor
whose bytes start at that address and span that length, so the window is that tensor's memory,
whoever owned the address when the entry was made.  The caller uses it while it holds the
tensor (for the op), as it would a view from ``byte_view``.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

from collectives.backends.p2p import byte_view

if TYPE_CHECKING:
    import torch

# Entries kept before the cache starts again: a caller's buffers are a handful, reused call
# after call; one that allocates afresh each call gets a new address each time.
_LIMIT = 64


class ByteViews:
    """A cache of byte views by address and length; :meth:`of` is ``byte_view`` made cheap."""

    __slots__ = ("_tensor_type", "_views")

    def __init__(self) -> None:
        self._views: dict[tuple[int, int], memoryview] = {}
        self._tensor_type: type[Any] | None = None

    def of(self, tensor: torch.Tensor) -> memoryview | None:
        """A writable byte view of ``tensor``'s memory, or None where ``byte_view`` has none
        (other devices, non-contiguous, empty, conjugate or negative-bit views)."""
        plain = self._tensor_type
        if plain is None:
            import torch

            plain = self._tensor_type = torch.Tensor
        if type(tensor) is not plain:
            # A subclass (a Parameter, a wrapper tensor) may redefine data_ptr or have no
            # memory of its own: the general route.
            return byte_view(tensor)
        if not tensor.is_cpu or not tensor.is_contiguous() or tensor.is_conj() or tensor.is_neg():
            return None
        key = (tensor.data_ptr(), tensor.nbytes)
        view = self._views.get(key)
        if view is None:
            if not key[1]:
                return None
            if len(self._views) >= _LIMIT:
                self._views.clear()
            window = (ctypes.c_char * key[1]).from_address(key[0])
            view = self._views[key] = memoryview(window).cast("B")
        return view

    def __len__(self) -> int:
        return len(self._views)
