"""NBD_OPT_LIST: every implementation must support it, and what it lists must be served."""

from __future__ import annotations

import pytest
from nbdref.client import ClientError

SECTION = "Option haggling: NBD_OPT_LIST"


# "Every implementation MUST support NBD_OPT_LIST" (INTEROP-008), with "NBD_REP_SERVER" replies then
# NBD_REP_ACK, or an error reply: a server "MAY" refuse to list with NBD_REP_ERR_POLICY (OPT-017 binds
# the framing, checked by the core).  NBD_REP_ERR_UNSUP means it does not support the option: INTEROP-008
# broken.  Every name listed must be an export the server really serves.  (nbdkit's file plugin serves
# any name and lists its default export "", not "exp": honest, not a breach.)
@pytest.mark.req("INTEROP-008", "GO-012")
@pytest.mark.feature("NBD_OPT_LIST")
def test_list(server_peer, shared_server, shared_export, ref_client, verdict):
    """NBD_OPT_LIST is supported and lists only exports that are served."""
    from nbdref._constants import Rep
    c = ref_client(shared_server, opt_mode=True)
    try:
        exports = c.opt_list()
    except ClientError as e:
        if e.reply is None:             # the connection ended: no answer at all is no refusal
            raise
        reply = getattr(e.reply, "reply_type", None)
        if reply == Rep.ERR_UNSUP:
            verdict.fail("INTEROP-008", expected="NBD_OPT_LIST supported (a list, or a policy refusal)",
                         observed=f"NBD_REP_ERR_UNSUP: {e}")
            verdict.timeline("NBD_OPT_LIST", False, export=shared_export, how=str(e))
        else:                           # e.g. NBD_REP_ERR_POLICY: supported, and restricted
            verdict.info(f"NBD_OPT_LIST refused ({e}): allowed (a server may restrict listing)", only=True)
        return
    verdict.timeline("NBD_OPT_LIST", True, export=shared_export)
    names = [name for name, _ in exports]
    verdict.info(f"lists {names}")
    if not verdict.expect(bool(names), "INTEROP-008", expected="NBD_OPT_LIST answered with the served exports",
                          observed="NBD_REP_ACK without any NBD_REP_SERVER"):
        return
    c.opt_abort()
    for name in names[:4]:
        c2 = ref_client(shared_server, setup=lambda cl, n=name: cl.set_export_name(n))
        verdict.expect(c2.get_size() == shared_export.size, "INTEROP-008",
                       expected=f"the listed export {name!r} is served", observed=f"size {c2.get_size()}")
