from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_PREFILL: _ClassVar[Role]
    ROLE_DECODE: _ClassVar[Role]

class RequestState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REQUEST_STATE_UNSPECIFIED: _ClassVar[RequestState]
    REQUEST_STATE_WAITING: _ClassVar[RequestState]
    REQUEST_STATE_TRANSFERRING: _ClassVar[RequestState]
    REQUEST_STATE_DECODING: _ClassVar[RequestState]
    REQUEST_STATE_DONE: _ClassVar[RequestState]
    REQUEST_STATE_FAILED: _ClassVar[RequestState]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
ROLE_UNSPECIFIED: Role
ROLE_PREFILL: Role
ROLE_DECODE: Role
REQUEST_STATE_UNSPECIFIED: RequestState
REQUEST_STATE_WAITING: RequestState
REQUEST_STATE_TRANSFERRING: RequestState
REQUEST_STATE_DECODING: RequestState
REQUEST_STATE_DONE: RequestState
REQUEST_STATE_FAILED: RequestState
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "requester", "lease_seconds", "kv_checksum", "model_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    KV_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    requester: str
    lease_seconds: float
    kv_checksum: bool
    model_id: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., requester: _Optional[str] = ..., lease_seconds: _Optional[float] = ..., kv_checksum: _Optional[bool] = ..., model_id: _Optional[str] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("handle",)
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    handle: KVHandle
    def __init__(self, handle: _Optional[_Union[KVHandle, _Mapping]] = ...) -> None: ...

class KVHandle(_message.Message):
    __slots__ = ("request_id", "engine_name", "side_channel_address", "block_ids", "num_tokens", "block_size", "lease_expiry_unix_ms", "lease_seconds_left", "first_token_id", "backend", "kv_layout", "compat_hash", "prefill_seconds", "kv_checksum", "engine_instance", "model_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ENGINE_NAME_FIELD_NUMBER: _ClassVar[int]
    SIDE_CHANNEL_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRY_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_LEFT_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    KV_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    COMPAT_HASH_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    KV_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    ENGINE_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    engine_name: str
    side_channel_address: str
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    num_tokens: int
    block_size: int
    lease_expiry_unix_ms: int
    lease_seconds_left: float
    first_token_id: int
    backend: str
    kv_layout: str
    compat_hash: str
    prefill_seconds: float
    kv_checksum: str
    engine_instance: str
    model_id: str
    def __init__(self, request_id: _Optional[str] = ..., engine_name: _Optional[str] = ..., side_channel_address: _Optional[str] = ..., block_ids: _Optional[_Iterable[int]] = ..., num_tokens: _Optional[int] = ..., block_size: _Optional[int] = ..., lease_expiry_unix_ms: _Optional[int] = ..., lease_seconds_left: _Optional[float] = ..., first_token_id: _Optional[int] = ..., backend: _Optional[str] = ..., kv_layout: _Optional[str] = ..., compat_hash: _Optional[str] = ..., prefill_seconds: _Optional[float] = ..., kv_checksum: _Optional[str] = ..., engine_instance: _Optional[str] = ..., model_id: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "prompt_token_ids", "max_new_tokens", "stop_token_ids", "verify_kv", "temperature", "top_p", "top_k", "seed")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_KV_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_new_tokens: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    verify_kv: bool
    temperature: float
    top_p: float
    top_k: int
    seed: int
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., max_new_tokens: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., verify_kv: _Optional[bool] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "token_ids", "text", "transfer", "finish_reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    transfer: TransferInfo
    finish_reason: FinishReason
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., transfer: _Optional[_Union[TransferInfo, _Mapping]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ...) -> None: ...

class TransferInfo(_message.Message):
    __slots__ = ("prefill_target", "prefill_engine", "num_tokens", "num_blocks", "bytes", "descriptors", "transfer_seconds", "prefill_seconds", "handshake_seconds", "src_layout", "dst_layout", "kv_checksum", "attempts", "direction", "engine")
    PREFILL_TARGET_FIELD_NUMBER: _ClassVar[int]
    PREFILL_ENGINE_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTORS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HANDSHAKE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SRC_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    DST_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    KV_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    prefill_target: str
    prefill_engine: str
    num_tokens: int
    num_blocks: int
    bytes: int
    descriptors: int
    transfer_seconds: float
    prefill_seconds: float
    handshake_seconds: float
    src_layout: str
    dst_layout: str
    kv_checksum: str
    attempts: int
    direction: str
    engine: str
    def __init__(self, prefill_target: _Optional[str] = ..., prefill_engine: _Optional[str] = ..., num_tokens: _Optional[int] = ..., num_blocks: _Optional[int] = ..., bytes: _Optional[int] = ..., descriptors: _Optional[int] = ..., transfer_seconds: _Optional[float] = ..., prefill_seconds: _Optional[float] = ..., handshake_seconds: _Optional[float] = ..., src_layout: _Optional[str] = ..., dst_layout: _Optional[str] = ..., kv_checksum: _Optional[str] = ..., attempts: _Optional[int] = ..., direction: _Optional[str] = ..., engine: _Optional[str] = ...) -> None: ...

class PeerPath(_message.Message):
    __slots__ = ("peer", "engine", "transport", "probe_bytes", "read_bytes_per_second", "write_bytes_per_second", "read_error", "write_error", "direction", "degraded", "expected_bytes_per_second", "probed_unix_ms")
    PEER_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    PROBE_BYTES_FIELD_NUMBER: _ClassVar[int]
    READ_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    WRITE_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    READ_ERROR_FIELD_NUMBER: _ClassVar[int]
    WRITE_ERROR_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    PROBED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    peer: str
    engine: str
    transport: str
    probe_bytes: int
    read_bytes_per_second: float
    write_bytes_per_second: float
    read_error: str
    write_error: str
    direction: str
    degraded: _containers.RepeatedScalarFieldContainer[str]
    expected_bytes_per_second: float
    probed_unix_ms: int
    def __init__(self, peer: _Optional[str] = ..., engine: _Optional[str] = ..., transport: _Optional[str] = ..., probe_bytes: _Optional[int] = ..., read_bytes_per_second: _Optional[float] = ..., write_bytes_per_second: _Optional[float] = ..., read_error: _Optional[str] = ..., write_error: _Optional[str] = ..., direction: _Optional[str] = ..., degraded: _Optional[_Iterable[str]] = ..., expected_bytes_per_second: _Optional[float] = ..., probed_unix_ms: _Optional[int] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("request_id", "engine_name", "side_channel_address", "block_ids", "timeout_seconds")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ENGINE_NAME_FIELD_NUMBER: _ClassVar[int]
    SIDE_CHANNEL_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    engine_name: str
    side_channel_address: str
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    timeout_seconds: float
    def __init__(self, request_id: _Optional[str] = ..., engine_name: _Optional[str] = ..., side_channel_address: _Optional[str] = ..., block_ids: _Optional[_Iterable[int]] = ..., timeout_seconds: _Optional[float] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("bytes", "descriptors", "transfer_seconds", "handshake_seconds", "engine")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTORS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HANDSHAKE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    descriptors: int
    transfer_seconds: float
    handshake_seconds: float
    engine: str
    def __init__(self, bytes: _Optional[int] = ..., descriptors: _Optional[int] = ..., transfer_seconds: _Optional[float] = ..., handshake_seconds: _Optional[float] = ..., engine: _Optional[str] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("request_id", "reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    reason: str
    def __init__(self, request_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released", "freed_blocks")
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    FREED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    released: bool
    freed_blocks: int
    def __init__(self, released: _Optional[bool] = ..., freed_blocks: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("include_finished",)
    INCLUDE_FINISHED_FIELD_NUMBER: _ClassVar[int]
    include_finished: bool
    def __init__(self, include_finished: _Optional[bool] = ...) -> None: ...

class RequestStatus(_message.Message):
    __slots__ = ("request_id", "state", "num_prompt_tokens", "num_generated_tokens", "num_blocks", "bytes", "descriptors", "transfer_seconds", "peer", "error", "age_seconds")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTORS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    state: RequestState
    num_prompt_tokens: int
    num_generated_tokens: int
    num_blocks: int
    bytes: int
    descriptors: int
    transfer_seconds: float
    peer: str
    error: str
    age_seconds: float
    def __init__(self, request_id: _Optional[str] = ..., state: _Optional[_Union[RequestState, str]] = ..., num_prompt_tokens: _Optional[int] = ..., num_generated_tokens: _Optional[int] = ..., num_blocks: _Optional[int] = ..., bytes: _Optional[int] = ..., descriptors: _Optional[int] = ..., transfer_seconds: _Optional[float] = ..., peer: _Optional[str] = ..., error: _Optional[str] = ..., age_seconds: _Optional[float] = ...) -> None: ...

class Counters(_message.Message):
    __slots__ = ("requests_total", "requests_done", "requests_failed", "transfers", "bytes_transferred", "descriptors", "transfer_seconds", "transfer_failures", "lease_expiries", "leases_released", "tokens_generated", "corrupt_transfers", "transfer_retries", "auth_failures", "cancellations")
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_DONE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FAILED_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    BYTES_TRANSFERRED_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTORS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FAILURES_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRIES_FIELD_NUMBER: _ClassVar[int]
    LEASES_RELEASED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_RETRIES_FIELD_NUMBER: _ClassVar[int]
    AUTH_FAILURES_FIELD_NUMBER: _ClassVar[int]
    CANCELLATIONS_FIELD_NUMBER: _ClassVar[int]
    requests_total: int
    requests_done: int
    requests_failed: int
    transfers: int
    bytes_transferred: int
    descriptors: int
    transfer_seconds: float
    transfer_failures: int
    lease_expiries: int
    leases_released: int
    tokens_generated: int
    corrupt_transfers: int
    transfer_retries: int
    auth_failures: int
    cancellations: int
    def __init__(self, requests_total: _Optional[int] = ..., requests_done: _Optional[int] = ..., requests_failed: _Optional[int] = ..., transfers: _Optional[int] = ..., bytes_transferred: _Optional[int] = ..., descriptors: _Optional[int] = ..., transfer_seconds: _Optional[float] = ..., transfer_failures: _Optional[int] = ..., lease_expiries: _Optional[int] = ..., leases_released: _Optional[int] = ..., tokens_generated: _Optional[int] = ..., corrupt_transfers: _Optional[int] = ..., transfer_retries: _Optional[int] = ..., auth_failures: _Optional[int] = ..., cancellations: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("role", "engine_name", "backend", "kv_layout", "num_blocks", "free_blocks", "blocks_in_use", "leased_blocks", "draining", "requests", "counters", "block_size", "compat_hash", "quarantined_blocks", "threads", "thread_names", "guard_band_bytes_changed", "peer_paths")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_NAME_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    KV_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_IN_USE_FIELD_NUMBER: _ClassVar[int]
    LEASED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    COMPAT_HASH_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    THREAD_NAMES_FIELD_NUMBER: _ClassVar[int]
    GUARD_BAND_BYTES_CHANGED_FIELD_NUMBER: _ClassVar[int]
    PEER_PATHS_FIELD_NUMBER: _ClassVar[int]
    role: Role
    engine_name: str
    backend: str
    kv_layout: str
    num_blocks: int
    free_blocks: int
    blocks_in_use: int
    leased_blocks: int
    draining: bool
    requests: _containers.RepeatedCompositeFieldContainer[RequestStatus]
    counters: Counters
    block_size: int
    compat_hash: str
    quarantined_blocks: int
    threads: int
    thread_names: _containers.RepeatedScalarFieldContainer[str]
    guard_band_bytes_changed: int
    peer_paths: _containers.RepeatedCompositeFieldContainer[PeerPath]
    def __init__(self, role: _Optional[_Union[Role, str]] = ..., engine_name: _Optional[str] = ..., backend: _Optional[str] = ..., kv_layout: _Optional[str] = ..., num_blocks: _Optional[int] = ..., free_blocks: _Optional[int] = ..., blocks_in_use: _Optional[int] = ..., leased_blocks: _Optional[int] = ..., draining: _Optional[bool] = ..., requests: _Optional[_Iterable[_Union[RequestStatus, _Mapping]]] = ..., counters: _Optional[_Union[Counters, _Mapping]] = ..., block_size: _Optional[int] = ..., compat_hash: _Optional[str] = ..., quarantined_blocks: _Optional[int] = ..., threads: _Optional[int] = ..., thread_names: _Optional[_Iterable[str]] = ..., guard_band_bytes_changed: _Optional[int] = ..., peer_paths: _Optional[_Iterable[_Union[PeerPath, _Mapping]]] = ...) -> None: ...
