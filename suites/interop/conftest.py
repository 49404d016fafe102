"""The pair suites' fixtures: a validating proxy between the client peer and the server peer."""

from fixtures.proxying import pair, proxied  # noqa: F401 - fixtures for suites/interop
