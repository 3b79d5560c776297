"""Server TLS credentials that follow the certificate files (rotation without restart).

gRPC asks ``fetch()`` at every new TLS handshake; it compares the files' identity
(inode, size, mtime: a Kubernetes Secret volume swaps a symlink, cert-manager rewrites
the Secret) with the last one loaded and, when they changed and the new set is
valid (PEM blocks present, the key matches the certificate), hands gRPC the new
configuration. Connections already open keep their session; an invalid new set is
logged and the previous certificate stays in use. The decode daemon's prefill pool
polls ``client_source()`` every second and dials with the new certificate too.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import grpc
from kvbridge.connector.serving.daemon.security import AuthConfigError, ClientAuth, ServerAuth

CHECK_SECONDS = 1.0  # at most one stat() round per second, however many handshakes


class ReloadingCredentials:
    """``grpc.dynamic_ssl_server_credentials`` over the ``--tls-*`` files of ``cfg``.

    ``client_source()`` gives the same files as client credentials (with a generation
    number), so the decode daemon's channels to its prefill daemons follow too.
    """

    def __init__(self, cfg, auth: ServerAuth, log: logging.Logger | None = None) -> None:
        self.cfg = cfg
        self.auth = auth
        self.log = log or logging.getLogger("kvbridge.tls")
        self.paths = [p for p in (cfg.tls_cert, cfg.tls_key, cfg.tls_ca) if p]
        self._lock = threading.Lock()
        self._stamp = self._identity()
        self._refused: tuple | None = None
        self._next_check = 0.0
        self.generation = 0  # successful reloads
        self._served = 0  # the generation gRPC's server has
        self.credentials = grpc.dynamic_ssl_server_credentials(
            self._config(auth),
            self.fetch,
            require_client_authentication=auth.mutual_tls,
        )

    @property
    def reloads(self) -> int:
        return self.generation

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

    def _refresh(self) -> None:
        """Re-read the files if they changed (at most once per ``CHECK_SECONDS``; lock held)."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + CHECK_SECONDS
        stamp = self._identity()
        if stamp == self._stamp or stamp == self._refused:
            return
        try:
            auth = ServerAuth.from_config(self.cfg)
        except AuthConfigError as exc:  # half-written rotation: keep the old one
            self._refused = stamp  # one warning per bad set of files
            self.log.warning("new TLS files refused; keeping the loaded ones: %s", exc)
            return
        self._stamp, self.auth = stamp, auth
        self.generation += 1
        self.log.info("TLS certificate reloaded", extra={"files": self.paths})

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher (each new handshake): a new configuration after a reload, else None."""
        with self._lock:
            self._refresh()
            if self._served == self.generation:
                return None
            self._served = self.generation
            return self._config(self.auth)

    def client_source(self) -> tuple[int, ClientAuth]:
        """``(generation, client credentials)`` of the current files."""
        with self._lock:
            self._refresh()
            return self.generation, self.auth.client()
