"""Agent evaluation suite: everyday tasks over real MCP servers, run by our agent on the local SmolLM2 and by a
peer (smolagents' ToolCallingAgent on the same weights), checked on the answer and on the state left behind.

    python -m benchmarks.agent_eval [--mode all|single|both] [--tasks N] [--filter TEXT] [--no-peer]
                                    [--max-steps 5] [--timeout 120] [--json PATH]

Each task starts from fresh fixtures (a folder of files, a git repository, a memory graph) in a temp dir, and
a plain Claude-Desktop config (`mcpServers` only: no agents section, no worked examples) over them:
`all` puts every server in one config (about 50 tools at once), `single` only the servers the task needs.
Per task it reports success (answer and state checks), tool-call accuracy (an expected tool called and its
arguments accepted by the server), steps, tokens, wall time, prefix-cache share and, for each failure, a
classified reason; then one totals row per agent and mode, with the ratio ours/peer. Benchmarks are not
tests: it always exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parent.parent
TASKS_FILE = Path(__file__).with_name("agent_tasks.json")
PEER_SCRIPT = Path(__file__).with_name("agent_eval_peer.py")
PEER_PYTHON = ROOT / ".venv-smolagents" / "bin" / "python"
NPM = ROOT / ".peers" / "node_modules" / "@modelcontextprotocol"
TIME_SERVER = ROOT / "tests" / "agent_runtime" / "fixed_clock_time_server.py"
SERVERS = ("time", "filesystem", "everything", "memory", "git")
TASK_KINDS = {t["id"]: t["kind"] for t in json.loads(TASKS_FILE.read_text(encoding="utf-8"))["tasks"]}
# A config with no server leaves an agent no tool at all: tasks that need none get this one as a distractor.
NO_TOOL_DISTRACTOR = ("time",)


# == Our runtime: every use of its API is in this section ===================================================


def ours_model_folder() -> Path:
    """The HF folder our loader converts the packaged SmolLM2 GGUF into: the peer loads the same weights."""
    from inference.loader import converted_gguf, smollm2_gguf_path

    return converted_gguf(smollm2_gguf_path())


@dataclass(slots=True)
class Ours:
    """What every task's runtime shares: one engine (not owned by the runtimes) and the routing encoder."""

    backend: Any
    embedder: Any


async def load_ours(dtype: str) -> Ours:
    """The shared backend: one engine, loaded once and reused by every task's runtime (not owned by them)."""
    from agent_runtime import LocalEngineBackend
    from agent_runtime.agents.routing import Embedder
    from agent_runtime.config.agents import ModelSettings
    from agent_runtime.logging import configure_logging

    configure_logging("error")  # the servers' stderr and tool errors are results here, not news

    loaded = await LocalEngineBackend.load(ModelSettings(dtype=dtype, device="cpu", max_num_seqs=8))
    embedder = await anyio.to_thread.run_sync(Embedder.installed)
    return Ours(LocalEngineBackend(loaded.engine, owns_engine=False), embedder)


async def close_ours(ours: Ours) -> None:
    await ours.backend.engine.aclose()


async def run_ours(
    ours: Ours, config: Path, text: str, *, max_steps: int, max_tokens: int, seconds: float
) -> RunRecord:
    """One task on our runtime: start the config's servers, run the default agent, return a neutral record."""
    from agent_runtime import AgentHost, Runtime

    started = time.perf_counter()
    try:
        with anyio.fail_after(seconds + 60):  # the agent's own timeout_secs should end it first
            async with (
                Runtime.from_config(config) as rt,
                AgentHost(rt, backend=ours.backend, embedder=ours.embedder) as host,
            ):
                host.examples = None  # every task from a cold start: nothing remembered from earlier tasks
                default = host.agents["default"]
                host.agents["default"] = default.model_copy(
                    update={"max_steps": max_steps, "max_tokens": max_tokens, "timeout_secs": seconds}
                )
                result = await host.agent("default").run(text)
    except TimeoutError:
        return RunRecord(
            stop_reason="timeout", wall_seconds=time.perf_counter() - started, error="hard timeout"
        )
    except Exception as exc:  # a harness or runtime failure is a result too, never the end of the suite
        return RunRecord(
            stop_reason="harness_error", wall_seconds=time.perf_counter() - started, error=repr(exc)[:300]
        )
    calls = [
        CallRecord(
            c.name.split("__", 1)[1] if c.server and "__" in c.name else c.name,
            dict(c.arguments),
            c.outcome,
            c.observation[:300],
        )
        for c in result.tool_calls
    ]
    return RunRecord(
        answer=result.answer,
        stop_reason=result.stop_reason,
        steps=result.usage.steps,
        prompt_tokens=result.usage.prompt_tokens,
        completion_tokens=result.usage.completion_tokens,
        wall_seconds=result.usage.wall_seconds,
        cached_tokens=result.usage.cached_tokens,
        calls=calls,
        parse_errors=sum(1 for s in result.steps if s.error and not s.tool_calls),
        error=result.detail,
        model_texts=[s.model_text[:300] for s in result.steps],
    )


# == Records ===================================================================================================


@dataclass(slots=True)
class CallRecord:
    name: str  # without the server prefix
    arguments: dict[str, Any]
    outcome: str  # `result` when the server accepted the call; else why not (tool_error, denied, ...)
    observation: str = ""


@dataclass(slots=True)
class RunRecord:
    """What one agent did on one task, the same shape for ours and the peer."""

    answer: str | None = None
    stop_reason: str | None = None  # None: answered; max_steps, max_tool_calls, timeout, model_error, ...
    steps: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_seconds: float = 0.0
    cached_tokens: int | None = None  # prompt tokens served from the prefix cache (None: not exposed)
    calls: list[CallRecord] = field(default_factory=list)
    parse_errors: int = 0
    error: str | None = None
    model_texts: list[str] = field(default_factory=list)  # each step's reply, cut to 300 characters

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunRecord:
        calls = [CallRecord(**c) for c in d.get("calls", [])]
        names = {f.name for f in dataclasses.fields(cls)} - {"calls"}
        return cls(**{k: v for k, v in d.items() if k in names}, calls=calls)


@dataclass(slots=True)
class Verdict:
    agent: str  # ours | peer
    mode: str  # all | single
    task: str
    success: bool
    answer_ok: bool | None  # None: the task has no answer check
    state_ok: bool | None  # None: the task has no state check
    tool_ok: bool | None  # None: the task needs no tool
    reason: str  # "" on success
    run: RunRecord


# == Tasks and checkers ========================================================================================


@dataclass(slots=True)
class Task:
    id: str
    kind: str
    text: str
    servers: list[str]
    tools: list[str]  # all needed; "a|b" accepts either
    answer: dict[str, Any] | None = None
    state: dict[str, Any] | None = None

    def render(self, fx: Fixtures) -> str:
        return self.text.replace("{files}", str(fx.files)).replace("{repo}", str(fx.repo))


def load_tasks(path: Path = TASKS_FILE) -> list[Task]:
    raw = json.loads(path.read_text(encoding="utf-8"))
    tasks = [Task(**t) for t in raw["tasks"]]
    ids = [t.id for t in tasks]
    dupes = sorted(i for i, n in Counter(ids).items() if n > 1)
    if dupes:
        raise ValueError(f"duplicate task ids: {dupes}")
    for t in tasks:
        unknown = set(t.servers) - set(SERVERS)
        if unknown:
            raise ValueError(f"task {t.id}: unknown servers {sorted(unknown)}")
        if t.answer is None and t.state is None:
            raise ValueError(f"task {t.id}: no answer or state checker")
    return tasks


_NUMBER = re.compile(r"(?<![\w.,/:-])-?\d[\d,]*(?:\.\d+)?(?![\w/:-]|\.\d)")


def numbers_in(text: str) -> list[float]:
    """Numbers written in `text` (1,234.5 and -25 included; digits inside words, dates and times are not)."""
    out: list[float] = []
    for m in _NUMBER.finditer(text):
        tok = m.group(0).rstrip(",").replace(",", "")
        try:
            out.append(float(tok))
        except ValueError:
            continue
    return out


def time_pattern(hhmm: str) -> re.Pattern[str]:
    """A clock time as people write it: 14:26, 14:26:53, 2:26 PM, 2:26pm; for whole hours also `2 pm`."""
    h, m = (int(x) for x in hhmm.split(":"))
    h12 = h % 12 or 12
    suffix = r"\s*(?:pm|p\.m\.)" if h >= 12 else r"\s*(?:am|a\.m\.)"
    forms = [rf"(?<!\d)0?{h}:{m:02d}(?!\d)" if h < 10 else rf"(?<!\d){h}:{m:02d}(?!\d)"]
    forms.append(rf"(?<!\d){h12}:{m:02d}{suffix}")
    if m == 0:
        forms.append(rf"(?<!\d){h12}{suffix}")
    return re.compile("|".join(forms), re.I)


def _contains(text: str, word: str) -> bool:
    return re.search(rf"(?<![^\W_]){re.escape(word)}", text, re.I) is not None


def check_text(spec: Mapping[str, Any], text: str | None) -> bool:
    """Every key of `spec` must hold: contains_all, contains_any, not_contains (case-insensitive, starting a
    word: "Ada" is not in the hash "bada624"), regex (case-insensitive search), number (+ tol: any number in the
    text within tol), time (HH:MM)."""
    if text is None:
        return False
    for key, want in spec.items():
        if key == "contains_all":
            ok = all(_contains(text, str(w)) for w in want)
        elif key == "contains_any":
            ok = any(_contains(text, str(w)) for w in want)
        elif key == "not_contains":
            ok = not any(_contains(text, str(w)) for w in want)
        elif key == "regex":
            ok = re.search(want, text, re.I) is not None
        elif key == "number":
            tol = float(spec.get("tol", 0.01))
            ok = any(math.isclose(n, float(want), abs_tol=tol) for n in numbers_in(text))
        elif key == "tol":
            continue
        elif key == "time":
            ok = time_pattern(want).search(text) is not None
        else:
            raise ValueError(f"unknown answer check {key!r}")
        if not ok:
            return False
    return True


_TEXT_KEYS = {"contains_all", "contains_any", "not_contains", "regex", "number", "tol", "time"}


def check_state(spec: Mapping[str, Any], fx: Fixtures) -> bool:
    """State checks on the fixtures after a run: a file (and its content), a folder, a file gone, the git HEAD
    message and tracked files, a git branch, a memory entity (and its observations and type)."""
    if "file" in spec:
        path = fx.files / spec["file"]
        if not path.is_file():
            return False
        body = {k: v for k, v in spec.items() if k in _TEXT_KEYS}
        if body and not check_text(body, path.read_text(encoding="utf-8", errors="replace")):
            return False
    if "dir" in spec and not (fx.files / spec["dir"]).is_dir():
        return False
    if "absent" in spec and (fx.files / spec["absent"]).exists():
        return False
    if "git_head_message" in spec:
        head = _git(fx.repo, "log", "-1", "--format=%s").lower()
        if head == GIT_HEAD_SUBJECT.lower() or not all(w.lower() in head for w in spec["git_head_message"]):
            return False
    if "git_tracked" in spec and spec["git_tracked"] not in _git(fx.repo, "ls-files").splitlines():
        return False
    if "git_branch" in spec and spec["git_branch"] not in _git(
        fx.repo, "branch", "--format=%(refname:short)"
    ):
        return False
    if "memory_entity" in spec:
        name = spec["memory_entity"].lower()
        entities = [e for e in read_memory(fx.memory) if name in str(e.get("name", "")).lower()]
        if not entities:
            return False
        if "entity_type" in spec and not any(
            str(e.get("entityType", "")).lower() == spec["entity_type"].lower() for e in entities
        ):
            return False
        if "observations_any" in spec:
            seen = " ".join(str(o).lower() for e in entities for o in e.get("observations", []))
            if not any(w.lower() in seen for w in spec["observations_any"]):
                return False
    return True


# == Fixtures and configs ======================================================================================

NOTES = """Team notes
The weekly sync moved to Thursday at 15:30 in room Orion.
The launch code name is BLUE HERON.
Remember to renew the domain before April 2.
"""
BUDGET = """item,category,amount
Laptop,hardware,1299.00
Monitor,hardware,329.50
Office chair,furniture,249.99
Software licence,software,480.00
Coffee beans,supplies,36.75
"""
TODO = """# To do
- [ ] email Priya about the invoice
- [x] book flights to Lisbon
- [ ] water the plants
"""
CONTACTS = [
    {"name": "Dana Whitfield", "phone": "+44 20 7946 0321", "city": "Leeds"},
    {"name": "Luis Ortega", "phone": "+34 912 345 678", "city": "Madrid"},
]
PROJECTS = {
    "alpha.txt": "Project Alpha: status green, owner Marta.\n",
    "beta.txt": "Project Beta: status amber, owner Kenji. Deadline 2026-05-01.\n",
}
MEMORY = [
    {
        "type": "entity",
        "name": "Priya",
        "entityType": "person",
        "observations": ["works at Acme Corp", "prefers email over phone", "birthday is 12 June"],
    },
    {"type": "entity", "name": "Acme Corp", "entityType": "company", "observations": ["based in Rotterdam"]},
    {"type": "relation", "from": "Priya", "to": "Acme Corp", "relationType": "works_at"},
]
# (author, date, message, files written before the commit)
GIT_HISTORY: list[tuple[str, str, str, dict[str, str]]] = [
    ("Ada Lovelace <ada@example.com>", "2026-01-05T10:00:00Z", "Initial commit",
     {"README.md": "# Weather station\n\nReads the sensors on the roof.\n"}),
    ("Grace Hopper <grace@example.com>", "2026-02-10T14:30:00Z", "Add sensor reader",
     {"sensor.py": "def read():\n    return 21.456\n"}),
    ("Grace Hopper <grace@example.com>", "2026-03-02T09:15:00Z", "Fix rounding in temperature display",
     {"sensor.py": "def read():\n    return round(21.456, 1)\n"}),
]  # fmt: skip
GIT_HEAD_SUBJECT = GIT_HISTORY[-1][2]


@dataclass(slots=True)
class Fixtures:
    root: Path

    @property
    def files(self) -> Path:
        return self.root / "files"

    @property
    def repo(self) -> Path:
        return self.root / "repo"

    @property
    def memory(self) -> Path:
        return self.root / "memory.jsonl"


def _git(repo: Path, *args: str, env: Mapping[str, str] | None = None) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), *args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "GIT_CONFIG_NOSYSTEM": "1", **(env or {})},
    )
    return done.stdout.strip()


def read_memory(path: Path) -> list[dict[str, Any]]:
    """The memory server's entities (its JSONL file: one entity or relation per line)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict) and item.get("type") == "entity":
            out.append(item)
    return out


def build_fixtures(root: Path) -> Fixtures:
    """Fresh state for one task: files/ (notes, a CSV, a to-do list, contacts, projects/), repo/ (three commits,
    a side branch, an unstaged change and an untracked file) and memory.jsonl (two entities, one relation)."""
    fx = Fixtures(root)
    (fx.files / "projects").mkdir(parents=True)
    (fx.files / "notes.txt").write_text(NOTES)
    (fx.files / "budget.csv").write_text(BUDGET)
    (fx.files / "todo.md").write_text(TODO)
    (fx.files / "contacts.json").write_text(json.dumps(CONTACTS, indent=2) + "\n")
    for name, body in PROJECTS.items():
        (fx.files / "projects" / name).write_text(body)
    fx.memory.write_text("".join(json.dumps(item) + "\n" for item in MEMORY))

    fx.repo.mkdir()
    _git(fx.repo, "init", "-q", "-b", "main")
    _git(fx.repo, "config", "user.name", "Eval User")
    _git(fx.repo, "config", "user.email", "eval@example.com")
    _git(fx.repo, "config", "commit.gpgsign", "false")
    for i, (author, date, message, files) in enumerate(GIT_HISTORY):
        for name, body in files.items():
            (fx.repo / name).write_text(body)
        _git(fx.repo, "add", *files)
        name, email = author[:-1].split(" <")
        env = {"GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date, "GIT_AUTHOR_NAME": name}
        env |= {"GIT_AUTHOR_EMAIL": email, "GIT_COMMITTER_NAME": name, "GIT_COMMITTER_EMAIL": email}
        _git(fx.repo, "commit", "-q", "-m", message, env=env)
        if i == 1:
            _git(fx.repo, "branch", "feature/solar")
    with (fx.repo / "README.md").open("a") as f:
        f.write("Runs on a Raspberry Pi 4.\n")
    (fx.repo / "TODO.txt").write_text("- calibrate the humidity sensor\n")
    return fx


def server_entries(fx: Fixtures) -> dict[str, dict[str, Any]]:
    """Claude-Desktop server entries for the fixtures (absolute commands: the peer runs them from its venv)."""
    python = sys.executable
    node = shutil.which("node") or "node"
    return {
        "time": {"command": python, "args": [str(TIME_SERVER), "--local-timezone", "UTC"]},
        "filesystem": {
            "command": node,
            "args": [str(NPM / "server-filesystem/dist/index.js"), str(fx.files)],
        },
        "everything": {"command": node, "args": [str(NPM / "server-everything/dist/index.js"), "stdio"]},
        "memory": {
            "command": node,
            "args": [str(NPM / "server-memory/dist/index.js")],
            "env": {"MEMORY_FILE_PATH": str(fx.memory)},
        },
        "git": {
            "command": str(Path(python).with_name("mcp-server-git")),
            "args": ["--repository", str(fx.repo)],
        },
    }


def servers_for(task: Task, mode: str) -> list[str]:
    if mode == "all":
        return list(SERVERS)
    return list(task.servers) or list(NO_TOOL_DISTRACTOR)


def prepare(task: Task, mode: str, root: Path) -> tuple[Fixtures, Path, str]:
    """Fixtures, a plain `mcpServers` config over them and the task text for one run."""
    fx = build_fixtures(root)
    entries = server_entries(fx)
    config = root / "claude_desktop_config.json"
    config.write_text(json.dumps({"mcpServers": {s: entries[s] for s in servers_for(task, mode)}}, indent=2))
    return fx, config, task.render(fx)


# == Verdicts ==================================================================================================

NOT_RUN = "not_run"  # the peer's time budget ended before this task: left out of the totals


def _norm(name: str) -> str:
    return name.replace("-", "_").lower()


def _matches(expected: str, name: str) -> bool:
    return _norm(name) in {_norm(alt) for alt in expected.split("|")}


def _repeated(calls: Sequence[CallRecord]) -> bool:
    seen = Counter((c.name, json.dumps(c.arguments, sort_keys=True)) for c in calls)
    return any(n >= 3 for n in seen.values())


def judge(task: Task, fx: Fixtures, run: RunRecord, agent: str, mode: str) -> Verdict:
    if run.stop_reason == NOT_RUN:
        return Verdict(agent, mode, task.id, False, None, None, None, "not run", run)
    answer_ok = check_text(task.answer, run.answer) if task.answer is not None else None
    state_ok = check_state(task.state, fx) if task.state is not None else None
    return verdict(task, run, agent, mode, answer_ok, state_ok)


def verdict(
    task: Task, run: RunRecord, agent: str, mode: str, answer_ok: bool | None, state_ok: bool | None
) -> Verdict:
    """The verdict once the checks ran (also used to re-classify a saved run with the current rules)."""
    called = [any(_matches(exp, c.name) for c in run.calls) for exp in task.tools]
    accepted = [any(_matches(exp, c.name) and c.outcome == "result" for c in run.calls) for exp in task.tools]
    tool_ok = all(accepted) if task.tools else None
    success = answer_ok is not False and state_ok is not False and run.stop_reason != "harness_error"
    reason = "" if success else classify(task, run, called, accepted, answer_ok, state_ok)
    return Verdict(agent, mode, task.id, success, answer_ok, state_ok, tool_ok, reason, run)


def classify(
    task: Task,
    run: RunRecord,
    called: list[bool],
    accepted: list[bool],
    answer_ok: bool | None,
    state_ok: bool | None,
) -> str:
    """Why a run failed, one short label; the first that applies wins."""
    if run.stop_reason == "harness_error":
        return "harness error"
    if run.stop_reason == "model_error":
        return "model error"
    if task.tools:
        if not run.calls:  # never a valid call: an unparsable reply says more than the budget that ended it
            if run.parse_errors:
                return "parse error"
            if run.stop_reason == "timeout":
                return "timeout"
            return "invented answer" if run.answer is not None else "no tool call"
        if not any(called):
            return "wrong tool"
        if not any(accepted):
            return "rejected arguments"
        if not all(accepted):
            return "incomplete (missed a tool)"
    if run.stop_reason is not None:
        if run.stop_reason == "timeout":
            return "timeout"
        if _repeated(run.calls):
            return "repeated call"
        if run.parse_errors and not run.calls:
            return "parse error"
        return "budget exhausted"
    if state_ok is False:
        return "state not changed"
    if answer_ok is False:
        return "wrong answer" if task.tools else "wrong answer (no tool needed)"
    return "unknown"


# == The peer ==================================================================================================


@dataclass(slots=True)
class PeerJob:
    task: Task
    mode: str
    fx: Fixtures
    config: Path
    text: str

    @property
    def key(self) -> str:
        return f"{self.mode}/{self.task.id}"


async def run_peer(
    jobs: list[PeerJob],
    args: argparse.Namespace,
    work: Path,
    model_folder: Path,
    advance: Callable[[str], None],
) -> tuple[dict[str, RunRecord], str | None]:
    """Run the peer script in its own venv over every job; results stream back as JSON lines."""
    if not PEER_PYTHON.is_file():
        return {}, f"{PEER_PYTHON} missing (run `make eval-peer`)"
    job_file, out_file, log_file = work / "peer_job.json", work / "peer_results.jsonl", work / "peer.log"
    job_file.write_text(
        json.dumps(
            {
                "model_folder": str(model_folder),
                "dtype": args.dtype,
                "max_steps": args.max_steps,
                "max_new_tokens": args.max_tokens,
                "timeout": args.timeout,
                "tasks": [{"key": j.key, "text": j.text, "config": str(j.config)} for j in jobs],
            }
        )
    )
    out_file.touch()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    budget = 300 + len(jobs) * (args.timeout + 60)
    results: dict[str, RunRecord] = {}
    error: str | None = None

    def collect() -> None:
        for line in out_file.read_text(encoding="utf-8").splitlines():
            item = json.loads(line)
            if item["key"] not in results:
                results[item["key"]] = RunRecord.from_dict(item["record"])
                advance(item["key"])

    with log_file.open("w") as log:
        proc = await anyio.open_process(
            [str(PEER_PYTHON), str(PEER_SCRIPT), str(job_file), str(out_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: a kill takes the MCP servers it started too
        )
        try:
            with anyio.fail_after(budget):
                while proc.returncode is None:
                    with anyio.move_on_after(1):
                        await proc.wait()
                    collect()
        except TimeoutError:
            error = f"peer run exceeded {budget} s"
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with anyio.CancelScope(shield=True):
                    await proc.wait()
    collect()
    if proc.returncode not in (0, None) and error is None:
        tail = log_file.read_text(errors="replace").strip().splitlines()[-5:]
        error = f"peer exited {proc.returncode}: " + " | ".join(tail)
    return results, error


# == Report ====================================================================================================


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


@dataclass(slots=True)
class Totals:
    label: str
    n: int
    solved: int
    tool_acc: float
    median_steps: float
    median_wall: float
    cache_share: float | None
    tokens: int

    @property
    def solved_rate(self) -> float:
        return self.solved / self.n if self.n else float("nan")


def totals(label: str, verdicts: Sequence[Verdict]) -> Totals:
    tooled = [v for v in verdicts if v.tool_ok is not None]
    cached = [v.run for v in verdicts if v.run.cached_tokens is not None]
    prompt = sum(r.prompt_tokens for r in cached)
    return Totals(
        label,
        len(verdicts),
        sum(v.success for v in verdicts),
        sum(bool(v.tool_ok) for v in tooled) / len(tooled) if tooled else float("nan"),
        _median([v.run.steps for v in verdicts]),
        _median([v.run.wall_seconds for v in verdicts]),
        sum(r.cached_tokens or 0 for r in cached) / prompt if cached and prompt else None,
        sum(v.run.prompt_tokens + v.run.completion_tokens for v in verdicts),
    )


def _pct(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.0f}%"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return "n/a"
    return f"{a / b:.2f}x"


def print_report(verdicts: list[Verdict], peer_error: str | None, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    groups: dict[tuple[str, str], list[Verdict]] = {}
    for v in verdicts:
        groups.setdefault((v.agent, v.mode), []).append(v)
    ran = {key: [v for v in vs if v.reason != "not run"] for key, vs in sorted(groups.items())}

    detail = Table(title="agent eval: per task", show_lines=False)
    for col in ("task", "agent", "mode", "ok", "answer", "state", "tools", "steps", "tokens", "wall s", "cache", "reason"):  # fmt: skip
        detail.add_column(col, overflow="fold")
    mark = {True: "yes", False: "no", None: "-"}
    for v in sorted(verdicts, key=lambda v: (v.task, v.agent, v.mode)):
        r = v.run
        cache = (
            _pct(r.cached_tokens / r.prompt_tokens)
            if r.cached_tokens is not None and r.prompt_tokens
            else "-"
        )
        detail.add_row(
            v.task, v.agent, v.mode, mark[v.success], mark[v.answer_ok], mark[v.state_ok], mark[v.tool_ok],
            str(r.steps), f"{r.prompt_tokens}+{r.completion_tokens}", f"{r.wall_seconds:.1f}", cache, v.reason,
        )  # fmt: skip
    console.print(detail)

    kinds = Table(title="solved by kind of task")
    kinds.add_column("kind")
    for key in ran:
        kinds.add_column(f"{key[0]} ({key[1]})")
    for kind in dict.fromkeys(TASK_KINDS.get(v.task, "?") for v in verdicts):
        cells = []
        for vs in ran.values():
            mine = [v for v in vs if TASK_KINDS.get(v.task, "?") == kind]
            cells.append(f"{sum(v.success for v in mine)}/{len(mine)}" if mine else "-")
        kinds.add_row(kind, *cells)
    console.print(kinds)

    summary = Table(title=f"agent eval: totals ({title})")
    for col in ("agent / mode", "tasks solved", "tool-call acc.", "median steps", "median wall s", "prefix cache", "tokens"):  # fmt: skip
        summary.add_column(col)
    tots = {key: totals(f"{key[0]} ({key[1]})", vs) for key, vs in ran.items()}
    for key, t in tots.items():
        missing = len(groups[key]) - len(ran[key])
        summary.add_row(
            t.label + (f", {missing} not run" if missing else ""), f"{t.solved}/{t.n} ({_pct(t.solved_rate)})",
            _pct(t.tool_acc), f"{t.median_steps:g}", f"{t.median_wall:.1f}", _pct(t.cache_share), str(t.tokens),
        )  # fmt: skip
    for mode in ("all", "single"):
        peer_ran = {v.task for v in ran.get(("peer", mode), [])}
        if ("ours", mode) not in ran or not peer_ran:
            continue
        # both on the same tasks: the ones the peer ran
        ours = totals("ours", [v for v in ran[("ours", mode)] if v.task in peer_ran])
        peer = tots[("peer", mode)]
        summary.add_row(
            f"ratio ours/peer ({mode}, {len(peer_ran)} tasks)", _ratio(ours.solved_rate, peer.solved_rate),
            _ratio(ours.tool_acc, peer.tool_acc), _ratio(ours.median_steps, peer.median_steps),
            _ratio(ours.median_wall, peer.median_wall), "", _ratio(ours.tokens, peer.tokens),
        )  # fmt: skip
    console.print(summary)

    reasons = Table(title="why failures failed")
    reasons.add_column("reason")
    for key in groups:
        reasons.add_column(f"{key[0]} ({key[1]})")
    labels = sorted({v.reason for v in verdicts if v.reason})
    for label in labels:
        reasons.add_row(label, *(str(sum(v.reason == label for v in groups[k])) for k in groups))
    if labels:
        console.print(reasons)
    if peer_error:
        console.print(f"[yellow]peer: {peer_error}[/yellow]")


def verdict_dict(v: Verdict) -> dict[str, Any]:
    return dataclasses.asdict(v)


def verdict_from_dict(d: Mapping[str, Any], tasks: Mapping[str, Task] | None = None) -> Verdict:
    """A saved verdict; given the tasks, its tool accuracy and reason are re-derived with the current rules."""
    run = RunRecord.from_dict(d["run"])
    body = {k: v for k, v in d.items() if k != "run"}
    if run.error == "no peer result":  # written before `not_run` existed
        run.stop_reason = NOT_RUN
    task = (tasks or {}).get(body["task"])
    if run.stop_reason == NOT_RUN or task is None:
        return Verdict(
            **{**body, "reason": "not run" if run.stop_reason == NOT_RUN else body["reason"]}, run=run
        )
    return verdict(task, run, body["agent"], body["mode"], body["answer_ok"], body["state_ok"])


def report_from(path: Path) -> None:
    """Print the tables of a run saved with --json (or of its .partial.jsonl, one verdict a line)."""
    if path.suffix == ".jsonl":
        lines = path.read_text(encoding="utf-8").splitlines()
        saved: dict[str, Any] = {"verdicts": [json.loads(line) for line in lines if line.strip()]}
    else:
        saved = json.loads(path.read_text(encoding="utf-8"))
    a = saved.get("args", {})
    title = f"SmolLM2-135M, {a.get('dtype', '?')}, max_steps {a.get('max_steps', '?')}"
    tasks = {t.id: t for t in load_tasks()}
    verdicts = [verdict_from_dict(v, tasks) for v in saved["verdicts"]]
    print_report(verdicts, saved.get("peer_error"), title)
    if saved.get("machine"):
        print(saved["machine"])


# == Main ======================================================================================================


def select(tasks: list[Task], args: argparse.Namespace) -> list[Task]:
    if args.filter:
        wanted = [w.strip() for w in args.filter.split(",") if w.strip()]
        tasks = [t for t in tasks if any(w in t.id or w in t.kind or w in t.text for w in wanted)]
    return tasks[: args.tasks] if args.tasks else tasks


def missing_servers(fx: Fixtures) -> list[str]:
    """What the servers of `server_entries` need and this machine lacks: a command not found, or a script (the npm
    peers under .peers, which `make peers` installs) not there. Without them every task of those servers was a
    "harness error" ("agent 'default' has no tools"), and a run read as if the model had failed."""
    missing = []
    for name, entry in server_entries(fx).items():
        command = str(entry["command"])
        if shutil.which(command) is None and not Path(command).is_file():
            missing.append(f"{name}: {command} not found")
        missing += [
            f"{name}: {arg} not found"
            for arg in entry.get("args", [])
            if str(arg).endswith(".js") and not Path(arg).is_file()
        ]
    return missing


async def evaluate(args: argparse.Namespace) -> tuple[list[Verdict], str | None]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    tasks = select(load_tasks(), args)
    modes = ["all", "single"] if args.mode == "both" else [args.mode]
    peer_modes = modes if args.peer_mode == "same" else [args.peer_mode]
    verdicts: list[Verdict] = []
    peer_error: list[str | None] = [None]
    work = Path(tempfile.mkdtemp(prefix="agent-eval-"))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    partial = args.json.with_suffix(".partial.jsonl") if args.json else None

    def keep(v: Verdict) -> None:
        """Every verdict as it comes, so that a run stopped half-way still tells what it measured."""
        verdicts.append(v)
        if partial is not None:
            with partial.open("a", encoding="utf-8") as f:
                f.write(json.dumps(verdict_dict(v)) + "\n")

    async def ours(progress: Progress, bar: Any) -> None:
        shared = await load_ours(args.dtype)
        try:
            for mode in modes:
                for task in tasks:
                    progress.update(bar, description=f"ours {mode}: {task.id}")
                    root = work / "ours" / mode / task.id
                    fx, config, text = await anyio.to_thread.run_sync(prepare, task, mode, root)
                    run = await run_ours(
                        shared, config, text, max_steps=args.max_steps, max_tokens=args.max_tokens,
                        seconds=args.timeout,
                    )  # fmt: skip
                    keep(judge(task, fx, run, "ours", mode))
                    progress.advance(bar)
        finally:
            await close_ours(shared)

    async def peer(progress: Progress, bar: Any) -> None:
        jobs: list[PeerJob] = []
        for mode in peer_modes:
            for task in tasks:
                root = work / "peer" / mode / task.id
                fx, config, text = await anyio.to_thread.run_sync(prepare, task, mode, root)
                jobs.append(PeerJob(task, mode, fx, config, text))

        def advance(key: str) -> None:
            progress.update(bar, description=f"peer: {key}")
            progress.advance(bar)

        folder = await anyio.to_thread.run_sync(ours_model_folder)
        results, peer_error[0] = await run_peer(jobs, args, work, folder, advance)
        for job in jobs:
            run = results.get(job.key) or RunRecord(stop_reason=NOT_RUN, error="no peer result")
            keep(judge(job.task, job.fx, run, "peer", job.mode))

    try:
        with Progress(*columns, transient=False) as progress:
            ours_bar = progress.add_task(
                "ours: loading SmolLM2", total=len(tasks) * len(modes), visible=args.ours
            )
            peer_bar = progress.add_task(
                "peer: loading SmolLM2", total=len(tasks) * len(peer_modes), visible=args.peer
            )
            if args.concurrent:  # both at once: less elapsed time, slower steps (they share the cores)
                async with anyio.create_task_group() as tg:
                    if args.ours:
                        tg.start_soon(ours, progress, ours_bar)
                    if args.peer:
                        tg.start_soon(peer, progress, peer_bar)
            else:
                if args.ours:
                    await ours(progress, ours_bar)
                if args.peer:
                    await peer(progress, peer_bar)
    finally:
        if args.keep:
            print(f"run folders kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return verdicts, peer_error[0]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.agent_eval", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--mode", choices=["all", "single", "both"], default="both")
    parser.add_argument("--tasks", type=int, default=0, help="run the first N tasks (after --filter)")
    parser.add_argument(
        "--filter", default="", help="only tasks whose id, kind or text contains this (a,b: either)"
    )
    parser.add_argument("--ours", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--peer-mode",
        choices=["same", "all", "single"],
        default="single",
        help="the peer's config mode(s); `same`: --mode's (its `all` costs minutes per task on 2 cores)",
    )
    parser.add_argument("--max-steps", type=int, default=4, help="model turns per task, both agents")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens per model turn (the peer's too)")
    parser.add_argument("--timeout", type=float, default=90.0, help="wall-clock seconds per task")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="both agents")
    parser.add_argument(
        "--concurrent", action="store_true", help="run ours and the peer at the same time (shared cores)"
    )
    parser.add_argument("--report", type=Path, help="only print the tables of a run saved with --json")
    parser.add_argument(
        "--json",
        type=Path,
        help="write every verdict and run record here (and each as it comes to PATH.partial.jsonl)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the per-task folders (printed at the end)")
    args = parser.parse_args(argv)
    if args.report:
        report_from(args.report)
        return 0
    missing = missing_servers(Fixtures(Path(tempfile.gettempdir())))
    if missing:
        print(f"error: the suite's servers are not all installed: {'; '.join(missing)}", file=sys.stderr)
        print("hint: `make peers` installs the npm servers (node 20 and npm needed)", file=sys.stderr)
        return 2
    load_before = os.getloadavg()[0]
    verdicts, peer_error = anyio.run(evaluate, args)
    print_report(verdicts, peer_error, f"SmolLM2-135M, {args.dtype}, max_steps {args.max_steps}")
    load = f"load average (1 min) {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    print(f"{os.cpu_count()} cores, {load}")
    if args.json:
        body = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "machine": load,
            "peer_error": peer_error,
            "verdicts": [verdict_dict(v) for v in verdicts],
        }
        args.json.write_text(json.dumps(body, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
