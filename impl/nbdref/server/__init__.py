"""The reference NBD server: thread per connection over blocking sockets (docs/design.md).

Public names: ``Server``, ``Export``, ``TLSConfig``, ``ConnectionRecord``.
"""

from ._config import ConnectionRecord, TLSConfig
from ._export import Export
from ._server import Server

__all__ = ["ConnectionRecord", "Export", "Server", "TLSConfig"]
