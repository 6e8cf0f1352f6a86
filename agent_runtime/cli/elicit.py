"""The terminal's answer to a server's elicitation: a form asked field by field (rich), each answer checked
against the requested schema and asked again when it does not fit; a URL shown and opened only with consent.

Without a terminal it declines: non-interactive runs never block on a question nobody can see.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import anyio

from agent_runtime.tools.client_features import ElicitationAnswer, ElicitationHandler, ElicitationRequest
from policies.elicitation import AnswerInvalid, FormField, parse_text, validate_answer

MAX_TRIES = 5  # answers to one field that do not fit before the form is cancelled


class _Ended(Exception):
    """The person closed the input (EOF): the form is cancelled."""


def terminal_elicitor(
    *, stream: Any = None, console: Any = None, opener: Callable[[str], Any] | None = None
) -> ElicitationHandler:
    """Ask on the terminal (`stream`: stdin by default; `console`: a rich Console on stderr by default)."""

    one_at_a_time = anyio.Lock()  # two servers asking at once must not interleave their prompts

    async def ask(request: ElicitationRequest) -> ElicitationAnswer:
        stdin = stream or sys.stdin
        if not stdin.isatty():
            return ElicitationAnswer("decline", reason="no terminal to ask on")
        async with one_at_a_time:
            return await anyio.to_thread.run_sync(
                _ask, request, stdin, console, opener or _open_in_browser, abandon_on_cancel=True
            )

    return ask


def _open_in_browser(url: str) -> None:
    import webbrowser  # only when the person said yes to opening a URL

    webbrowser.open(url)


def _ask(
    request: ElicitationRequest, stdin: Any, console: Any, opener: Callable[[str], Any]
) -> ElicitationAnswer:
    from rich.console import Console  # the terminal UI: only when a server actually asks
    from rich.markup import escape

    con = console or Console(stderr=True)

    def read(prompt: str, *, secret: bool = False) -> str:
        # Prompts are plain text: "[y/n]" must not be read as rich markup.
        line = con.input(escape(prompt), password=secret, stream=None if secret else stdin)
        if not secret and not line:
            raise _Ended
        return str(line).rstrip("\n")

    con.print(f"\n[bold]{escape(request.server)}[/] asks: {escape(request.message)}")
    try:
        if request.mode == "url":
            url = request.url or ""
            host = urlsplit(url).hostname or "?"
            con.print(f"  it wants you to open [bold yellow]{escape(host)}[/]: {escape(url)}")
            answer = read("open it in your browser? [y/N] ").strip().lower()
            if answer not in ("y", "yes"):
                return ElicitationAnswer("decline")
            opener(url)
            return ElicitationAnswer("accept")
        choice = read("answer? [y]es / [n]o / [c]ancel (default no) ").strip().lower()
        if choice in ("c", "cancel"):
            return ElicitationAnswer("cancel")
        if choice not in ("y", "yes"):
            return ElicitationAnswer("decline")
        assert request.form is not None
        content: dict[str, Any] = {}
        for field in request.form.fields:
            value = _field(field, read, con, escape)
            if value is not None:
                content[field.name] = value
        return ElicitationAnswer("accept", validate_answer(request.form, content))
    except (_Ended, AnswerInvalid):
        return ElicitationAnswer("cancel")


def _field(field: FormField, read: Callable[..., str], con: Any, escape: Callable[[str], str]) -> Any:
    """One field's value (None when left empty and optional); asked again while it does not fit."""
    label = field.title + ("" if field.required else " (optional)")
    if field.description:
        con.print(f"  [dim]{escape(field.description)}[/]")
    if field.choices:
        for i, (value, title) in enumerate(zip(field.choices, field.choice_titles, strict=False), 1):
            shown = title if title == value else f"{title} ({value})"
            con.print(f"    {i}. {escape(shown)}")
        if field.kind == "multi":
            label += ", several separated by commas"
    if field.kind == "boolean":
        label += " [y/n]"
    if field.default is not None:
        label += f" [{field.default}]"
    for _ in range(MAX_TRIES):
        text = read(f"  {label}: ", secret=field.secret)
        if not text.strip():
            if field.default is not None:
                return field.default
            if not field.required:
                return None
            con.print(f"  [red]{escape(field.title)} is required[/]")
            continue
        try:
            return parse_text(field, text)
        except AnswerInvalid as exc:
            con.print(f"  [red]{escape(exc.reason)}[/]")
    raise AnswerInvalid(f"no valid answer for {field.name} in {MAX_TRIES} tries")
