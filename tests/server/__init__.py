"""Tests of the reference server (nbdref.server), its backends, personas, faults and CLI."""
