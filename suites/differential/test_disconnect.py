"""Differential: ending the transmission phase with NBD_CMD_DISC, sent alike to every server peer.

With requests still in flight (the server "MUST handle all outstanding requests"), and with the reserved
offset and length fields set.  The client is abandoned after its NBD_CMD_DISC (it "MUST NOT send
anything to the server after" it, DISC-026); the next connection shows the server still serves.
"""

from __future__ import annotations

import pytest
from nbdref.client import ClientError

from suites.differential._probe import connect, disc, error_name, record, still_serves, wait_close

SECTION = "Differential: Terminating the transmission phase"


# NBD_CMD_DISC with requests in flight: the client "SHOULD wait until there are no inflight requests"
# (DISC-023); "The server MUST handle all outstanding requests, shut down the TLS session (if one is
# running), and close the TCP session" (DISC-025, the core checks at EOF): a request is handled for the
# client when its reply came.  16 reads of 256 KiB (qemu's MAX_NBD_REQUESTS is 16), then DISC at once.
IN_FLIGHT, IN_FLIGHT_SIZE = 16, 256 * 1024


@pytest.mark.req("DISC-025")
def test_disc_with_requests_in_flight(server_peer, shared_server, shared_export, ref_client, verdict):
    """Does a server answer every request in flight before it closes on NBD_CMD_DISC?"""
    c = connect(ref_client, shared_server)
    cookies = [c.aio_pread(bytearray(IN_FLIGHT_SIZE), i * IN_FLIGHT_SIZE) for i in range(IN_FLIGHT)]
    disc(c)
    answered, errors = 0, set()
    for cookie in cookies:
        try:
            c.wait(cookie)
        except ClientError as e:
            if e.errno is None or not c.aio_is_ready():
                break                   # the session ended: the rest were not answered
            errors.add(error_name(e.errno))     # an error reply is an answer too (e.g. NBD_ESHUTDOWN, DISC-020)
        except OSError:
            break
        answered += 1
    closing = wait_close(c)
    verdict.expect(answered == IN_FLIGHT, "DISC-025", expected=f"all {IN_FLIGHT} requests answered, then a close",
                   observed=f"{answered} of {IN_FLIGHT} answered")
    how = f" (some with {', '.join(sorted(errors))})" if errors else ""
    record(verdict, f"{'all' if answered == IN_FLIGHT else 'not all'} answered{how}, then {closing}", "DISC-025")
    still_serves(ref_client, shared_server, shared_export)


# NBD_CMD_DISC: "offset and length are reserved ... MUST be zero" for the client (DISC-027); the server
# "MUST" close the connection (DISC-015).  Whether it still does with non-zero fields is recorded.
@pytest.mark.req("DISC-015")
def test_disc_with_offset_length(server_peer, shared_server, shared_export, ref_client, verdict):
    """Does a server close the connection on an NBD_CMD_DISC whose offset and length are not zero?"""
    c = connect(ref_client, shared_server)
    disc(c, 4096, 4096)
    answer = wait_close(c)
    record(verdict, answer, "DISC-015")
    still_serves(ref_client, shared_server, shared_export)
