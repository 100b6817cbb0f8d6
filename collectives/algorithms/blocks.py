"""Cutting a payload into per-rank blocks, and receiving a block into its place.

The large-message algorithms (:mod:`~collectives.algorithms.large_broadcast`,
:mod:`~collectives.algorithms.ring_reduce`) move a payload as ``size`` blocks, each its own
message.  Two rules keep them correct on every :class:`~collectives.algorithms.link.Link`:

* A block received is checked before it is used: raw byte blocks must be one uncompressed array
  buffer of exactly the expected length (nothing is decoded, so nothing is unpickled), tensor
  blocks must decode to the expected dtype and element count.  A peer that sent something else
  is named in a :class:`~collectives.errors.RemoteProtocolError`.
* A buffer handed to ``link.send`` is never written again while the collective runs: a link may
  send by reference until it closes (the torch link does; the P2P seam copies on post, but the
  algorithms are shared).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from collectives.algorithms.link import sendrecv
from collectives.codec import Encoded, encode
from collectives.codec.frames import CODEC_NONE, Header, Kind
from collectives.errors import CodecError, RemoteProtocolError

if TYPE_CHECKING:
    import torch

    from collectives.algorithms.link import Link
    from collectives.codec import CodecOptions

# Codec headers, with the options they were decoded under, that decode to a tensor of this dtype
# and element count.  The outcome of a decode (its checks, the dtype, the size) follows from the
# header and the options alone, never from an uncompressed payload's bytes, so a message that
# landed in the caller's buffer under a known header is already in place: no decode, no checks
# to repeat.  A loop of small ops repeats a few headers; cleared when full.
_FITS: dict[tuple[bytes, CodecOptions], tuple[Any, int]] = {}
_FITS_MAX = 64


def split(total: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ``(start, stop)`` ranges covering ``range(total)``; the first
    ``total % parts`` are one longer.  Every rank computes the same split from the same total."""
    base, extra = divmod(total, parts)
    out = []
    start = 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def bytes_message(view: memoryview) -> Encoded:
    """A raw byte block as a message: one uint8 array buffer, which a receiver may land in
    place (:func:`collectives.backends.p2p.lands_in`).  Zero-copy: the message aliases ``view``."""
    return encode(np.frombuffer(view, dtype=np.uint8))


def block_size(msg: Encoded) -> int | None:
    """The byte length of a raw block message (:func:`bytes_message`), or None when ``msg`` is
    anything else (another kind, compressed, several buffers, a malformed header)."""
    try:
        parsed = Header.parse(msg.header)
    except CodecError:
        return None
    if parsed.kind is not Kind.ARRAY or len(msg.buffers) != 1:
        return None
    entry = parsed.entries[0]
    if entry.codec != CODEC_NONE or msg.buffers[0].nbytes != entry.wire_len:
        return None
    return entry.wire_len


def land_bytes(link: Link, msg: Encoded, src: int, target: memoryview) -> None:
    """Put a received raw block into ``target`` (no copy when the transport landed it there)."""
    if block_size(msg) != target.nbytes:
        raise RemoteProtocolError(
            f"{link.deadline.op} on rank {link.rank}: rank {src} sent a message that is not the "
            f"{target.nbytes}-byte block this rank expects (do all ranks pass the same sizes?)"
        )
    got = msg.buffers[0]
    if target.nbytes and _address(got) != _address(target):
        target[:] = got.cast("B") if got.format != "B" or got.ndim != 1 else got


def recv_bytes(
    link: Link, src: int, target: memoryview, send: tuple[int, Encoded] | None = None
) -> None:
    """Receive the next raw block from ``src`` into ``target``; ``send``: ``(dst, msg)`` to
    send first (:func:`~collectives.algorithms.link.sendrecv`)."""
    into = target if target.nbytes else None
    msg = link.recv(src, into) if send is None else sendrecv(link, *send, src, into)
    land_bytes(link, msg, src, target)


def _address(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data) if view.nbytes else 0


def tensor_bytes_or_none(t: torch.Tensor) -> memoryview | None:
    """A writable byte view of a contiguous, non-empty CPU tensor (where a block may land)."""
    if not t.is_cpu or not t.is_contiguous() or t.numel() == 0 or t.is_conj() or t.is_neg():
        return None
    import torch

    return t.detach().reshape(-1).view(torch.uint8).numpy().data.cast("B")


def landing_key(
    msg: Encoded, into: memoryview | None, codec: CodecOptions
) -> tuple[bytes, CodecOptions] | None:
    """The key of :func:`known_fit` for a message the transport landed in ``into`` (it then
    returns ``into`` as the message's only buffer), or None when it did not land there."""
    if into is None or len(msg.buffers) != 1 or msg.buffers[0] is not into:
        return None
    return bytes(msg.header), codec


def known_fit(key: tuple[bytes, CodecOptions] | None, out: torch.Tensor) -> bool:
    """Whether a landed message (:func:`landing_key`) is known to decode to ``out``'s dtype and
    element count: it is then in place, checked, and needs no decode."""
    return key is not None and _FITS.get(key) == (out.dtype, out.numel())


def remember_fit(key: tuple[bytes, CodecOptions] | None, got: torch.Tensor) -> None:
    """Record what a landed message (:func:`landing_key`) decoded to, once it passed the checks."""
    if key is None:
        return
    if len(_FITS) >= _FITS_MAX:
        _FITS.clear()
    _FITS[key] = (got.dtype, got.numel())


def recv_tensor(
    link: Link, src: int, out: torch.Tensor, send: tuple[int, Encoded] | None = None
) -> None:
    """Receive the next tensor block from ``src`` into ``out``, checking dtype and size;
    ``send``: ``(dst, msg)`` to send first (:func:`~collectives.algorithms.link.sendrecv`)."""
    into = tensor_bytes_or_none(out)
    msg = link.recv(src, into) if send is None else sendrecv(link, *send, src, into)
    key = landing_key(msg, into, link.codec)
    if known_fit(key, out):
        return
    got = link.decode_tensor(msg, src)
    if got.dtype != out.dtype or got.numel() != out.numel():
        raise RemoteProtocolError(
            f"{link.deadline.op} on rank {link.rank}: rank {src} sent a {got.dtype} block of "
            f"{got.numel()} elements where this rank expects {out.dtype} x {out.numel()} "
            "(do all ranks pass the same tensor?)"
        )
    remember_fit(key, got)
    if got.numel() and (got.data_ptr() != out.data_ptr() or got.device != out.device):
        out.copy_(got.reshape(out.shape))
