"""An MCP server (stdio) with resources, resource templates, prompts, completion and subscriptions, for tests.

    python examples/servers/resources_server.py [--legacy] [--page-size N] [--cursor-loop repeat|forever]
        [--big-bytes N] [--tools-only]

Resources: `note://1` .. `note://3` (text), `note://blob` (bytes), `note://big` (N bytes of text, with
--big-bytes), `note://slow` (unlisted; a read that never answers). Template `note://{id}`. Prompts: `greet(name, style?)` and `review(topic)`. Completion: the
`name` argument of `greet` and the `id` of the template. Tools: `add_note(text)` (a new resource, then
resources/list_changed), `touch(uri)` (resources/updated when subscribed: by resources/subscribe, or on a
2026-07-28 subscriptions/listen stream), `flood(uri, n)` (n updates at once).
--legacy refuses server/discover, so clients fall back to the 2025-11-25 handshake
(where resources/subscribe and unsolicited list_changed live). --tools-only offers tools and nothing else.
"""

from __future__ import annotations

import argparse
import base64
from typing import Any

import anyio
import mcp_types as types
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage
from mcp.shared.subscriptions import ResourcesListChanged, ResourceUpdated

BLOB = bytes(range(256))
PROMPTS = [
    types.Prompt(
        name="greet",
        description="Greet someone",
        arguments=[
            types.PromptArgument(name="name", description="who to greet", required=True),
            types.PromptArgument(name="style", description="formal or casual", required=False),
        ],
    ),
    types.Prompt(
        name="review",
        description="Review a topic",
        arguments=[types.PromptArgument(name="topic", required=True)],
    ),
]
NAMES = ["Ada", "Alan", "Barbara", "Grace"]


def build(args: argparse.Namespace) -> Server[Any]:
    notes: dict[str, str] = {f"note://{i}": f"note {i}: the launch code is {i * 1111}" for i in (1, 2, 3)}
    if args.big_bytes:
        notes["note://big"] = "x" * args.big_bytes
    subscribed: set[str] = set()  # 2025-era resources/subscribe
    bus = InMemorySubscriptionBus()  # 2026-07-28: events go to the subscriptions/listen streams that asked

    def resource_list() -> list[types.Resource]:
        found = [types.Resource(uri=u, name=u.removeprefix("note://"), mime_type="text/plain") for u in notes]
        found.append(types.Resource(uri="note://blob", name="blob", mime_type="application/octet-stream"))
        return found

    async def list_resources(
        ctx: Any, params: types.PaginatedRequestParams | None
    ) -> types.ListResourcesResult:
        cursor = params.cursor if params is not None else None
        if args.cursor_loop == "repeat":
            return types.ListResourcesResult(resources=resource_list()[:1], next_cursor="again")
        if args.cursor_loop == "forever":
            n = int(cursor or "0") + 1
            return types.ListResourcesResult(resources=[], next_cursor=str(n))
        everything = resource_list()
        if not args.page_size:
            return types.ListResourcesResult(resources=everything)
        start = int(cursor or "0")
        end = start + args.page_size
        return types.ListResourcesResult(
            resources=everything[start:end], next_cursor=str(end) if end < len(everything) else None
        )

    async def list_templates(
        ctx: Any, params: types.PaginatedRequestParams | None
    ) -> types.ListResourceTemplatesResult:
        template = types.ResourceTemplate(uri_template="note://{id}", name="note", mime_type="text/plain")
        return types.ListResourceTemplatesResult(resource_templates=[template])

    async def read_resource(ctx: Any, params: types.ReadResourceRequestParams) -> types.ReadResourceResult:
        uri = str(params.uri)
        if uri == "note://slow":  # never answers in time: the client's deadline must end the read
            await anyio.sleep(3600)
        if uri == "note://blob":
            blob = base64.b64encode(BLOB).decode()
            contents: list[Any] = [
                types.BlobResourceContents(uri=uri, blob=blob, mime_type="application/octet-stream")
            ]
            return types.ReadResourceResult(contents=contents)
        if uri not in notes:
            raise MCPError(types.INVALID_PARAMS, f"no resource {uri}")
        return types.ReadResourceResult(
            contents=[types.TextResourceContents(uri=uri, text=notes[uri], mime_type="text/plain")]
        )

    async def subscribe(ctx: Any, params: types.SubscribeRequestParams) -> types.EmptyResult:
        subscribed.add(str(params.uri))
        return types.EmptyResult()

    async def unsubscribe(ctx: Any, params: types.UnsubscribeRequestParams) -> types.EmptyResult:
        subscribed.discard(str(params.uri))
        return types.EmptyResult()

    async def list_prompts(ctx: Any, params: types.PaginatedRequestParams | None) -> types.ListPromptsResult:
        return types.ListPromptsResult(prompts=PROMPTS)

    async def get_prompt(ctx: Any, params: types.GetPromptRequestParams) -> types.GetPromptResult:
        given = params.arguments or {}
        if params.name == "greet":
            style = given.get("style", "casual")
            return types.GetPromptResult(
                description="a greeting",
                messages=[
                    types.PromptMessage(
                        role="user",
                        content=types.TextContent(text=f"Write a {style} greeting for {given['name']}."),
                    ),
                    types.PromptMessage(role="assistant", content=types.TextContent(text="Of course.")),
                ],
            )
        if params.name == "review":
            return types.GetPromptResult(
                messages=[
                    types.PromptMessage(
                        role="user", content=types.TextContent(text=f"Review {given['topic']}.")
                    )
                ]
            )
        raise MCPError(types.INVALID_PARAMS, f"no prompt {params.name}")

    async def complete(ctx: Any, params: types.CompleteRequestParams) -> types.CompleteResult:
        value = params.argument.value
        if isinstance(params.ref, types.PromptReference) and params.argument.name == "name":
            values = [n for n in NAMES if n.startswith(value)]
        else:
            values = [u.removeprefix("note://") for u in notes if u.removeprefix("note://").startswith(value)]
        return types.CompleteResult(completion=types.Completion(values=values, total=len(values)))

    async def list_tools(ctx: Any, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        obj = {"type": "object"}
        return types.ListToolsResult(
            tools=[
                types.Tool(name="add_note", input_schema={**obj, "properties": {"text": {"type": "string"}}}),
                types.Tool(name="touch", input_schema={**obj, "properties": {"uri": {"type": "string"}}}),
                types.Tool(
                    name="flood",
                    input_schema={
                        **obj,
                        "properties": {"uri": {"type": "string"}, "n": {"type": "integer"}},
                    },
                ),
            ]
        )

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        a = params.arguments or {}
        if params.name == "add_note":
            uri = f"note://{len(notes) + 1}"
            notes[uri] = str(a.get("text", ""))
            await ctx.session.send_resource_list_changed()
            await bus.publish(ResourcesListChanged())
            return types.CallToolResult(content=[types.TextContent(text=uri)])
        if params.name in ("touch", "flood"):
            uri = str(a.get("uri", ""))
            sent = 0
            for _ in range(int(a.get("n", 1))):
                if uri in subscribed:
                    await ctx.session.send_resource_updated(uri)
                    sent += 1
                await bus.publish(ResourceUpdated(uri=uri))  # reaches only the listen streams naming `uri`
            return types.CallToolResult(content=[types.TextContent(text=f"sent {sent}")])
        raise MCPError(types.INVALID_PARAMS, f"no tool {params.name}")

    if args.tools_only:
        return Server("resources-demo", on_list_tools=list_tools, on_call_tool=call_tool)
    server: Server[Any] = Server(
        "resources-demo",
        on_list_resources=list_resources,
        on_list_resource_templates=list_templates,
        on_read_resource=read_resource,
        on_subscribe_resource=subscribe,
        on_unsubscribe_resource=unsubscribe,
        on_list_prompts=list_prompts,
        on_get_prompt=get_prompt,
        on_completion=complete,
        on_subscriptions_listen=ListenHandler(bus),
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )
    return server


async def main(args: argparse.Namespace) -> None:
    server = build(args)
    from mcp.server.lowlevel.server import NotificationOptions

    options = server.create_initialization_options(
        NotificationOptions(resources_changed=True, prompts_changed=True)
    )
    async with stdio_server() as (read, write):
        if not args.legacy:
            await server.run(read, write, options)
            return
        # The SDK's runner locks a connection to the modern era as soon as server/discover arrives, so a
        # legacy-only server answers it here, before the runner sees it, as a server without it would.
        send, receive = anyio.create_memory_object_stream[Any](16)

        async def pump() -> None:
            async with send:
                async for item in read:
                    message = getattr(item, "message", None)
                    if isinstance(message, types.JSONRPCRequest) and message.method == "server/discover":
                        error = types.ErrorData(code=types.METHOD_NOT_FOUND, message="Method not found")
                        await write.send(
                            SessionMessage(types.JSONRPCError(jsonrpc="2.0", id=message.id, error=error))
                        )
                        continue
                    await send.send(item)

        async with anyio.create_task_group() as tg:
            tg.start_soon(pump)
            await server.run(receive, write, options)
            tg.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--legacy", action="store_true")
    parser.add_argument("--page-size", type=int, default=0)
    parser.add_argument("--cursor-loop", choices=["repeat", "forever"])
    parser.add_argument("--big-bytes", type=int, default=0)
    parser.add_argument("--tools-only", action="store_true")
    anyio.run(main, parser.parse_args())
