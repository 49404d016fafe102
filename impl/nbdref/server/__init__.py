"""The reference NBD server: thread per connection over blocking sockets (docs/design.md).

    from nbdref.server import Export, Server, TLSConfig
    with Server([Export.memory("exp", 64 << 20, description="scratch", bitmaps=("b0",))],
                unix="/tmp/s.sock", persona="qemu-2.12") as srv:
        ...                       # clients connect to srv.uri
    srv.records[0].violations     # what the client got wrong, with requirement ids
    str(srv.records[0].transcript)

Public names: ``Server``, ``Export``, ``TLSConfig``, ``ConnectionRecord``.  Personas come from
``nbdref.personas``, faults from ``nbdref.faults``, storage from ``nbdref.backends``.
"""

from ._config import ConnectionRecord, TLSConfig
from ._export import Export
from ._server import Server

__all__ = ["ConnectionRecord", "Export", "Server", "TLSConfig"]
