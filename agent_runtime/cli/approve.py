"""`agent-runtime tools approve [TOOL|SERVER ...]`: show quarantined (new or changed) tool definitions with what
changed and any signs of poisoning, and pin them on confirmation (fails closed without a terminal)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from agent_runtime.cli.common import (
    add_server_source_arguments,
    config_from_args,
    open_runtime,
    run_with_signals,
)
from agent_runtime.config.policies import load_policies
from agent_runtime.tools.pins import PinStore, wire_definition
from policies.pinning import PinCheck, pinned_view, poisoning_signs

if TYPE_CHECKING:
    from agent_runtime.tools.registry import ToolEntry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "names", nargs="*", metavar="TOOL", help="namespaced tool names, or SERVER to approve all its tools"
    )
    parser.add_argument("--all", action="store_true", help="approve every quarantined tool")
    parser.add_argument("--yes", "-y", action="store_true", help="do not ask; approve what is selected")
    add_server_source_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Connect, show each quarantined (or named) tool with what changed and any poisoning signs, and pin
    it on confirmation. Exit 0 when nothing selected remains quarantined, 1 otherwise, 2 on errors."""
    config = config_from_args(args)
    policies = load_policies(config)
    store = PinStore.open(policies.lock_file, policies.pinning)
    if store.lock is None:
        print('pinning is off (policies.pinning = "off"): nothing to approve', file=sys.stderr)
        return 0

    async def main() -> int:
        async with open_runtime(config, args) as rt:
            entries = rt.tools()
        store.reload()  # the runtime may have pinned servers seen for the first time
        quarantined = [e for e in entries if store.check(e.server, e.definition).quarantined]
        if not args.names and not args.all:
            for entry in quarantined:
                _describe(entry, store.check(entry.server, entry.definition), store)
            if quarantined:
                print("\npass tool names (or a server name) or --all to approve", file=sys.stderr)
            else:
                print("no quarantined tools")
            return 1 if quarantined else 0
        selected = _select(entries, args.names) if args.names else quarantined
        if not selected:
            print("no quarantined tools" if not args.names else "no matching tools")
            return 0 if not args.names else 1
        remaining = 0
        for entry in selected:
            check = store.check(entry.server, entry.definition)
            _describe(entry, check, store)
            if args.yes or _confirm(f"approve {entry.name}?"):
                store.approve(entry.server, [entry.definition])
                print(f"approved {entry.name}")
            else:
                remaining += check.quarantined
        where = store.lock.path if store.lock else None
        print(f"lock file: {where or '(none: ad-hoc servers are pinned in memory, for this run only)'}")
        return 1 if remaining else 0

    return run_with_signals(main)


def _select(entries: list[ToolEntry], names: list[str]) -> list[ToolEntry]:
    wanted = set(names)
    return [e for e in entries if e.name in wanted or e.server in wanted]


def _describe(entry: ToolEntry, check: PinCheck, store: PinStore) -> None:
    print(f"\n{entry.name} (server {entry.server}): {check.status}")
    current = pinned_view(wire_definition(entry.definition))
    old = (store.lock.servers.get(entry.server, {}).get(entry.definition.name, {}) if store.lock else {}).get(
        "definition"
    )
    for key in check.changed:
        print(f"  {key}:")
        print(f"    approved: {json.dumps((old or {}).get(key), ensure_ascii=True)[:400]}")
        print(f"    now:      {json.dumps(current.get(key), ensure_ascii=True)[:400]}")
    if check.status == "new":
        print(f"  description: {json.dumps(current.get('description', ''), ensure_ascii=True)[:400]}")
    for sign in poisoning_signs(current):
        print(f"  WARNING: {sign}")


def _confirm(question: str) -> bool:
    """Fails closed: no terminal, EOF or anything but yes means no."""
    if not sys.stdin.isatty():
        print(f"{question} no (stdin is not a terminal; pass --yes to approve)", file=sys.stderr)
        return False
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")
