"""Top-level conftest: thin on purpose, it only loads the harness's pytest plugin.

An installed harness (`pip install -e .`, as ./run does) registers the plugin through its `pytest11`
entry point; then this file must not name it again (pytest refuses `pytest_plugins` in a conftest that
is not at the rootdir, which is what this file is when pytest runs from another directory).
"""

from importlib.metadata import entry_points

if not any(ep.value == "fixtures.plugin" for ep in entry_points(group="pytest11")):
    pytest_plugins = ["fixtures.plugin"]
