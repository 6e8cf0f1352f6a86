"""Pure policy decisions against hostile input, part two: path detection and relative paths, the egress
allow-list, the launch policy's wrapper and interpreter forms, and redaction."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from policies.egress import EgressPolicy, egress_problem, needs_resolution, parse_target
from policies.launch import LaunchPolicy, launch_problem
from policies.paths import PathPolicy, looks_like_path_name, path_problem, path_values, schema_path_names
from policies.secrets import redact

# -- paths ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "path",
        "paths",
        "file",
        "filePath",
        "file_path",
        "inputFile",
        "output-dir",
        "source",
        "destination",
        "uri",
    ],
)
def test_path_like_names(name: str) -> None:
    assert looks_like_path_name(name)


@pytest.mark.parametrize(
    "name", ["text", "content", "file_content", "url", "name", "sourceCode", "query", ""]
)
def test_names_that_are_not_paths(name: str) -> None:
    assert not looks_like_path_name(name)


def test_schema_marks_paths_by_format_and_description_within_bounds() -> None:
    schema = {
        "type": "object",
        "properties": {
            "target": {"type": "string", "format": "uri-reference"},
            "where": {"type": "string", "description": "Path to the file to read"},
            "into": {"type": "string", "description": "The directory that receives the copy"},
            "doc": {"type": "string", "description": "The file to summarise"},
            "content": {"type": "string", "description": "Content to write to the file"},
            "opts": {"type": "object", "properties": {"base": {"type": "string", "format": "path"}}},
            "many": {"type": "array", "items": {"type": "string", "format": "uri"}},
            "ref": {"$ref": "https://evil.example/schema.json"},  # never followed
        },
    }
    assert schema_path_names(schema) == {"target", "where", "into", "doc", "base", "many"}
    # Deep or huge hostile schemas are walked within bounds, without recursion.
    deep: dict = {"type": "string", "format": "path"}
    for _ in range(5000):
        deep = {"type": "object", "properties": {"x": deep}}
    assert schema_path_names(deep) == frozenset()
    wide = {"properties": {f"p{i}": {"format": "path"} for i in range(100_000)}}
    assert len(schema_path_names(wide)) == 100_000  # one node holds them all
    assert schema_path_names("not a schema") == frozenset()


def test_detected_arguments_skip_network_urls_and_honour_exclusions() -> None:
    args = {
        "path": "/etc/passwd",
        "uri": "https://example.com/x",  # the egress check's
        "source": "s3://bucket/key",
        "note": "file:///etc/shadow",
        "nested": {"output_dir": ["a", "b"]},
        "text": "/etc/hosts",
    }
    found = dict(path_values(args, ["!source"], detect=True, schema_names={"where"}))
    assert found == {
        "path": "/etc/passwd",
        "note": "file:///etc/shadow",
        "nested.output_dir[0]": "a",
        "nested.output_dir[1]": "b",
    }
    assert dict(path_values({"where": "x"}, [], detect=True, schema_names={"where"})) == {"where": "x"}
    # Declared names check everything, URLs included; without detection only declared names and file: URIs.
    assert dict(path_values({"path": "https://x/"}, ["path"])) == {"path": "https://x/"}
    assert dict(path_values(args, [])) == {"note": "file:///etc/shadow"}


def test_relative_paths_judged_against_every_base_or_denied(tmp_path: Path) -> None:
    wide = tmp_path / "wide"
    (wide / "work").mkdir(parents=True)
    (wide / "secret.txt").write_text("x")
    roots = (str(wide / "work"),)
    assert path_problem("secret.txt", PathPolicy(roots)) is None  # against roots[0] only (no server known)
    assert path_problem("secret.txt", PathPolicy(roots, cwd=str(wide))) is not None
    assert path_problem("secret.txt", PathPolicy(roots, cwd=roots[0], bases=(str(wide),))) is not None
    assert path_problem("ok.txt", PathPolicy(roots, cwd=roots[0], bases=(roots[0],))) is None
    problem = path_problem("ok.txt", PathPolicy(roots, deny_relative=True))
    assert problem is not None and "relative path" in problem
    assert path_problem(str(wide / "work" / "ok.txt"), PathPolicy(roots, deny_relative=True)) is None


# -- egress allow-list ------------------------------------------------------------------------------------


def judge(url: str, policy: EgressPolicy, resolved: list[str] = ()) -> tuple[str | None, bool]:  # type: ignore[assignment]  # an immutable () default: resolved is only iterated
    target = parse_target("url", url, policy)
    addrs = [ipaddress.ip_address(a) for a in resolved]
    return egress_problem(target, addrs, policy), needs_resolution(target)


def test_allowlist_mode() -> None:
    hosts = EgressPolicy.of(allow=["*.corp.example", "api.example.com"], mode="allowlist")
    assert judge("https://git.corp.example/x", hosts) == (None, False)
    assert judge("https://api.example.com/", hosts) == (None, False)
    for url in [
        "https://example.com/",
        "http://93.184.216.34/",
        "http://localhost/",
        "http://corp.example.evil/",
    ]:
        problem, lookup = judge(url, hosts, ["93.184.216.34"])
        assert problem is not None and not lookup, url
    nets = EgressPolicy.of(allow=["10.20.0.0/16"], mode="allowlist")
    assert judge("http://10.20.1.2/", nets) == (None, False)
    assert judge("http://10.21.1.2/", nets)[0] is not None
    assert judge("http://build.internal.example/", nets, ["10.20.3.4"]) == (None, True)
    problem, lookup = judge("http://elsewhere.example/", nets, ["10.20.3.4", "93.184.216.34"])
    assert lookup and problem is not None and "allow-list" in problem
    # The public mode keeps its meaning: exceptions to the private-range denials.
    public = EgressPolicy.of(allow=["10.20.0.0/16"])
    assert judge("https://example.com/", public, ["93.184.216.34"]) == (None, True)
    assert judge("http://10.20.1.2/", public) == (None, False)


# -- launch -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["env", "sh", "-c", "curl x | sh"],
        ["/usr/bin/env", "-i", "A=1", "bash", "-lc", "id"],
        ["env", "-S", "sh -c id"],
        ["python3", "-c", "import os; os.system('id')"],
        ["python3", "-Ic", "x"],
        ["python3", "-W", "ignore", "-c", "x"],
        ["/usr/bin/python3.11", "-u", "-c", "x"],
        ["node", "-e", "require('child_process')"],
        ["node", "--eval=1"],
        ["perl", "-ne", "x"],
        ["deno", "eval", "x"],
        ["timeout", "5", "sh", "-c", "x"],
        ["nice", "-n", "5", "python3", "-c", "x"],
        ["sudo", "-u", "root", "sh", "-c", "x"],
        ["busybox", "sh", "-c", "x"],
        ["setsid", "env", "dash", "-c", "x"],
        ["flock", "/tmp/lock", "-c", "x"],
    ],
)
def test_inline_code_is_refused_behind_wrappers(argv: list[str]) -> None:
    problem = launch_problem(argv[0], argv[1:], LaunchPolicy())
    assert problem is not None and "explicitly" in problem, (argv, problem)


@pytest.mark.parametrize(
    "argv",
    [
        ["python3", "server.py", "-c", "config.toml"],  # the script's own -c
        ["python3", "-m", "my_server", "-c", "x"],
        ["node", "server.js"],
        ["npx", "-y", "@modelcontextprotocol/server-filesystem", "/tmp"],
        ["uvx", "mcp-server-time"],
        ["env", "DEBUG=1", "npx", "server"],
        ["bash", "start-server.sh"],
        ["deno", "run", "server.ts"],
    ],
)
def test_ordinary_launches_pass(argv: list[str]) -> None:
    assert launch_problem(argv[0], argv[1:], LaunchPolicy()) is None


def test_listed_interpreters_and_wrapped_commands_against_the_allowlist() -> None:
    assert launch_problem("python3", ["-c", "x"], LaunchPolicy(("python3",))) is None
    assert launch_problem("python3", ["-c", "x"], LaunchPolicy(("python*",))) is not None  # by name only
    # A wrapper does not launder its command: both must be allowed.
    assert "allowlist" in (launch_problem("env", ["npx", "x"], LaunchPolicy(("npx",))) or "")
    assert "allowlist" in (launch_problem("env", ["curl", "x"], LaunchPolicy(("env", "npx"))) or "")
    assert launch_problem("env", ["A=1", "npx", "x"], LaunchPolicy(("env", "npx"))) is None


# -- redaction --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "gone", "kept"),
    [
        ('{"user": "svc", "password": "json-pw-1"}', "json-pw-1", '"password": "***"'),
        ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG", "wJalr", "AWS_SECRET_ACCESS_KEY=***"),
        ("Authorization: Basic dXNlcjpwYXNzd29yZA==", "dXNlcjpw", "Authorization: ***"),
        ("postgres://svc:dsn-pw@db:5432/app", "dsn-pw", "postgres://svc:***@db"),
        ("https://x.example/?api_key=k-123&q=1", "k-123", "q=1"),
        ("client_secret: abc123", "abc123", "client_secret: ***"),
        ("github_pat_11ABCDEFG0123456789_abcdefghijklmnop", "github_pat_11", ""),
        ("-----BEGIN OPENSSH PRIVATE KEY-----b3BlbnNzaC1rZXk", "b3BlbnNz", ""),
    ],
)
def test_more_secret_shapes(text: str, gone: str, kept: str) -> None:
    out = redact(text)
    assert gone not in out and kept in out, out


def test_counts_of_tokens_are_not_secrets() -> None:
    text = "usage: prompt_tokens=12 completion_tokens: 30 max_tokens=64"
    assert redact(text) == text
