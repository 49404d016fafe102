"""``python -m nbdref serve``: the reference server from the command line (like qemu-nbd / nbdkit).

Prints the URI it serves on stdout (one line, flushed) once it accepts connections, so scripts and
fixtures can wait for that line.  SIGTERM shuts it down gracefully (``Server.shutdown``: options get
NBD_REP_ERR_SHUTDOWN, requests in flight finish, later ones get NBD_ESHUTDOWN, for up to
``--shutdown-grace`` seconds); SIGINT, or a second SIGTERM, stops it at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from typing import TYPE_CHECKING

from .. import faults, personas

if TYPE_CHECKING:
    from ..server import Export


def parse_size(text: str) -> int:
    """``1G``, ``64M``, ``4096``, ``512k`` (binary units, like qemu-img and nbdkit)."""
    units = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b") if text.strip()[-1:].isalpha() else text
    num = t.rstrip("kmgt")
    unit = t[len(num):]
    if unit not in units or not num:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    return int(float(num) * units[unit])


def parse_block_size(text: str) -> tuple[int, int, int]:
    parts = [parse_size(p) for p in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("block size is MIN,PREFERRED,MAX")
    return parts[0], parts[1], parts[2]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nbdref serve", description=__doc__.splitlines()[0])
    where = p.add_argument_group("where to listen (default: 127.0.0.1, a free port)")
    where.add_argument("--unix", "-k", metavar="PATH", help="listen on a Unix socket")
    where.add_argument("--port", "-p", type=int, default=None, help="TCP port (0: any free port)")
    where.add_argument("--bind", "-b", default="127.0.0.1", help="TCP address (default 127.0.0.1)")
    where.add_argument("--socket-activation", action="store_true", help="use LISTEN_FDS/LISTEN_PID sockets")
    where.add_argument("--stdin", "-s", action="store_true", help="serve one client on stdin/stdout")
    what = p.add_argument_group("the export")
    what.add_argument("--size", type=parse_size, default=None, help="memory export of this size (e.g. 1G)")
    what.add_argument("--file", metavar="PATH", help="sparse file export (created if --size is given)")
    what.add_argument("--name", "-x", default="", help="export name (default: empty)")
    what.add_argument("--description", "-D", default="", help="export description (NBD_INFO_DESCRIPTION)")
    what.add_argument("--read-only", "-r", action="store_true")
    what.add_argument("--block-size", type=parse_block_size, metavar="MIN,PREF,MAX",
                      help="advertise and enforce these size constraints")
    what.add_argument("--block-size-required", action="store_true",
                      help="with --block-size: refuse NBD_OPT_GO without NBD_INFO_BLOCK_SIZE "
                           "(NBD_REP_ERR_BLOCK_SIZE_REQD) and NBD_OPT_EXPORT_NAME")
    what.add_argument("--bitmap", "-B", action="append", default=[], metavar="NAME",
                      help="dirty bitmap exposed as qemu:dirty-bitmap:NAME (repeatable)")
    how = p.add_argument_group("behaviour")
    how.add_argument("--persona", default=personas.DEFAULT, help="behave like this server version")
    how.add_argument("--list-personas", action="store_true", help="print the persona table and exit")
    how.add_argument("--oldstyle", action="store_true",
                     help="oldstyle negotiation (one export, no options, no TLS)")
    how.add_argument("--mask-handshake", type=lambda t: int(t, 0), default=0xFFFF, metavar="MASK",
                     help="clear handshake flags not in MASK, like nbdkit (0: plain newstyle, no NO_ZEROES)")
    how.add_argument("--fault", metavar="NAME[:N]", help="inject this fault")
    how.add_argument("--list-faults", action="store_true", help="print the fault catalogue and exit")
    how.add_argument("--tls", choices=("off", "on", "require"), default="off")
    how.add_argument("--tls-only", action="store_true", help="with --tls=on: the export needs TLS")
    how.add_argument("--tls-certificates", metavar="DIR")
    how.add_argument("--tls-psk", metavar="FILE")
    how.add_argument("--tls-verify-peer", action="store_true")
    how.add_argument("--no-handshake-timeout", action="store_true")
    how.add_argument("--handshake-timeout", type=float, default=0, help="seconds (0: persona default)")
    how.add_argument("--threads", "-t", type=int, default=4, help="workers per connection")
    how.add_argument("--split-reads", type=parse_size, default=0, metavar="BYTES",
                     help="cut structured reads into chunks of this size")
    how.add_argument("--no-transcript", action="store_true", help="do not keep wire transcripts")
    # Defaults are the Server's (nbdref.server._server); "%(default)s" shows them in --help.
    from ..server._server import (
        DEFAULT_MAX_BUFFER,
        DEFAULT_MAX_CONNECTION_BUFFER,
        DEFAULT_MAX_CONNECTIONS,
        DEFAULT_MAX_REQUESTS_IN_FLIGHT,
        DEFAULT_MAX_THREADS,
        DEFAULT_SHUTDOWN_GRACE,
    )

    caps = p.add_argument_group("limits (connections over a cap are closed at once)")
    caps.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS, metavar="N",
                      help="connections served at once (default %(default)s)")
    caps.add_argument("--max-threads", type=int, default=DEFAULT_MAX_THREADS, metavar="N",
                      help="threads of all connections: one each plus their workers (default %(default)s)")
    caps.add_argument("--max-buffer", type=parse_size, default=DEFAULT_MAX_BUFFER, metavar="SIZE",
                      help="bytes read from all clients and not yet answered; reads wait when it is used "
                           f"up (default {DEFAULT_MAX_BUFFER >> 20}M)")
    caps.add_argument("--max-connection-buffer", type=parse_size, default=DEFAULT_MAX_CONNECTION_BUFFER,
                      metavar="SIZE", help="the same for one connection; a longer declared WRITE is refused "
                                           f"(default {DEFAULT_MAX_CONNECTION_BUFFER >> 20}M)")
    caps.add_argument("--max-requests-in-flight", type=int, default=DEFAULT_MAX_REQUESTS_IN_FLIGHT, metavar="N",
                      help="requests of one connection read and not yet answered; it reads no more "
                           "until replies go out (default %(default)s)")
    how.add_argument("--shutdown-grace", type=float, default=DEFAULT_SHUTDOWN_GRACE, metavar="SECONDS",
                     help="on SIGTERM, how long connections get to finish (default %(default)s)")
    how.add_argument("--pid-file", metavar="PATH")
    how.add_argument("--verbose", "-v", action="store_true")
    return p


def _export(args: argparse.Namespace) -> Export:
    from ..server import Export

    kw = dict(description=args.description, read_only=args.read_only, block_size=args.block_size,
              block_size_required=args.block_size_required, bitmaps=tuple(args.bitmap), tls_only=args.tls_only)
    if args.file:
        return Export.file(args.name, args.file, size=args.size, **kw)
    return Export.memory(args.name, args.size if args.size is not None else 64 << 20, **kw)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_personas:
        print(personas.format_table())
        return 0
    if args.list_faults:
        print(faults.format_table())
        return 0
    # Imported here so that --list-* work without the server's dependencies.
    from ..server import Server, TLSConfig
    from ..server._listen import from_socket_activation

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="nbdref serve: %(message)s")
    try:
        personas.get(args.persona)
        faults.get(args.fault)
        tls = TLSConfig(mode=args.tls, certificates=args.tls_certificates, psk_file=args.tls_psk,
                        verify_peer=args.tls_verify_peer)
        export = _export(args)
    except (KeyError, ValueError, OSError) as e:
        print(f"nbdref serve: {e}", file=sys.stderr)
        return 2
    common = dict(persona=args.persona, fault=args.fault, tls=tls, workers=args.threads,
                  handshake_timeout=None if args.no_handshake_timeout else args.handshake_timeout,
                  read_chunk_size=args.split_reads, transcript=not args.no_transcript,
                  oldstyle=args.oldstyle, mask_handshake=args.mask_handshake,
                  max_connections=args.max_connections, max_threads=args.max_threads,
                  max_buffer=args.max_buffer, max_connection_buffer=args.max_connection_buffer,
                  max_requests_in_flight=args.max_requests_in_flight,
                  max_records=100)  # a long-running server must not keep every transcript forever
    if args.stdin:
        return _serve_stdin(export, common)
    # Like nbdkit and qemu-nbd: sockets passed by socket activation are used without being asked.
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and os.environ.get("LISTEN_FDS"):
        args.socket_activation = True
    try:
        if args.socket_activation:
            server = Server(export, sockets=from_socket_activation(), **common)  # type: ignore[arg-type]
        elif args.unix:
            server = Server(export, unix=args.unix, **common)  # type: ignore[arg-type]
        else:
            server = Server(export, host=args.bind, port=args.port or 0, **common)  # type: ignore[arg-type]
    except (OSError, ValueError) as e:
        print(f"nbdref serve: {e}", file=sys.stderr)
        return 1
    signals: list[int] = []
    woken = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        signals.append(signum)
        woken.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    server.start()
    if args.pid_file:
        with open(args.pid_file + ".tmp", "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(args.pid_file + ".tmp", args.pid_file)
    if not args.socket_activation:  # the activating process knows the address; keep its stdout clean
        print(server.uri, flush=True)
    try:
        while not server.stopped:
            woken.wait(0.5)
            woken.clear()
            if signal.SIGINT in signals or signals.count(signal.SIGTERM) > 1:
                break
            if signals and not server.shutting_down:
                server.shutdown(args.shutdown_grace)  # returns at once; stop() follows within the grace
    finally:
        # `stopped` is set as stop() begins (the shutdown thread's own, at the end of the grace): this
        # stop() waits for that one to finish (bounded by its timeout), so main does not exit mid-stop().
        server.stop()
        if args.pid_file:
            try:
                os.unlink(args.pid_file)
            except OSError:
                pass
    return 0


def _serve_stdin(export: Export, common: dict) -> int:
    """One connection on fds 0/1, like ``nbdkit -s``; the URI is not printed (stdout is the wire)."""
    from ..server import Server
    from ..server._transport import PipeTransport, SocketTransport

    placeholder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # never listens: stdin is the client
    try:
        sock_server = Server(export, sockets=[placeholder], **common)
    except ValueError as e:
        placeholder.close()
        print(f"nbdref serve: {e}", file=sys.stderr)
        return 1
    try:
        transport: SocketTransport | PipeTransport
        fd = os.dup(0)
        try:
            s = socket.socket(fileno=fd)
        except OSError:  # not a socket (a pipe, a file): socket() did not take the fd
            os.close(fd)
            transport = PipeTransport(os.dup(0), os.dup(1))
        else:
            if s.type == socket.SOCK_STREAM:
                transport = SocketTransport(s)
            else:  # a datagram socket cannot carry NBD: treat fds 0/1 as plain descriptors
                s.close()
                transport = PipeTransport(os.dup(0), os.dup(1))
        record = sock_server.serve_transport(transport, "stdin", wait=True)
        return 0 if not record.error else 1
    finally:
        sock_server.stop()
