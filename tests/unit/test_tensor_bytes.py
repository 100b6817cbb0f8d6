"""ByteViews: byte_view's views, kept by address and length, and never the wrong memory."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from collectives.backends import tensor_bytes
from collectives.backends.p2p import byte_view
from collectives.backends.tensor_bytes import ByteViews
from tests.codec.helpers import TORCH_DTYPES, tensor_from_bytes


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (7,), (3, 5), (2, 3, 4)], ids=str)
def test_the_view_is_byte_views_bytes_and_writes_land_in_the_tensor(
    dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    views = ByteViews()
    n = torch.Size(shape).numel() * dtype.itemsize
    t = tensor_from_bytes(bytes((i * 37 + 11) % 256 for i in range(n)), dtype, shape)
    general = byte_view(t)
    assert general is not None
    got = views.of(t)
    assert got is not None and got.format == "B" and got.ndim == 1
    assert bytes(got) == bytes(general)
    new = bytes((i * 7 + 3) % 256 for i in range(got.nbytes))
    got[:] = new
    assert bytes(general) == new
    assert views.of(t) is got  # kept: the second call is a lookup


def test_no_view_where_byte_view_has_none() -> None:
    views = ByteViews()
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert views.of(base.t()) is None  # not contiguous
    assert views.of(torch.empty(0)) is None  # empty
    assert views.of(torch.empty(4, device="meta")) is None  # not CPU memory
    z = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    assert views.of(z.conj()) is None  # a conjugate view: its memory is not its values
    assert views.of(torch._neg_view(base.reshape(-1))) is None  # a negative-bit view
    assert len(views) == 0


def test_a_subclass_takes_byte_views_route() -> None:
    views = ByteViews()
    p = torch.nn.Parameter(torch.arange(6, dtype=torch.float32), requires_grad=False)
    got = views.of(p)
    assert got is not None and bytes(got) == p.detach().numpy().tobytes()
    assert len(views) == 0  # not kept


def test_views_are_kept_per_address_and_length() -> None:
    views = ByteViews()
    t = torch.arange(8, dtype=torch.int32)
    whole = views.of(t)
    head = views.of(t[:2])  # the same address, fewer bytes
    tail = views.of(t[6:])  # another address
    assert whole is not None and head is not None and tail is not None
    assert head.nbytes == 8 and whole.nbytes == 32
    assert bytes(head) == t[:2].numpy().tobytes()
    assert bytes(tail) == t[6:].numpy().tobytes()
    # Another tensor over the same bytes shares the entry: the window is the same memory.
    assert views.of(t.view(torch.uint8)) is whole


def test_a_tensor_moved_to_new_memory_gets_a_view_of_the_new_memory() -> None:
    views = ByteViews()
    t = torch.zeros(16, dtype=torch.float32)
    old = views.of(t)
    assert old is not None
    kept = torch.full((16,), 5.0)
    t.set_(kept.untyped_storage(), 0, (16,))  # same tensor object, other memory
    got = views.of(t)
    assert got is not None and got is not old
    got[:4] = bytes(4)
    assert kept[0].item() == 0.0  # written where the tensor's bytes are now
    assert kept[1].item() == 5.0


def test_the_cache_keeps_no_tensor_alive_and_stays_bounded() -> None:
    views = ByteViews()
    t = torch.ones(32)
    ref = weakref.ref(t)
    assert views.of(t) is not None
    del t
    gc.collect()
    assert ref() is None
    keep = [torch.ones(i + 1) for i in range(3 * tensor_bytes._LIMIT)]
    for tensor in keep:
        assert views.of(tensor) is not None
        assert len(views) <= tensor_bytes._LIMIT
