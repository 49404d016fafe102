"""``python -m nbdref proxy --listen URI --to URI [--pcap FILE]``: the validating proxy (nbdref.proxy).

Prints the URI to give clients on stdout (one line, flushed) once it listens; for each connection
that ends, one line on stderr with its violations (who broke which rule), and with ``--log`` the
transcript of both directions.  SIGTERM / SIGINT stop it; the exit code is 1 when any side broke a rule.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from ..proxy import Proxy, ProxyRecord, ProxyTLS


def _summary(r: ProxyRecord) -> str:
    who = {"C": "client", "S": "server"}
    broke = ", ".join(f"{who[v.direction]} {v.req_id}" for v in r.violations) or "no violations"
    return f"connection {r.id}: {broke}; {r.reason}" + (f"; unchecked: {r.unchecked}" if r.unchecked else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nbdref proxy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", required=True, help="nbd+unix:///?socket=PATH or nbd://127.0.0.1:PORT (0: any)")
    ap.add_argument("--to", required=True, help="URI of the server")
    ap.add_argument("--pcap", help="write what the proxy saw as pcapng (NBD on TCP port 10809)")
    ap.add_argument("--hard-disconnect", action="store_true", help="close both sides at the first violation")
    ap.add_argument("--tls-certificates", help="directory with ca-cert.pem, server-cert.pem, client-cert.pem ...")
    ap.add_argument("--tls-psk-file", help="PSK file (psktool format)")
    ap.add_argument("--tls-username", help="PSK identity towards the server")
    ap.add_argument("--io-timeout", type=float, default=30.0)
    ap.add_argument("--idle-timeout", type=float, default=300.0)
    ap.add_argument("--log", action="store_true", help="print each connection's transcript when it ends")
    args = ap.parse_args(argv)
    tls = None
    if args.tls_certificates or args.tls_psk_file:
        tls = ProxyTLS(certificates_dir=args.tls_certificates, psk_file=args.tls_psk_file,
                       psk_identity=args.tls_username)
    try:
        proxy = Proxy(args.listen, args.to, tls=tls, pcap=args.pcap, hard_disconnect=args.hard_disconnect,
                      io_timeout=args.io_timeout, idle_timeout=args.idle_timeout).start()
    except (OSError, ValueError) as e:
        print(f"nbdref proxy: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    reported = 0
    try:
        print(proxy.uri, flush=True)
        while not stop.wait(0.2):
            while reported < len(proxy.records) and proxy.records[reported].ended.is_set():
                r = proxy.records[reported]
                print(_summary(r), file=sys.stderr, flush=True)
                if args.log:
                    print(str(r.transcript), file=sys.stderr, flush=True)
                reported += 1
    finally:
        proxy.stop()
    for r in proxy.records[reported:]:
        print(_summary(r), file=sys.stderr, flush=True)
    return 1 if proxy.violations else 0
