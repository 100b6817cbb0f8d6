"""The rendezvous store as a ``torch.distributed.Store``, for ``init_process_group(store=...)``.

torch calls these methods from C++ (gloo's and NCCL's own rendezvous: ``set``, ``wait``,
``get``; barriers: ``add``, ``check``, ``compare_set``); each goes over the authenticated
connection of a :class:`~collectives.rendezvous.store.StoreClient`.  Failures are raised as
``torch.distributed.DistStoreError`` (a ``RuntimeError``), as torch's own stores do.
Importing this module imports torch; :mod:`collectives.backends.torch_rendezvous` does so lazily.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch.distributed as dist

from collectives.errors import CollectivesError
from collectives.rendezvous.store import StoreClient

T = TypeVar("T")


def _raw(value: bytes | str) -> bytes:
    """A value as the store keeps it: torch passes text or bytes."""
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


class AuthenticatedStore(dist.Store):  # type: ignore[misc,name-defined]
    """A ``torch.distributed.Store`` served by rank 0's :class:`StoreServer`."""

    def __init__(self, client: StoreClient, timeout: timedelta) -> None:
        super().__init__()
        self.client = client
        self.set_timeout(timeout)

    def _timeout_s(self, timeout: timedelta | None) -> float:
        chosen = self.timeout if timeout is None else timeout
        return float(chosen.total_seconds())

    def set(self, key: str, value: bytes | str) -> None:
        self._run(self.client.set, key, _raw(value))

    def get(self, key: str) -> bytes:
        self.wait([key])
        return self._run(self.client.get, key)

    def add(self, key: str, amount: int) -> int:
        return self._run(self.client.add, key, amount)

    def check(self, keys: Sequence[str]) -> bool:
        return self._run(self.client.check, list(keys))

    def wait(self, keys: Sequence[str], timeout: timedelta | None = None) -> None:
        self._run(self.client.wait, list(keys), self._timeout_s(timeout))

    def compare_set(self, key: str, expected: bytes | str, desired: bytes | str) -> bytes:
        return self._run(self.client.compare_set, key, _raw(expected), _raw(desired))

    def delete_key(self, key: str) -> bool:
        return self._run(self.client.delete_key, key)

    def num_keys(self) -> int:
        return self._run(self.client.num_keys)

    # torch's C++ trampoline looks these two up by their C++ names.
    getNumKeys = num_keys
    deleteKey = delete_key

    @staticmethod
    def _run(call: Callable[..., T], *args: Any) -> T:
        try:
            return call(*args)
        except (CollectivesError, KeyError) as err:
            raise dist.DistStoreError(str(err)) from err


__all__ = ["AuthenticatedStore"]
