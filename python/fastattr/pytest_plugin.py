"""``pytest -p fastattr.pytest_plugin``: the name the plugin is loaded by; it lives in
:mod:`fastattr.integrations.pytest_plugin`."""

from fastattr.integrations.pytest_plugin import (  # noqa: F401 - pytest reads the hooks from this module
    calls,
    pytest_addoption,
    pytest_configure,
    pytest_terminal_summary,
    pytest_unconfigure,
)
