"""`agent-runtime adapters list | load NAME PATH | unload NAME [--url URL] [--api-key KEY]`: the LoRA adapters of a
running `agent-runtime serve`, loaded and unloaded without a restart (docs/adapters.md)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from agent_runtime.cli.common import API_KEY_ENV
from agent_runtime.errors import AgentRuntimeError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["list", "load", "unload"], help="what to do")
    parser.add_argument("name", nargs="?", help="the adapter's name (load, unload)")
    parser.add_argument("path", nargs="?", help="load: the PEFT adapter folder, on the server's disk")
    parser.add_argument(
        "--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)"
    )
    parser.add_argument("--api-key", default=None, help=f"the server's API key (default ${API_KEY_ENV})")


def run(args: argparse.Namespace) -> int:
    import httpx  # only this command needs an HTTP client

    if args.action != "list" and not args.name:
        raise AgentRuntimeError(f"`adapters {args.action}` needs an adapter name", "pass NAME")
    if args.action == "load" and not args.path:
        raise AgentRuntimeError("`adapters load` needs the adapter's folder", "pass NAME PATH")
    key = args.api_key or os.environ.get(API_KEY_ENV)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = args.url.rstrip("/")
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
            if args.action == "list":
                response = client.get("/v1/models")
            elif args.action == "load":
                path = os.path.abspath(args.path) if os.path.exists(args.path) else args.path
                response = client.post("/v1/adapters", json={"name": args.name, "path": path})
            else:
                response = client.delete(f"/v1/adapters/{args.name}")
    except httpx.HTTPError as exc:
        raise AgentRuntimeError(
            f"cannot reach {url}: {exc}", "is `agent-runtime serve` running there?"
        ) from None
    body: Any = (
        response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
    )
    if response.status_code != 200:
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
        raise AgentRuntimeError(
            f"{args.action} failed ({response.status_code}): {message or response.text[:200]}",
            "check the adapter name and path, and --api-key",
        )
    if args.action == "list":
        body = [m["id"] for m in body.get("data", []) if m.get("kind") == "adapter"]
    print(json.dumps(body, indent=2))
    return 0
