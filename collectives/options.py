"""Communicator-wide settings, read once from arguments and the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from collectives.codec import ALLOW_PICKLE_ENV, CodecOptions
from collectives.deadline import TIMEOUT_ENV, check_timeout
from collectives.errors import ConfigurationError

__all__ = ["ALLOW_PICKLE_ENV", "COMPRESSION_ENV", "DEFAULT_TIMEOUT_S", "CommOptions", "env_flag"]

DEFAULT_TIMEOUT_S = 600.0
COMPRESSION_ENV = "COMFY_CLUSTER_COMPRESSION"
_TRUE = ("1", "true", "yes", "on")


def env_flag(environ: Mapping[str, str], name: str) -> bool:
    """Whether the variable ``name`` is on: 1, true, yes or on (any case, spaces ignored)."""
    return environ.get(name, "").strip().lower() in _TRUE


@dataclass(frozen=True)
class CommOptions:
    """Defaults every op of one communicator uses unless the call overrides them.

    ``timeout`` bounds every blocking call (seconds).  ``codec`` chooses how objects travel and
    what a rank accepts; by default nothing is pickled or unpickled, and
    ``CodecOptions(allow_pickle=True)`` (``COMFY_CLUSTER_ALLOW_PICKLE=1``) lets any peer that can
    reach the rank run code on it.
    """

    timeout: float = DEFAULT_TIMEOUT_S
    codec: CodecOptions = field(default_factory=CodecOptions)

    def __post_init__(self) -> None:
        # Stored as the validated float: ops trust it without checking it again.
        object.__setattr__(self, "timeout", check_timeout(self.timeout, "timeout"))

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        timeout: float | None = None,
        codec: CodecOptions | None = None,
    ) -> CommOptions:
        env = os.environ if environ is None else environ
        if timeout is None:
            raw = env.get(TIMEOUT_ENV)
            timeout = check_timeout(raw, TIMEOUT_ENV) if raw else DEFAULT_TIMEOUT_S
        if codec is None:
            compression = env.get(COMPRESSION_ENV) or None
            if compression not in (None, "zstd", "lz4"):
                raise ConfigurationError(
                    f"{COMPRESSION_ENV}={compression!r}: use 'zstd', 'lz4' or leave it unset"
                )
            allow_pickle = env_flag(env, ALLOW_PICKLE_ENV)
            codec = CodecOptions(allow_pickle=allow_pickle, compression=compression)  # type: ignore[arg-type]
        return cls(timeout=timeout, codec=codec)
