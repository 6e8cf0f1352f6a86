"""The public API: every name in `agent_runtime.__all__` resolves, and importing the package stays cheap."""

from __future__ import annotations

import subprocess

import agent_runtime
from tests.conftest import PYTHON, ROOT


def test_every_public_name_resolves_to_its_definition() -> None:
    for name in agent_runtime.__all__:
        value = getattr(agent_runtime, name)
        if name not in ("__version__", "AgentEvent"):  # AgentEvent is a union of the event classes
            assert value.__name__ == name, name  # the object itself, not a module or a re-wrapped copy


def test_importing_the_package_loads_neither_torch_nor_the_mcp_sdk() -> None:
    script = "import sys, agent_runtime; print(sorted(m for m in ('torch', 'mcp', 'pydantic') if m in sys.modules))"
    out = subprocess.run(
        [PYTHON, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == "[]"


def test_unknown_names_are_attribute_errors() -> None:
    try:
        agent_runtime.NoSuchThing  # noqa: B018 - the access is the test
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def test_resource_and_prompt_names_load_neither_torch_nor_the_mcp_sdk() -> None:
    names = "ResourceEntry, ResourceSubscription, UnknownResource, UnknownPrompt, PromptArgumentError, ContextError"
    script = (
        f"import sys; from agent_runtime import {names}; "
        "print(sorted(m for m in ('torch', 'mcp', 'mcp_types') if m in sys.modules))"
    )
    out = subprocess.run(
        [PYTHON, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == "[]"
