"""The reference client's own answers to a server that is shutting down, against the in-process server
with its faults: NBD_REP_ERR_SHUTDOWN ends the session with NBD_OPT_ABORT (DISC-014), and an undefined
error value is reported as NBD_EINVAL (ERR-012)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from nbdref import events as ev
from nbdref.client import Client, ClientError
from nbdref.server import Export, Server

MiB = 1 << 20


def _serve(workdir: Path, fault: str) -> Server:
    server = Server([Export.memory("exp", MiB)], unix=str(workdir / "s.sock"), fault=fault, io_timeout=5)
    server.start()
    return server


def test_err_shutdown_to_an_option_is_answered_with_abort(workdir: Path) -> None:
    server = _serve(workdir, "option-err-shutdown")
    try:
        c = Client(timeout=5)
        with pytest.raises(ClientError, match="NBD_REP_ERR_SHUTDOWN"):
            c.connect_unix(workdir / "s.sock")
        record = server.records[0]
        assert record.ended.wait(5)
        sent = [e.event for e in record.transcript if e.direction == "C" and e.event is not None]
        assert isinstance(sent[-1], ev.OptAbort), sent
        assert record.violations == []
    finally:
        server.stop()


def test_an_undefined_error_value_reads_as_einval(workdir: Path) -> None:
    server = _serve(workdir, "unknown-error-value")
    try:
        c = Client(timeout=5)
        c.connect_unix(workdir / "s.sock")
        with pytest.raises(ClientError) as caught:
            c.pread(512, 0)
        assert caught.value.errno == errno.EINVAL and "undefined error value 99" in str(caught.value)
        c.close()
    finally:
        server.stop()
