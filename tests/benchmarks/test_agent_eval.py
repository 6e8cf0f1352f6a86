"""The agent evaluation suite without a model: the task file loads, every checker accepts a right answer (or
state) and rejects a wrong one, the fixtures hold what the tasks ask about, configs are plain `mcpServers`
files, and failed runs get the reason they should."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from benchmarks.agent_eval import (
    SERVERS,
    CallRecord,
    Fixtures,
    RunRecord,
    Task,
    _git,
    build_fixtures,
    check_state,
    check_text,
    judge,
    load_tasks,
    numbers_in,
    prepare,
    read_memory,
)

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")

TASKS = {t.id: t for t in load_tasks()}

# A right and a wrong final answer per task with an answer check, written as a person or a model would.
ANSWERS: dict[str, tuple[str, str]] = {
    "time-tokyo": ("It's 2:26 PM in Tokyo (2026-03-14T14:26:53+09:00).", "It is 12:26 in Tokyo."),
    "time-london": ("The time in London is 05:26.", "London: 15:26"),
    "time-new-york": ("It's 1:26 AM in New York right now.", "It's 11:26 in New York."),
    "time-kolkata": ("In Kolkata it is 10:56:53.", "It is 10:26 in Kolkata."),
    "convert-ny-tokyo": ("9:00 in New York is 22:00 in Tokyo.", "It is 9:00 in Tokyo."),
    "convert-london-sydney": ("That's 2:00 AM the next day in Sydney.", "It will be 12:00 in Sydney."),
    "convert-paris-chicago": ("10:30 in Paris is 04:30 in Chicago.", "10:30 in Paris is 14:30 in Chicago."),
    "weekday-los-angeles": ("It is Friday in Los Angeles.", "It is Saturday in Los Angeles."),
    "date-honolulu": ("Today in Honolulu is 2026-03-13.", "Today in Honolulu is 2026-03-14."),
    "sum-integers": ("1234 + 5678 = 6,912", "1234 + 5678 = 123456"),
    "sum-decimals": ("The sum is 41.75.", "The sum is 41.5."),
    "echo-phrase": ("Echo: purple elephants dance at midnight", "Echo: purple elephants"),
    "weather-chicago": ("Chicago: 36 degrees, light rain / drizzle.", "Chicago: sunny and 20 degrees."),
    "fs-list-root": (
        "notes.txt, budget.csv, todo.md, contacts.json and projects/",
        "notes.txt and projects/",
    ),
    "fs-list-projects": ("alpha.txt and beta.txt", "It is empty."),
    "fs-notes-meeting": ("The weekly sync is on Thursday at 3:30 pm.", "The sync is on Monday at 15:30."),
    "fs-todo-open": (
        "Still open: email Priya about the invoice, water the plants.",
        "Open: email Priya, book flights to Lisbon, water the plants.",
    ),
    "fs-project-owner": ("Kenji owns Project Beta.", "Marta owns Project Beta."),
    "csv-monitor-price": ("The monitor cost 329.50.", "The monitor cost 1299.00."),
    "csv-furniture": ("The office chair.", "The laptop."),
    "git-status": ("README.md is modified and TODO.txt is untracked.", "The working tree is clean."),
    "git-last-commit": ("'Fix rounding in temperature display'", "'Add sensor reader'"),
    "git-first-author": ("Ada Lovelace made the first commit.", "Grace Hopper made the first commit."),
    "git-branches": ("feature/solar and main", "only main"),
    "memory-priya-employer": ("Priya works at Acme Corp.", "Priya works at Globex."),
    "memory-acme-city": ("Acme Corp is based in Rotterdam.", "Acme Corp is based in Amsterdam."),
    "multi-sum-prices": ("Laptop 1299 + chair 249.99 = 1548.99", "Laptop 1299 + monitor 329.50 = 1628.5"),
    "none-capital": ("The capital of France is Paris.", "The capital of France is Lyon."),
    "none-multiply": ("7 times 8 is 56.", "7 times 8 is 54."),
    "none-spanish": ("'Thank you' is 'gracias' in Spanish.", "'Thank you' is 'merci'."),
    "none-greeting": ("Hi there!", "The time in Tokyo is 14:26."),
}


def _commit_todo(fx: Fixtures) -> None:
    _git(fx.repo, "add", "TODO.txt")
    _git(fx.repo, "commit", "-q", "-m", "Add TODO list")


def _add_memory(fx: Fixtures, entity: dict[str, object]) -> None:
    with fx.memory.open("a") as f:
        f.write(json.dumps({"type": "entity", **entity}) + "\n")


def _add_priya_tea(fx: Fixtures) -> None:
    lines = [json.loads(line) for line in fx.memory.read_text().splitlines()]
    for item in lines:
        if item.get("name") == "Priya":
            item["observations"].append("favourite drink is mint tea")
    fx.memory.write_text("".join(json.dumps(i) + "\n" for i in lines))


# What a right run leaves behind, per task with a state check (the fresh fixtures are the wrong state).
STATES: dict[str, Callable[[Fixtures], None]] = {
    "fs-write-hello": lambda fx: (fx.files / "hello.txt").write_text("Hello, world!"),
    "fs-write-shopping": lambda fx: (fx.files / "shopping.txt").write_text("milk\neggs\nbread\n"),
    "fs-mkdir-archive": lambda fx: (fx.files / "archive").mkdir(),
    "fs-move-todo": lambda fx: (fx.files / "todo.md").rename(fx.files / "tasks.md"),
    "git-commit-todo": _commit_todo,
    "git-new-branch": lambda fx: _git(fx.repo, "branch", "release-1.0"),
    "memory-remember-person": lambda fx: _add_memory(
        fx, {"name": "Tomás", "entityType": "person", "observations": ["lives in Porto", "plays the cello"]}
    ),
    "memory-add-observation": _add_priya_tea,
    "multi-hardware-total": lambda fx: (fx.files / "hardware_total.txt").write_text("1,628.50\n"),
    "multi-tokyo-to-file": lambda fx: (fx.files / "tokyo_time.txt").write_text("2026-03-14T14:26:53+09:00"),
    "multi-owner-to-memory": lambda fx: _add_memory(
        fx, {"name": "Marta", "entityType": "person", "observations": ["owns Project Alpha"]}
    ),
}


def test_task_file_loads_with_enough_varied_tasks() -> None:
    tasks = list(TASKS.values())
    assert len(tasks) >= 40
    kinds = {t.kind for t in tasks}
    for kind in ("time in a city", "convert a time", "day of the week", "adding numbers", "echoing a phrase",
                 "listing a folder", "reading a file", "a value from a CSV", "creating a file", "memory graph",
                 "git", "multi-step", "no tool needed"):  # fmt: skip
        assert kind in kinds, kind
    assert {s for t in tasks for s in t.servers} == set(SERVERS)
    for t in tasks:
        assert bool(t.tools) == (t.kind != "no tool needed"), t.id
        assert ("{files}" in t.text) == ("filesystem" in t.servers), t.id
        assert ("{repo}" in t.text) == ("git" in t.servers), t.id


def test_every_task_has_a_hand_checked_right_and_wrong_outcome() -> None:
    with_answer = {t.id for t in TASKS.values() if t.answer is not None}
    with_state = {t.id for t in TASKS.values() if t.state is not None}
    assert set(ANSWERS) == with_answer
    assert set(STATES) == with_state


@pytest.mark.parametrize("task_id", sorted(ANSWERS))
def test_answer_checker(task_id: str) -> None:
    right, wrong = ANSWERS[task_id]
    spec = TASKS[task_id].answer
    assert spec is not None
    assert check_text(spec, right), right
    assert not check_text(spec, wrong), wrong
    assert not check_text(spec, None)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Fixtures:
    """Fixtures built once; tests that change them work on a copy (building runs a dozen git commands)."""
    return build_fixtures(tmp_path_factory.mktemp("pristine") / "fx")


@pytest.mark.parametrize("task_id", sorted(STATES))
def test_state_checker(task_id: str, tmp_path: Path, pristine: Fixtures) -> None:
    spec = TASKS[task_id].state
    assert spec is not None
    fx = Fixtures(Path(shutil.copytree(pristine.root, tmp_path / "fx")))
    assert not check_state(spec, fx)  # nothing done yet
    STATES[task_id](fx)
    assert check_state(spec, fx)


def test_numbers_and_times_as_people_write_them() -> None:
    assert numbers_in("1,234.5 and -25, then 7.") == [1234.5, -25.0, 7.0]
    assert numbers_in("commit a3f9 on 2026-03-14 at 05:26") == []
    spec = {"time": "14:26"}
    for ok in ("14:26", "2:26 PM", "2:26pm", "T14:26:53+09:00", "2:26 p.m."):
        assert check_text(spec, ok), ok
    for bad in ("12:26", "2:26 AM", "114:26", "14:27"):
        assert not check_text(spec, bad), bad
    assert check_text({"time": "02:00"}, "2 am") and check_text({"time": "02:00"}, "02:00")
    assert check_text({"time": "22:00"}, "10 PM") and not check_text({"time": "22:00"}, "10 AM")


def test_words_count_where_they_start_a_word() -> None:
    # found by the suite: the answer "... d00ede95ac1e6bada624ed ..." once passed "who made the first commit?"
    assert not check_text({"contains_all": ["Ada"]}, "The first commit is d00ede95ac1e6bada624ed.")
    assert check_text({"contains_all": ["Ada"]}, "It was Ada Lovelace.")
    assert check_text({"contains_all": ["solar", "main"]}, "feature/solar and * main")
    assert check_text({"contains_all": ["plant"]}, "water the plants")  # a word's start, not the whole word
    assert not check_text({"not_contains": ["Lisbon"]}, "book flights to Lisbon")


def test_fixtures_hold_what_the_tasks_ask_about(pristine: Fixtures) -> None:
    fx = pristine
    names = {p.name for p in fx.files.iterdir()}
    assert {"notes.txt", "budget.csv", "todo.md", "contacts.json", "projects"} <= names
    assert {p.name for p in (fx.files / "projects").iterdir()} == {"alpha.txt", "beta.txt"}
    budget = (fx.files / "budget.csv").read_text()
    hardware = [float(r.split(",")[2]) for r in budget.splitlines()[1:] if r.split(",")[1] == "hardware"]
    assert sum(hardware) == pytest.approx(1628.5)
    assert "Thursday at 15:30" in (fx.files / "notes.txt").read_text()
    log = _git(fx.repo, "log", "--format=%an|%s").splitlines()
    assert log == [
        "Grace Hopper|Fix rounding in temperature display",
        "Grace Hopper|Add sensor reader",
        "Ada Lovelace|Initial commit",
    ]
    assert set(_git(fx.repo, "branch", "--format=%(refname:short)").split()) == {"main", "feature/solar"}
    status = _git(fx.repo, "status", "--porcelain")
    assert "M README.md" in status and "?? TODO.txt" in status
    assert {e["name"] for e in read_memory(fx.memory)} == {"Priya", "Acme Corp"}


def test_configs_are_plain_mcp_servers_files(tmp_path: Path) -> None:
    task = TASKS["multi-sum-prices"]
    fx, config, text = prepare(task, "single", tmp_path / "single")
    body = json.loads(config.read_text())
    assert list(body) == ["mcpServers"]
    assert set(body["mcpServers"]) == {"filesystem", "everything"}
    assert str(fx.files) in text and "{files}" not in text
    _, config_all, _ = prepare(task, "all", tmp_path / "all")
    assert set(json.loads(config_all.read_text())["mcpServers"]) == set(SERVERS)
    _, config_none, _ = prepare(TASKS["none-capital"], "single", tmp_path / "none")
    assert set(json.loads(config_none.read_text())["mcpServers"]) == {"time"}  # an agent needs a tool


def _task(tools: list[str], answer: dict[str, object] | None = None) -> Task:
    return Task("t", "k", "text", ["time"], tools, answer or {"contains_all": ["14:26"]})


@pytest.mark.parametrize(
    ("run", "reason"),
    [
        (RunRecord(answer="It is 9:00."), "invented answer"),
        (RunRecord(stop_reason="max_steps", parse_errors=3), "parse error"),
        (RunRecord(answer="x", calls=[CallRecord("echo", {}, "result")]), "wrong tool"),
        (RunRecord(answer="x", calls=[CallRecord("get_current_time", {}, "tool_error")]), "rejected arguments"),
        (RunRecord(stop_reason="max_steps", calls=[CallRecord("get_current_time", {}, "result")] * 3),
         "repeated call"),
        (RunRecord(stop_reason="max_tool_calls", calls=[CallRecord("get_current_time", {}, "result")]),
         "budget exhausted"),
        (RunRecord(stop_reason="timeout"), "timeout"),
        (RunRecord(stop_reason="timeout", parse_errors=2), "parse error"),
        (RunRecord(answer="It is 9:00.", calls=[CallRecord("get_current_time", {}, "result")]), "wrong answer"),
        (RunRecord(stop_reason="harness_error"), "harness error"),
    ],
)  # fmt: skip
def test_failures_are_classified(run: RunRecord, reason: str, tmp_path: Path) -> None:
    verdict = judge(_task(["get_current_time"]), Fixtures(tmp_path), run, "ours", "single")
    assert not verdict.success and verdict.reason == reason


def test_success_and_tool_accuracy(tmp_path: Path) -> None:
    fx = Fixtures(tmp_path)
    run = RunRecord(answer="It is 14:26.", calls=[CallRecord("get-sum", {}, "result")])
    assert judge(_task(["get_sum|echo"]), fx, run, "peer", "all").tool_ok  # - and _ are the same name
    ok = judge(_task(["get_current_time"]), fx, run, "ours", "all")
    assert ok.success and ok.reason == "" and ok.tool_ok is False  # right answer, not from the right tool
    none = judge(_task([]), fx, RunRecord(answer="Paris"), "ours", "all")
    assert none.tool_ok is None and none.reason == "wrong answer (no tool needed)"


def test_saved_verdicts_read_back_and_a_peer_task_not_run_is_marked(tmp_path: Path) -> None:
    from benchmarks.agent_eval import NOT_RUN, verdict_dict, verdict_from_dict

    run = RunRecord(
        answer="It is 14:26.", calls=[CallRecord("get_current_time", {"timezone": "Asia/Tokyo"}, "result")]
    )
    verdict_task = _task(["get_current_time"])
    verdict = judge(verdict_task, Fixtures(tmp_path), run, "ours", "single")
    assert verdict_from_dict(json.loads(json.dumps(verdict_dict(verdict)))) == verdict
    assert verdict_from_dict(json.loads(json.dumps(verdict_dict(verdict))), {"t": verdict_task}) == verdict
    skipped = judge(
        _task(["get_current_time"]), Fixtures(tmp_path), RunRecord(stop_reason=NOT_RUN), "peer", "all"
    )
    assert skipped.reason == "not run" and not skipped.success


def test_servers_not_installed_are_named_before_any_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without the npm peers (`make peers`) the suite stops at once, naming what is missing (exit 2): every task of
    those servers had been a "harness error", which read as the model failing."""
    import benchmarks.agent_eval as agent_eval

    npm = tmp_path / "npm"
    for server in ("server-filesystem", "server-everything", "server-memory"):
        (npm / server / "dist").mkdir(parents=True)
        (npm / server / "dist" / "index.js").write_text("")
    monkeypatch.setattr(agent_eval, "NPM", npm)
    npm_servers = {"filesystem", "everything", "memory"}
    assert not [m for m in agent_eval.missing_servers(Fixtures(tmp_path)) if m.split(":")[0] in npm_servers]
    monkeypatch.setattr(agent_eval, "NPM", tmp_path / "nowhere")
    missing = agent_eval.missing_servers(Fixtures(tmp_path))
    assert {m.split(":")[0] for m in missing} >= npm_servers
    assert agent_eval.main(["--no-peer"]) == 2
    err = capsys.readouterr().err
    assert "server-filesystem/dist/index.js not found" in err and "make peers" in err
