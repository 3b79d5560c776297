"""kvbridge.connector.serving: the serving application on top of the transfer library.

Prefill and decode daemons with their gRPC control API (``daemon/``), the model
(``model/``), the ``kvbridge`` command (``cli.py``), its client (``client.py``)
and the local demo (``demo.py``, ``procs.py``).
"""
