"""Server TLS credentials that follow the certificate files (rotation without restart).

gRPC asks ``fetch()`` at every new TLS handshake; it compares the files' identity
(inode, size, mtime: a Kubernetes Secret volume swaps a symlink, cert-manager rewrites
the Secret) with the last one loaded and, when they changed and the new set is
valid (PEM blocks present, the key matches the certificate), hands gRPC the new
configuration. Connections already open keep their session; an invalid new set is
logged and the previous certificate stays in use.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import grpc
from kvbridge.connector.serving.daemon.security import AuthConfigError, ServerAuth

CHECK_SECONDS = 1.0  # at most one stat() round per second, however many handshakes


class ReloadingCredentials:
    """``grpc.dynamic_ssl_server_credentials`` over the ``--tls-*`` files of ``cfg``."""

    def __init__(self, cfg, auth: ServerAuth, log: logging.Logger | None = None) -> None:
        self.cfg = cfg
        self.log = log or logging.getLogger("kvbridge.tls")
        self.paths = [p for p in (cfg.tls_cert, cfg.tls_key, cfg.tls_ca) if p]
        self._lock = threading.Lock()
        self._stamp = self._identity()
        self._next_check = 0.0
        self.reloads = 0
        self.credentials = grpc.dynamic_ssl_server_credentials(
            self._config(auth),
            self.fetch,
            require_client_authentication=auth.mutual_tls,
        )

    def _identity(self) -> tuple:
        out = []
        for p in self.paths:
            try:
                st = os.stat(p)  # follows the Secret volume's symlinks
                out.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                out.append(None)
        return tuple(out)

    @staticmethod
    def _config(auth: ServerAuth) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(auth.key, auth.cert)], root_certificates=auth.ca
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher: a new configuration when the files changed, else None."""
        with self._lock:
            now = time.monotonic()
            if now < self._next_check:
                return None
            self._next_check = now + CHECK_SECONDS
            stamp = self._identity()
            if stamp == self._stamp:
                return None
            try:
                auth = ServerAuth.from_config(self.cfg)
            except AuthConfigError as exc:  # half-written rotation: keep the old one
                self.log.warning("new TLS files refused; keeping the loaded ones: %s", exc)
                return None
            self._stamp = stamp
            self.reloads += 1
            self.log.info("TLS certificate reloaded", extra={"files": self.paths})
            return self._config(auth)
