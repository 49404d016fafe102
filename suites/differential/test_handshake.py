"""Differential: client flags the spec has a word on, sent alike to every server peer.

The handshake is spoken by hand (`_probe.Raw`): the reference client never sends flags it does not
know.  The core checks everything the server sends; the test records how the session went on.
"""

from __future__ import annotations

import pytest
from nbdref import events as ev
from nbdref._constants import ClientFlag

from fixtures.expectations import handshake_style
from suites.differential._probe import HARD, Raw, still_serves

SECTION = "Differential: Handshake"
UNKNOWN_CLIENT_FLAG = 1 << 5          # bits 2-31 of the client flags are undefined


def _raw(server_peer, server, verdict, evidence, label: str, allow: tuple[str, ...] = ()) -> Raw:
    if handshake_style(server_peer) == "oldstyle":
        verdict.not_applicable("the server runs in the oldstyle handshake: no client flags")
    raw = Raw(server)
    verdict.watch(raw, allow=allow)
    evidence.transcript(label, raw)
    verdict.on_finish(raw.close)
    return raw


def _offered(raw: Raw) -> int:
    return int(getattr(raw.greeting, "flags", 0)) & (ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)


# "Clients MUST NOT set any other flags; the server MUST drop the TCP connection if the client sets an
# unknown flag, or a flag that does not match something advertised by the server" (HS-016, HS-017).
@pytest.mark.req("HS-017")
def test_unknown_client_flag(server_peer, shared_server, shared_export, ref_client, verdict, evidence):
    """Does a server drop the connection when the client flags carry an undefined bit?"""
    raw = _raw(server_peer, shared_server, verdict, evidence, "raw client")
    raw.send(ev.ClientFlags(flags=_offered(raw) | UNKNOWN_CLIENT_FLAG))
    # NBD_OPT_EXPORT_NAME is valid in every newstyle flavour: only a server that carried on serves it
    answer = raw.option(ev.OptExportName(name="exp"))
    if answer == "ExportNameReply":
        answer = "export served"
    verdict.expect(answer == HARD, "HS-017", expected="the connection dropped",
                   observed=f"NBD_OPT_EXPORT_NAME answered: {answer}")
    verdict.info(answer, requirements=("HS-017",), only=True)
    still_serves(ref_client, shared_server, shared_export)


# NBD_FLAG_C_FIXED_NEWSTYLE "SHOULD be set by clients that support the fixed newstyle protocol. Servers
# MAY choose to honour fixed newstyle from clients that didn't set this bit" (HS-007, HS-013).  Without
# it only NBD_OPT_EXPORT_NAME is safe; what a server does with NBD_OPT_LIST then is recorded.  A close is
# the plain-newstyle behaviour ("the server would immediately close the connection when it saw an option
# it did not understand"): the rule against closing during haggling (DISC-006) is fixed newstyle's.
@pytest.mark.req("HS-013")
def test_option_without_fixed_newstyle(server_peer, shared_server, shared_export, ref_client, verdict, evidence):
    """What does a server answer to NBD_OPT_LIST from a client that did not set NBD_FLAG_C_FIXED_NEWSTYLE?"""
    raw = _raw(server_peer, shared_server, verdict, evidence, "raw client", allow=("DISC-006",))
    raw.send(ev.ClientFlags(flags=_offered(raw) & ~ClientFlag.FIXED_NEWSTYLE))
    answer = raw.option(ev.OptList())
    verdict.info(answer, requirements=("HS-013",), only=True)
    still_serves(ref_client, shared_server, shared_export)
