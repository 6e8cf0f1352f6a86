"""structlog setup: JSON lines when stderr is not a terminal, readable console output when it is.

structlog is imported only when something is actually logged (its package imports rich, ~0.1 s): the
CLI's cold start and the tool-call path pay nothing for records below the configured level.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

from policies.secrets import redact_fields

DEBUG, INFO, WARNING, ERROR, CRITICAL = 10, 20, 30, 40, 50  # the stdlib's numbers, as structlog uses
_LEVELS = {"notset": 0, "debug": DEBUG, "info": INFO, "warning": WARNING, "warn": WARNING, "error": ERROR}
_LEVELS |= {"critical": CRITICAL, "fatal": CRITICAL}


def redact_event(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A structlog processor: values under secret-looking keys masked, the secrets of every loaded config
    (`register_secrets`) and secret-shaped strings redacted."""
    return redact_fields(event, _known_secrets)


# The secret values of every config a runtime in this process was built from (longest first), so that log
# records from any module -- transports included, which know nothing of configs -- are redacted with them.
_known_secrets: tuple[str, ...] = ()


def register_secrets(values: Iterable[str]) -> None:
    """Add secret values (tokens, keys, passwords of a config) that every log record must not show."""
    global _known_secrets
    merged = set(_known_secrets) | {v for v in values if v}
    if len(merged) != len(_known_secrets):
        _known_secrets = tuple(sorted(merged, key=len, reverse=True))


@dataclass(slots=True)
class _Settings:
    level: int
    json: bool
    stream: Any  # stderr as it was when configure_logging ran


# What configure_logging asked for, applied to structlog as soon as structlog is imported (by anyone).
_settings: _Settings | None = None
_hook_installed = False


def configure_logging(level: str = "warning", *, json: bool | None = None) -> None:
    """Route structlog to stderr (stdout may carry JSON-RPC or results); idempotent.

    When structlog is not imported yet, the settings are applied the moment it is (an import hook), so
    modules that use structlog directly log the same way, and a process that never logs never imports it.
    """
    global _settings
    try:
        numeric = _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}: use debug, info, warning or error") from None
    _settings = _Settings(numeric, (not sys.stderr.isatty()) if json is None else json, sys.stderr)
    if "structlog" in sys.modules:
        _apply(_settings)
    else:
        _install_import_hook()


def enabled_for(level: int) -> bool:
    """Whether a record at `level` passes the level configure_logging set (always True before it is
    called: structlog's defaults log everything). Lets hot paths skip building what they would log."""
    s = _settings
    return s is None or level >= s.level


def _apply(settings: _Settings) -> None:
    import structlog

    renderer: Any = structlog.processors.JSONRenderer() if settings.json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info,  # tracebacks as text, so that they are redacted too
            redact_event,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(settings.level),
        logger_factory=structlog.PrintLoggerFactory(file=settings.stream),
        cache_logger_on_first_use=False,
    )


class _ConfigureOnImport:
    """A one-shot meta path finder: lets the normal finders locate structlog, then configures it right
    after its package has executed, before the importer gets it back."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "structlog":
            return None
        global _hook_installed
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        _hook_installed = False
        import importlib.util

        spec = importlib.util.find_spec(fullname)
        loader = getattr(spec, "loader", None)
        exec_module = getattr(loader, "exec_module", None)
        if spec is None or exec_module is None:
            return spec

        def exec_and_configure(module: Any) -> None:
            exec_module(module)
            if _settings is not None:
                _apply(_settings)

        loader.exec_module = exec_and_configure  # type: ignore[union-attr]  # this spec's own loader
        return spec


def _install_import_hook() -> None:
    global _hook_installed
    if not _hook_installed:
        sys.meta_path.insert(0, _ConfigureOnImport())
        _hook_installed = True


class Logger:
    """`structlog.get_logger(name)`, resolved on each record that passes the configured level.

    A record below the level configure_logging set returns at once (no structlog import, no per-call
    bind: the call path logs at debug and must not pay for it); every other record goes through
    structlog's current configuration, exactly as its lazy proxy would. A process that calls
    configure_logging leaves the level of these loggers to it.
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def _emit(self, level: int, method: str, event: str, kw: dict[str, Any]) -> None:
        s = _settings
        if s is not None and level < s.level:
            return
        import structlog

        getattr(structlog.get_logger(self.name), method)(event, **kw)

    def debug(self, event: str, **kw: Any) -> None:
        self._emit(DEBUG, "debug", event, kw)

    def info(self, event: str, **kw: Any) -> None:
        self._emit(INFO, "info", event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._emit(WARNING, "warning", event, kw)

    def error(self, event: str, **kw: Any) -> None:
        self._emit(ERROR, "error", event, kw)

    def critical(self, event: str, **kw: Any) -> None:
        self._emit(CRITICAL, "critical", event, kw)

    def exception(self, event: str, **kw: Any) -> None:
        self._emit(ERROR, "exception", event, kw)

    def is_enabled_for(self, level: int) -> bool:
        return enabled_for(level)


def get_logger(name: str) -> Logger:
    return Logger(name)
