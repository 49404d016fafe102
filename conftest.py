"""Top-level conftest: thin on purpose, it only loads the harness's pytest plugin."""

pytest_plugins = ["fixtures.plugin"]
