"""Tables of the suites that must stay complete (a test of the harness, not of a peer)."""

from nbdref._constants import Cmd

from suites.server.test_commands import COMMANDS


def test_commands_table_covers_every_data_command() -> None:
    """Every transmission-phase data command of constants.yaml is exercised (or by block status/read)."""
    names = {cmd.name.split("+")[0] for cmd in COMMANDS} | {"READ", "BLOCK_STATUS"}
    assert {c.name for c in Cmd} - {"DISC", "RESIZE"} <= names
