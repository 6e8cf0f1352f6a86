"""Resources, templates, prompts, completion and subscriptions on a `Connection`: our SDK server in both eras,
server-everything over stdio, and the bad inputs (cursor loops, oversized contents, missing capabilities)."""

from __future__ import annotations

import base64

import anyio
import mcp_types as types
import pytest

from tests.conftest import EXAMPLES, PYTHON
from tests.transports.conftest import EVERYTHING, needs_everything
from transports import StdioTarget, connect
from transports.connection import PAGE_CAP
from transports.errors import CapabilityMissing, ResourceTooLarge, ServerRequestError

pytestmark = pytest.mark.anyio

SERVER = str(EXAMPLES / "servers" / "resources_server.py")


def target(*flags: str) -> StdioTarget:
    return StdioTarget(command=PYTHON, args=(SERVER, *flags))


@pytest.mark.parametrize("flags", [("--legacy",), ()], ids=["2025-11-25", "2026-07-28"])
async def test_lists_reads_prompts_and_completion_in_both_eras(flags: tuple[str, ...]) -> None:
    async with connect(target("--page-size", "2", *flags), startup_timeout=20) as conn:
        assert conn.protocol_version.startswith("2025" if flags else "2026")
        uris = [r.uri for r in await conn.list_resources(timeout=10)]
        assert uris == ["note://1", "note://2", "note://3", "note://blob"]  # two pages followed to the end
        templates = await conn.list_resource_templates(timeout=10)
        assert [t.uri_template for t in templates] == ["note://{id}"]
        text = (await conn.read_resource("note://2", timeout=10)).contents[0]
        assert isinstance(text, types.TextResourceContents) and text.text == "note 2: the launch code is 2222"
        blob = (await conn.read_resource("note://blob", timeout=10)).contents[0]
        assert isinstance(blob, types.BlobResourceContents) and base64.b64decode(blob.blob) == bytes(
            range(256)
        )
        assert [p.name for p in await conn.list_prompts(timeout=10)] == ["greet", "review"]
        prompt = await conn.get_prompt("greet", {"name": "Ada", "style": "formal"}, timeout=10)
        first = prompt.messages[0].content
        assert isinstance(first, types.TextContent) and first.text == "Write a formal greeting for Ada."
        done = await conn.complete(
            types.PromptReference(name="greet"), {"name": "name", "value": "A"}, timeout=10
        )
        assert done.completion.values == ["Ada", "Alan"]


async def test_unknown_resource_is_a_typed_server_error() -> None:
    async with connect(target("--legacy"), startup_timeout=20) as conn:
        with pytest.raises(ServerRequestError, match="no resource note://nope"):
            await conn.read_resource("note://nope", timeout=10)


@pytest.mark.parametrize("loop", ["repeat", "forever"])
async def test_a_listing_that_never_ends_is_cut(loop: str) -> None:
    async with connect(target("--legacy", "--cursor-loop", loop), startup_timeout=20) as conn:
        expected = "repeated cursor 'again'" if loop == "repeat" else f"did not end within {PAGE_CAP} pages"
        with pytest.raises(ServerRequestError, match=expected):
            await conn.list_resources(timeout=30)
        # The session survives the broken listing.
        assert (await conn.read_resource("note://1", timeout=10)).contents


async def test_oversized_resource_is_refused_not_kept() -> None:
    async with connect(target("--legacy", "--big-bytes", "200000"), startup_timeout=20) as conn:
        with pytest.raises(ResourceTooLarge, match="200000 bytes of contents exceed the limit of 100000"):
            await conn.read_resource("note://big", timeout=10, max_bytes=100_000)
        assert len((await conn.read_resource("note://big", timeout=10)).contents[0].text) == 200_000  # type: ignore[union-attr]  # a text resource


async def test_a_server_without_the_capabilities_is_refused_before_sending() -> None:
    async with connect(target("--tools-only"), startup_timeout=20) as conn:
        for call in (
            conn.list_resources(timeout=5),
            conn.read_resource("note://1", timeout=5),
            conn.list_prompts(timeout=5),
            conn.get_prompt("greet", {"name": "x"}, timeout=5),
            conn.complete(types.PromptReference(name="greet"), {"name": "name", "value": ""}, timeout=5),
            conn.subscribe_resource("note://1", timeout=5),
        ):
            with pytest.raises(CapabilityMissing, match="does not offer"):
                await call


async def test_modern_subscriptions_ride_a_listen_stream() -> None:
    updates: list[str] = []
    arrived = anyio.Event()

    async def handler(message: object) -> None:
        nonlocal arrived
        if isinstance(message, types.ResourceUpdatedNotification):
            updates.append(str(message.params.uri))
            arrived.set()

    async with connect(target(), startup_timeout=20, message_handler=handler) as conn:
        assert conn.protocol_version == "2026-07-28"
        await conn.subscribe_resource("note://1", timeout=10)  # returns once the server acknowledged it
        assert conn.listen_honored == {"note://1"}
        await conn.call_tool("touch", {"uri": "note://1"}, timeout=10)
        with anyio.fail_after(10):
            await arrived.wait()
        arrived = anyio.Event()
        await conn.unsubscribe_resource("note://1", timeout=10)
        await conn.subscribe_resource("note://2", timeout=10)  # the stream re-opens with note://2 only
        assert conn.listen_honored == {"note://2"}
        await conn.call_tool("touch", {"uri": "note://1"}, timeout=10)  # filtered out by the server
        await conn.call_tool("touch", {"uri": "note://2"}, timeout=10)
        with anyio.fail_after(10):
            await arrived.wait()
        assert updates == ["note://1", "note://2"]


async def test_legacy_subscription_delivers_updates() -> None:
    updates: list[str] = []
    got = anyio.Event()

    async def handler(message: object) -> None:
        if isinstance(message, types.ResourceUpdatedNotification):
            updates.append(str(message.params.uri))
            got.set()

    async with connect(target("--legacy"), startup_timeout=20, message_handler=handler) as conn:
        await conn.subscribe_resource("note://1", timeout=10)
        result = await conn.call_tool("touch", {"uri": "note://1"}, timeout=10)
        assert result.content[0].text == "sent 1"  # type: ignore[union-attr]  # a text block
        with anyio.fail_after(10):
            await got.wait()
        assert updates == ["note://1"]
        await conn.unsubscribe_resource("note://1", timeout=10)
        result = await conn.call_tool("touch", {"uri": "note://1"}, timeout=10)
        assert result.content[0].text == "sent 0"  # type: ignore[union-attr]  # a text block


@needs_everything
async def test_everything_resources_prompts_completion_and_subscription() -> None:
    updated = anyio.Event()

    async def handler(message: object) -> None:
        if isinstance(message, types.ResourceUpdatedNotification):
            updated.set()

    target = StdioTarget(command="node", args=(str(EVERYTHING), "stdio"))
    async with connect(target, startup_timeout=30, message_handler=handler) as conn:
        resources = await conn.list_resources(timeout=15)
        assert any(r.uri.startswith("demo://resource/static/document/") for r in resources)
        templates = {t.uri_template for t in await conn.list_resource_templates(timeout=15)}
        assert "demo://resource/dynamic/text/{resourceId}" in templates
        read = await conn.read_resource("demo://resource/dynamic/text/7", timeout=15)
        assert read.contents[0].text.startswith("Resource 7:")  # type: ignore[union-attr]  # a text resource
        prompt = await conn.get_prompt("args-prompt", {"city": "Oslo"}, timeout=15)
        assert prompt.messages[0].content.text == "What's weather in Oslo?"  # type: ignore[union-attr]  # text
        done = await conn.complete(
            types.PromptReference(name="completable-prompt"),
            {"name": "name", "value": "A"},
            {"department": "Engineering"},
            timeout=15,
        )
        assert done.completion.values == ["Alice"]
        await conn.subscribe_resource("demo://resource/dynamic/text/1", timeout=15)
        await conn.call_tool("toggle-subscriber-updates", {}, timeout=15)  # sends one update at once
        with anyio.fail_after(10):
            await updated.wait()
