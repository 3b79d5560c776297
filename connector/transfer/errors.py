"""Errors of the transfer agent, its transports and its handshake.

Every error names what is wrong (peer, region, descriptor, timeout) so a daemon
can log it and refuse one request or one peer without going down.
"""

from __future__ import annotations


class TransferError(RuntimeError):
    """Base class of every kvbridge transfer error."""


class EngineUnavailableError(TransferError, ImportError):
    """A transfer engine's Python package is missing or cannot start."""


class HandshakeError(TransferError):
    """A handshake message is malformed, of another wire version, or unexpected."""


class IncompatiblePeerError(HandshakeError):
    """The peer's layout, backend or parallelism cannot be paired with ours."""


class UnknownPeerError(TransferError, KeyError):
    """No peer of that name was connected."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "unknown peer"


class PeerUnreachableError(TransferError):
    """The peer's side channel did not answer in time."""


class DescriptorError(TransferError, ValueError):
    """A descriptor lies outside a registered region (nothing was posted)."""


class TransferFailedError(TransferError):
    """The engine reported a failed transfer; its handles were released."""


class TransferTimeoutError(TransferFailedError, TimeoutError):
    """A transfer did not complete within its timeout; its handles were released."""
