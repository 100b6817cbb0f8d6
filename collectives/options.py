"""Communicator-wide settings, read once from arguments and the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from collectives.codec import CodecOptions
from collectives.deadline import TIMEOUT_ENV, check_timeout
from collectives.errors import ConfigurationError

DEFAULT_TIMEOUT_S = 600.0
SAFE_ENV = "COMFY_CLUSTER_SAFE_CODEC"
COMPRESSION_ENV = "COMFY_CLUSTER_COMPRESSION"


@dataclass(frozen=True)
class CommOptions:
    """Defaults every op of one communicator uses unless the call overrides them.

    ``timeout`` bounds every blocking call (seconds).  ``codec`` chooses how objects travel:
    ``CodecOptions(safe=True)`` never unpickles what peers send.
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
            safe = env.get(SAFE_ENV, "").lower() in ("1", "true", "yes", "on")
            codec = CodecOptions(safe=safe, compression=compression)  # type: ignore[arg-type]
        return cls(timeout=timeout, codec=codec)
