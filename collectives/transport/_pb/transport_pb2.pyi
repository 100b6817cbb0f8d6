from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Hello(_message.Message):
    __slots__ = ("cluster_tag", "from_rank", "to_rank", "comm_id", "epoch", "client_nonce", "client_session_id", "timestamp", "window_bytes")
    CLUSTER_TAG_FIELD_NUMBER: _ClassVar[int]
    FROM_RANK_FIELD_NUMBER: _ClassVar[int]
    TO_RANK_FIELD_NUMBER: _ClassVar[int]
    COMM_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NONCE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    WINDOW_BYTES_FIELD_NUMBER: _ClassVar[int]
    cluster_tag: int
    from_rank: int
    to_rank: int
    comm_id: int
    epoch: int
    client_nonce: bytes
    client_session_id: int
    timestamp: float
    window_bytes: int
    def __init__(self, cluster_tag: _Optional[int] = ..., from_rank: _Optional[int] = ..., to_rank: _Optional[int] = ..., comm_id: _Optional[int] = ..., epoch: _Optional[int] = ..., client_nonce: _Optional[bytes] = ..., client_session_id: _Optional[int] = ..., timestamp: _Optional[float] = ..., window_bytes: _Optional[int] = ...) -> None: ...

class HelloAck(_message.Message):
    __slots__ = ("cluster_tag", "from_rank", "to_rank", "comm_id", "epoch", "client_nonce", "server_nonce", "server_session_id", "window_bytes")
    CLUSTER_TAG_FIELD_NUMBER: _ClassVar[int]
    FROM_RANK_FIELD_NUMBER: _ClassVar[int]
    TO_RANK_FIELD_NUMBER: _ClassVar[int]
    COMM_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NONCE_FIELD_NUMBER: _ClassVar[int]
    SERVER_NONCE_FIELD_NUMBER: _ClassVar[int]
    SERVER_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    WINDOW_BYTES_FIELD_NUMBER: _ClassVar[int]
    cluster_tag: int
    from_rank: int
    to_rank: int
    comm_id: int
    epoch: int
    client_nonce: bytes
    server_nonce: bytes
    server_session_id: int
    window_bytes: int
    def __init__(self, cluster_tag: _Optional[int] = ..., from_rank: _Optional[int] = ..., to_rank: _Optional[int] = ..., comm_id: _Optional[int] = ..., epoch: _Optional[int] = ..., client_nonce: _Optional[bytes] = ..., server_nonce: _Optional[bytes] = ..., server_session_id: _Optional[int] = ..., window_bytes: _Optional[int] = ...) -> None: ...

class Range(_message.Message):
    __slots__ = ("start", "stop")
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    start: int
    stop: int
    def __init__(self, start: _Optional[int] = ..., stop: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("acked", "pending", "rejected", "ack_delay", "credit")
    ACKED_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    ACK_DELAY_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    acked: _containers.RepeatedCompositeFieldContainer[Range]
    pending: _containers.RepeatedCompositeFieldContainer[Range]
    rejected: _containers.RepeatedScalarFieldContainer[int]
    ack_delay: float
    credit: int
    def __init__(self, acked: _Optional[_Iterable[_Union[Range, _Mapping]]] = ..., pending: _Optional[_Iterable[_Union[Range, _Mapping]]] = ..., rejected: _Optional[_Iterable[int]] = ..., ack_delay: _Optional[float] = ..., credit: _Optional[int] = ...) -> None: ...

class Credit(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class Ping(_message.Message):
    __slots__ = ("blocked",)
    BLOCKED_FIELD_NUMBER: _ClassVar[int]
    blocked: bool
    def __init__(self, blocked: _Optional[bool] = ...) -> None: ...

class Close(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class Abort(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...
