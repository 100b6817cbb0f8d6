"""One shared mapping for the small collectives of a world whose ranks all share one host.

Why: a small collective moved as messages costs every hop a post and a take of Python work,
and a rooted one its agreement round on top (a 4-rank broadcast: 11 messages).  With 4 ranks
on 2 CPUs that work, and the CPU turns it takes, make most of a 1 KiB op's time.  MPI
libraries and NCCL run small collectives of one node through shared memory instead; so does
this: each rank writes its part once into its own *slot*, and reads what it needs out of the
others' slots, in place.

Layout (:class:`Arena`): one world line (``complete``: the last op every rank has written its
slot of; ``drained``: the last op every rank is done with), one control line per rank
(``done``: the last arena op this rank has finished reading; ``sleeps``: it sleeps on a word of
the world line), then two slots per rank, used by alternate ops.  A slot holds a header (the
op's number, the lengths of the meta and the body, whether the payload fits) and then the meta
(the op's envelope and its codec header) and the body.  Each word of a control line or a slot
is written by its owner only.

An op ``k`` (numbered per arena, the same on every rank, since every rank takes the same
path for the same op) goes: wait until every rank is ``done`` with op ``k - 2`` (the last user
of the slot about to be written), write the slot, store its number last; wait for the slots of
``k`` of the ranks needed, check their envelopes, copy what is needed out; store ``done = k``.
The envelope of every rank is in its slot, so every rank checks every other's op, sequence
number and root: a rooted collective needs no separate agreement round.

Waiting (:meth:`Arena.sleep`): a rank waiting for every rank's slot of op ``k`` (or for every
rank to be done with it) first polls for a short while, then raises its ``sleeps`` word, reads
the world word, looks again, and sleeps on the world word (a ``futex``) unless it changed.  A
rank whose store completes the op (it sees every other's after its own) stores ``k`` in the
world word and, when a ``sleeps`` word is up, wakes its sleepers: one wake per op, from the last
rank to arrive, however many sleep.  Several ranks may each see themselves last; they all store
the same ``k``, so no store is lost.  A full fence sits between each side's store and its loads
of the other's words (``sleeps`` and the slots), so one of them sees the other's.

The mapping is a sealed memfd made by rank 0 and mapped by the others through
``/proc/<pid>/fd/<fd>``, as a ring is (:mod:`collectives.backends.shm_ring`, whose notes on
trust and on memory order apply here too).
"""

from __future__ import annotations

from collections.abc import Callable

from collectives.backends import futex, shm_ring

NAME = "comfy-cluster-arena"
SLOT_BYTES = 64 << 10
"""Bytes per slot: a payload (meta and body) up to this less :data:`HEAD_BYTES` goes through
the arena; a larger one takes the message path (see ``udp_arena``)."""
HEAD_BYTES = 64
CONTROL_BYTES = 64
CAPACITY = SLOT_BYTES - HEAD_BYTES

# Words of the world line (8-byte items; the low 32 bits of each, its first four bytes on this
# little-endian machine, are the futex word).
COMPLETE, DRAINED = 0, 1
# Words of a control line.
DONE, SLEEPS = 0, 1
# Words of a slot's head.
SEQ, META, BODY, OVER = 0, 1, 2, 3


def arena_bytes(size: int) -> int:
    return (1 + size) * CONTROL_BYTES + 2 * size * SLOT_BYTES


class Arena:
    """One rank's view of the arena of a ``size``-rank world (see the module docstring)."""

    def __init__(self, area: object, rank: int, size: int) -> None:
        self._area = area
        view = memoryview(area)  # type: ignore[arg-type]
        base_address = futex.address_of(area)
        self._words = [base_address + 8 * word for word in (COMPLETE, DRAINED)]
        self.rank, self.size = rank, size
        self._world = view[:CONTROL_BYTES].cast("Q")
        self._control = [
            view[(1 + r) * CONTROL_BYTES : (2 + r) * CONTROL_BYTES].cast("Q") for r in range(size)
        ]
        base = (1 + size) * CONTROL_BYTES
        self._heads: list[memoryview] = []
        self._data: list[memoryview] = []
        for index in range(2 * size):  # slot (rank r, parity p) is index 2 * r + p
            start = base + index * SLOT_BYTES
            self._heads.append(view[start : start + HEAD_BYTES].cast("Q"))
            self._data.append(view[start + HEAD_BYTES : start + SLOT_BYTES])

    # -- this rank's side --------------------------------------------------------------------
    def free(self, k: int) -> bool:
        """Whether every rank is done with op ``k - 2``: the slot op ``k`` writes is free."""
        return self.all_done(k - 2)

    def behind(self, k: int) -> list[int]:
        """The ranks not yet done with op ``k``."""
        return [r for r, line in enumerate(self._control) if line[DONE] < k]

    def missing(self, k: int) -> list[int]:
        """The ranks that have not written their slot of op ``k``."""
        return [r for r in range(self.size) if not self.ready(r, k)]

    def publish(self, k: int, meta: bytes, body: list[memoryview]) -> bool:
        """Write op ``k``'s meta and body into this rank's slot (only the meta when they do not
        fit: then the payload takes the message path); whether the body went in."""
        index = 2 * self.rank + (k & 1)
        head, data = self._heads[index], self._data[index]
        nbytes = sum(b.nbytes for b in body)
        fits = len(meta) + nbytes <= CAPACITY
        if len(meta) > CAPACITY:
            raise ValueError(f"an arena meta of {len(meta)} bytes")
        data[: len(meta)] = meta
        at = len(meta)
        if fits:
            for part in body:
                data[at : at + part.nbytes] = part
                at += part.nbytes
        head[META] = len(meta)
        head[BODY] = nbytes if fits else 0
        head[OVER] = 0 if fits else 1
        head[SEQ] = k  # last: a reader that sees it sees the rest
        self._arrived(COMPLETE, k, self.all_ready)
        return fits

    def finish(self, k: int) -> None:
        """This rank read what it needed of op ``k``: the slots of op ``k`` may be reused."""
        self._control[self.rank][DONE] = k
        self._arrived(DRAINED, k, self.all_done)

    def all_done(self, k: int) -> bool:
        return all(line[DONE] >= k for line in self._control)

    # -- the others' slots -------------------------------------------------------------------
    def ready(self, src: int, k: int) -> bool:
        return bool(self._heads[2 * src + (k & 1)][SEQ] == k)

    def all_ready(self, k: int) -> bool:
        parity = k & 1
        heads = self._heads
        return all(heads[2 * r + parity][SEQ] == k for r in range(self.size))

    def slot(self, src: int, k: int) -> tuple[memoryview, memoryview | None]:
        """Op ``k``'s meta and body in ``src``'s slot (views into the arena: valid until this
        rank calls :meth:`finish`); the body is None when the payload did not fit."""
        index = 2 * src + (k & 1)
        head, data = self._heads[index], self._data[index]
        meta_len, body_len = head[META], head[BODY]
        if meta_len + body_len > CAPACITY:
            raise ValueError(f"rank {src}'s arena slot announces {meta_len + body_len} bytes")
        meta = data[:meta_len]
        return meta, None if head[OVER] else data[meta_len : meta_len + body_len]

    # -- sleeping ----------------------------------------------------------------------------
    def _arrived(self, word: int, k: int, whole: Callable[[int], bool]) -> None:
        """After this rank's store for op ``k``: when ``whole(k)`` (every rank's store is in),
        say so in the world ``word`` and wake its sleepers (see the module docstring)."""
        shm_ring.fence()  # this rank's store before the look at the others'
        if not whole(k):
            return
        # Never a step back: op k + 1 cannot be whole before this rank's store for it.
        self._world[word] = k
        shm_ring.fence()  # the world word before the look at the sleepers
        if any(line[SLEEPS] for line in self._control):
            futex.wake(self._words[word])

    def sleep(self, word: int, ready: Callable[[], bool], timeout_s: float) -> bool:
        """Sleep on the world ``word`` (:data:`COMPLETE` or :data:`DRAINED`) until a rank
        stores it, or ``timeout_s`` passes, unless ``ready()`` (what this rank waits for)
        already holds; ``ready()`` after."""
        mine = self._control[self.rank]
        mine[SLEEPS] = 1
        try:
            shm_ring.fence()  # the sleeps word before the looks at the world word and the slots
            seen = self._world[word]
            if ready():
                return True
            futex.wait(self._words[word], seen, timeout_s)
        finally:
            mine[SLEEPS] = 0
        return ready()


def create(size: int) -> tuple[int, object]:
    """The arena of a ``size``-rank world (rank 0 makes it): its memfd and mapping."""
    return shm_ring.make_shared(arena_bytes(size), NAME)


def attach(pid: int, fd: int, size: int) -> object:
    return shm_ring.map_shared(pid, fd, arena_bytes(size), NAME)


__all__ = ["CAPACITY", "Arena", "SLOT_BYTES", "attach", "create"]
