"""What the runtime does for a small model, without a model: routing, grounding, two-stage grammars, derived
and remembered examples, the answer check and flat observations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import xgrammar as xgr

from agent_runtime.agents.checks import failure_summary, ungrounded_values
from agent_runtime.agents.events import ToolCallRecord
from agent_runtime.agents.examples import CallMemory, example_arguments, examples_for
from agent_runtime.agents.grounding import (
    GroundingContext,
    clock_values,
    evidence,
    ground_schema,
    quoted_choices,
    zones_named_in,
)
from agent_runtime.agents.guided import arguments_spec, close_answer, decision_spec
from agent_runtime.agents.observations import flat_lines
from agent_runtime.agents.routing import ToolIndex, intent, plan_route, route, words
from inference.formats import ToolSpec
from inference.grammar import GrammarCompilerCache, GrammarSpec

TZ = {
    "type": "string",
    "description": "IANA timezone name (e.g., 'America/New_York', 'Europe/London').",
}
TIME_TOOLS = [
    ToolSpec(
        "time__get_current_time",
        "Get current time in a specific timezone",
        {"type": "object", "properties": {"timezone": TZ}, "required": ["timezone"]},
        "time",
        True,
    ),
    ToolSpec(
        "time__convert_time",
        "Convert time between timezones",
        {
            "type": "object",
            "properties": {
                "source_timezone": TZ,
                "time": {"type": "string", "description": "Time to convert in 24-hour format (HH:MM)"},
                "target_timezone": TZ,
            },
            "required": ["source_timezone", "time", "target_timezone"],
        },
        "time",
        True,
    ),
]
PATH = {"type": "string"}
FS_TOOLS = [
    ToolSpec(
        "fs__read_text_file",
        "Read the complete contents of a file from the file system as text.",
        {"type": "object", "properties": {"path": PATH, "head": {"type": "number"}}, "required": ["path"]},
        "fs",
        True,
    ),
    ToolSpec(
        "fs__list_directory",
        "Get a detailed listing of all files and directories in a specified path.",
        {"type": "object", "properties": {"path": PATH}, "required": ["path"]},
        "fs",
        True,
    ),
    ToolSpec(
        "fs__create_directory",
        "Create a new directory or ensure a directory exists.",
        {"type": "object", "properties": {"path": PATH}, "required": ["path"]},
        "fs",
        False,
    ),
    ToolSpec(
        "fs__move_file",
        "Move or rename files and directories.",
        {
            "type": "object",
            "properties": {"source": PATH, "destination": PATH},
            "required": ["source", "destination"],
        },
        "fs",
        False,
    ),
]
WRITE = ToolSpec(
    "fs__write_file",
    "Create a new file or completely overwrite an existing file with new content.",
    {
        "type": "object",
        "properties": {"path": PATH, "content": {"type": "string"}},
        "required": ["path", "content"],
    },
    "fs",
    False,
)
SEARCH = ToolSpec(
    "fs__search_files",
    "Recursively search for files and directories matching a pattern",
    {
        "type": "object",
        "properties": {"path": {"type": "string"}, "pattern": {"type": "string"}},
        "required": ["path", "pattern"],
    },
    "fs",
    True,
)
SUM = ToolSpec(
    "everything__get-sum",
    "Returns the sum of two numbers",
    {
        "type": "object",
        "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
        "required": ["a", "b"],
    },
    "everything",
    True,
)


def _best(query: str, tools: list[ToolSpec]) -> str:
    return route(query, tools, None, evidence).scores[0].name


def test_words_split_case_styles_and_fold_plurals() -> None:
    assert words("list_directory getFileInfo read-text-files") == [
        "list",
        "directory",
        "file",  # `get` is a stop word
        "info",
        "read",
        "text",
        "file",
    ]
    # words that only look plural keep their s, so "plus" still reaches a tool documented as "sum"
    assert words("plus status analysis files") == ["plus", "status", "analysis", "file"]
    assert words("Find out who owns it; find the file") == ["learn", "own", "find", "file"]
    assert _best("What's 1234 plus 5678?", [*TIME_TOOLS, *FS_TOOLS, SUM]) == "everything__get-sum"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("What time is it in Tokyo right now?", "time__get_current_time"),
        ("hey, whats the time in london", "time__get_current_time"),
        ("When it's 9:00 in New York, what time is it in Tokyo?", "time__convert_time"),
        ("Convert 10:30 Paris time to Chicago time.", "time__convert_time"),
    ],
)
def test_routing_prefers_the_tool_whose_inputs_the_task_gives(query: str, expected: str) -> None:
    assert _best(query, TIME_TOOLS) == expected


def test_routing_by_the_kind_of_path_and_by_intent() -> None:
    assert _best("When is the weekly sync? It's in /tmp/f/notes.txt", FS_TOOLS) == "fs__read_text_file"
    assert _best("What is inside /tmp/f/projects?", FS_TOOLS) == "fs__list_directory"
    assert _best("Make a new folder called archive inside /tmp/f", FS_TOOLS) == "fs__create_directory"
    assert intent("What was the last commit message?") == "read"
    assert intent("Stage TODO.txt and commit it") == "change"


def test_routing_reaches_synonyms_and_is_unsure_without_a_match() -> None:
    assert _best("Add 17.5 and 24.25 for me.", [*TIME_TOOLS, SUM]) == "everything__get-sum"
    plain = route("What is the capital of France?", [*TIME_TOOLS, SUM], None, evidence)
    assert not plain.confident
    assert route("What time is it in Tokyo?", TIME_TOOLS, None, evidence).confident


def test_bm25_ranks_name_matches_first() -> None:
    index = ToolIndex([(t.name, t.description, t.parameters) for t in FS_TOOLS])
    assert index.scores("move the file")[0].name == "fs__move_file"


def test_timezones_from_the_places_the_task_names() -> None:
    assert zones_named_in(["When it's 9:00 in New York, what time is it in Tokyo?"]) == [
        "America/New_York",
        "Asia/Tokyo",
    ]
    context = GroundingContext()
    context.add("When it's 9:00 in New York, what time is it in Tokyo?")
    schema = ground_schema(TIME_TOOLS[1].parameters, context)
    props = schema["properties"]
    assert props["source_timezone"]["enum"] == ["America/New_York"]  # named first: the source
    assert props["target_timezone"]["enum"] == ["Asia/Tokyo"]
    assert props["time"]["enum"] == ["09:00"]
    assert clock_values("a call at 3 pm, or noon, or 12:30 am") == ["15:00", "12:00", "00:30"]


def test_paths_are_the_ones_seen_and_a_created_thing_gets_its_name() -> None:
    context = GroundingContext()
    context.add("Make a new folder called archive inside /tmp/x/files.")
    read = ground_schema(FS_TOOLS[1].parameters, context, read_only=True)
    assert read["properties"]["path"]["enum"] == ["/tmp/x/files", "/tmp/x/files/archive"]
    made = ground_schema(FS_TOOLS[2].parameters, context, read_only=False)
    assert made["properties"]["path"]["enum"] == ["/tmp/x/files/archive"]
    context.add("[FILE] /tmp/x/files/notes.txt")  # an observation's path becomes a candidate too
    assert (
        "/tmp/x/files/notes.txt"
        in ground_schema(FS_TOOLS[0].parameters, context)["properties"]["path"]["enum"]
    )


def test_a_tool_with_a_name_argument_keeps_its_path_among_the_paths_seen() -> None:
    create_branch = {
        "type": "object",
        "properties": {"repo_path": {"type": "string"}, "branch_name": {"type": "string"}},
        "required": ["repo_path", "branch_name"],
    }
    context = GroundingContext()
    context.add("Create a new branch called release-1.0 in the repo at /tmp/x/repo")
    grounded = ground_schema(create_branch, context, read_only=False)
    assert grounded["properties"]["repo_path"]["enum"][0] == "/tmp/x/repo"


def test_a_task_in_several_parts_routes_each_part_in_order() -> None:
    write = WRITE
    tools = [*FS_TOOLS, write, *TIME_TOOLS]
    r = plan_route(
        "Find out the current time in Tokyo and save it to /tmp/f/tokyo_time.txt.", tools, None, evidence
    )
    assert r.plan == ("time__get_current_time", "fs__write_file")
    assert set(r.plan) <= set(r.top(1))  # the plan's tools are offered whatever the whole task's ranking
    question = plan_route(
        "In /tmp/f/budget.csv, which item is in the furniture category?", tools, None, evidence
    )
    assert question.plan == ()  # a question is one lookup, not a read and then a search


def test_optional_arguments_nobody_asked_for_are_not_offered() -> None:
    context = GroundingContext()
    context.add("Read /tmp/a.txt")
    assert "head" not in ground_schema(FS_TOOLS[0].parameters, context)["properties"]
    context.add("only the head: the first 3 lines")
    assert "head" in ground_schema(FS_TOOLS[0].parameters, context)["properties"]


def test_quoted_choices_free_strings_and_arrays_are_bounded() -> None:
    desc = "Whether to list local branches ('local'), remote branches ('remote') or all branches ('all')."
    assert quoted_choices(desc) == ["local", "remote", "all"]
    assert quoted_choices("A name like 'x' is fine.") == []
    schema = {
        "type": "object",
        "properties": {
            "message": {"type": "string"},
            "items": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["message", "items"],
    }
    grounded = ground_schema(schema, GroundingContext())
    assert grounded["properties"]["message"]["maxLength"] > 0
    assert grounded["properties"]["items"]["maxItems"] > 0


def test_evidence_counts_each_value_once() -> None:
    one_path = "How much did the monitor cost? It's in /tmp/f/budget.csv."
    assert evidence(FS_TOOLS[0].parameters, one_path, FS_TOOLS[0].description) > 0
    assert evidence(FS_TOOLS[3].parameters, one_path, FS_TOOLS[3].description) < 0  # no second path
    assert evidence(SUM.parameters, "Add 17.5 and 24.25") > evidence(SUM.parameters, "Add these")


@pytest.fixture(scope="module")
def grammars() -> tuple[GrammarCompilerCache, Any]:
    from transformers import AutoTokenizer

    from inference.loader import converted_gguf, smollm2_gguf_path

    tokenizer = AutoTokenizer.from_pretrained(converted_gguf(smollm2_gguf_path()))
    return GrammarCompilerCache(tokenizer, len(tokenizer)), tokenizer


def _accepts(grammars: tuple[GrammarCompilerCache, Any], spec: GrammarSpec, text: str) -> bool:
    cache, tokenizer = grammars
    matcher = xgr.GrammarMatcher(cache.compile(spec))
    return all(matcher.accept_token(t) for t in tokenizer.encode(text, add_special_tokens=False))


@pytest.mark.smollm2
def test_the_two_stage_grammars(grammars: tuple[GrammarCompilerCache, Any]) -> None:
    decide = decision_spec(["time__get_current_time", "time__convert_time"], allow_answer=True)
    assert _accepts(grammars, decide, 'tool": "time__convert_time"')
    assert _accepts(grammars, decide, 'answer": "It is 14:26."}')
    assert not _accepts(grammars, decide, 'tool": "fs__read_file"')
    tools_only = decision_spec(["time__get_current_time"], allow_answer=False)
    assert not _accepts(grammars, tools_only, 'answer": "x"}')
    context = GroundingContext()
    context.add("What time is it in Tokyo?")
    args = arguments_spec(ground_schema(TIME_TOOLS[0].parameters, context))
    assert _accepts(grammars, args, '{"timezone": "Asia/Tokyo"}}')
    assert not _accepts(grammars, args, '{"timezone": "UTC+08"}}')
    numbers = GroundingContext()
    numbers.add("Add 17.5 and 24.25 for me.")
    sum_args = {
        "type": "object",
        "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
        "required": ["a", "b"],
    }
    args = arguments_spec(ground_schema(sum_args, numbers))
    assert _accepts(grammars, args, '{"a": 17.5, "b": 24.25}}')
    assert not _accepts(grammars, args, '{"a": 1.75, "b": 2.45}}')


def test_numbers_are_the_ones_the_run_has_seen() -> None:
    context = GroundingContext()
    context.add("Add 17.5 and 24.25, then show the 3 largest.")
    number = {"type": "number"}
    assert ground_schema({"properties": {"a": number}, "required": ["a"]}, context)["properties"]["a"][
        "enum"
    ] == [17.5, 24.25, 3]
    integer = {"type": "integer", "minimum": 5}
    grounded = ground_schema({"properties": {"n": integer}, "required": ["n"]}, context)
    assert "enum" not in grounded["properties"]["n"]  # no whole number of 5 or more was seen: left free
    context.add("total: 42")
    grounded = ground_schema({"properties": {"n": integer}, "required": ["n"]}, context)
    assert grounded["properties"]["n"]["enum"] == [42]


def test_a_cut_answer_is_closed() -> None:
    assert json.loads(close_answer('{"answer": "It is 14:26 in To'))["answer"].startswith("It is 14:26 in To")
    assert json.loads(close_answer('{"answer": "a\\'))["answer"].startswith("a")


def test_example_arguments_from_the_schema() -> None:
    assert example_arguments(TIME_TOOLS[0].parameters) == {"timezone": "America/New_York"}
    assert example_arguments({"properties": {"n": {"type": "integer", "default": 3}}, "required": ["n"]}) == {
        "n": 3
    }
    assert example_arguments(FS_TOOLS[0].parameters) is None  # nothing to take a path from


def test_remembered_calls_come_back_as_examples(tmp_path: Path) -> None:
    memory = CallMemory(tmp_path / "examples")
    tool = TIME_TOOLS[0]
    for i in range(5):
        memory.remember(
            tool, f"time in city {i}?", {"timezone": "Asia/Tokyo"}, '{"datetime": "x"}', f"It is {i}."
        )
    recalled = memory.recall(tool)
    assert [e.task for e in recalled] == ["time in city 2?", "time in city 3?", "time in city 4?"]  # newest 3
    assert recalled[0].calls[0].tool == tool.name and recalled[0].calls[0].arguments == {
        "timezone": "Asia/Tokyo"
    }
    assert (tmp_path / "examples").stat().st_mode & 0o077 == 0
    changed = ToolSpec(tool.name, "Get the time somewhere else", tool.parameters, tool.server)
    assert memory.recall(changed) == []  # a changed definition starts without memory
    assert [e.task for e in examples_for([tool], memory)] == ["time in city 4?", "time in city 3?"]


def _record(outcome: str, observation: str) -> ToolCallRecord:
    return ToolCallRecord(
        1, "c1", "time__get_current_time", "time", {}, outcome, observation, outcome != "result", False, 0.1
    )


def test_answers_must_state_only_values_the_tools_gave() -> None:
    sources = ["What time is it in Tokyo?", '{"datetime": "2026-03-14T14:26:53+09:00"}']
    assert ungrounded_values("It is 14:26 in Tokyo.", sources) == []
    assert ungrounded_values("It is 2:26 PM on 2026-03-14.", sources) == []
    assert ungrounded_values("It is 12:00 PM in Tokyo.", sources) == ["12:00 PM"]
    assert ungrounded_values("The sum is 6,912.", ["1234 plus 5678", "The sum is 6912."]) == []
    assert ungrounded_values("The sum is 7000.", ["1234 plus 5678", "The sum is 6912."]) == ["7000"]


def test_a_run_whose_calls_all_failed_says_so() -> None:
    failed = [_record("tool_error", "Error: the tool reported an error: Invalid timezone: UTC+08.")]
    summary = failure_summary(failed)
    assert (
        summary is not None and "Invalid timezone: UTC+08" in summary and "time__get_current_time" in summary
    )
    assert failure_summary([*failed, _record("result", "{}")]) is None
    assert failure_summary([]) is None


def test_flat_lines() -> None:
    text = '{"source": {"timezone": "America/New_York"}, "target": {"datetime": "2026-03-14T22:00:00+09:00"}, "n": [1, 2]}'
    assert flat_lines(text) == (
        "source.timezone: America/New_York\ntarget.datetime: 2026-03-14T22:00:00+09:00\nn: [1, 2]"
    )
    assert flat_lines("plain text") == "plain text"


def test_routed_tools_come_with_the_task_so_every_run_shares_the_system_turn() -> None:
    from inference.formats import JsonProtocol, WorkedExample

    fmt = JsonProtocol()
    example = WorkedExample("What is 2 plus 2?", (), "4")
    history = [{"role": "user", "content": "Read /tmp/a.txt"}]
    time_msgs, _ = fmt.messages("Be brief.", TIME_TOOLS, [example], history, task_index=0)
    fs_msgs, _ = fmt.messages("Be brief.", FS_TOOLS, [example], history, task_index=0)
    # the system turn and the examples are the same prefix whatever the routing picked
    assert time_msgs[:-1] == fs_msgs[:-1]
    assert "get_current_time" not in time_msgs[0]["content"]
    task_turn = fs_msgs[-1]["content"]
    assert task_turn.startswith("Tools:\n") and task_turn.endswith("Task: Read /tmp/a.txt")
    assert all(t.name in task_turn for t in FS_TOOLS)
    # without a task index the tools stay in the system turn, as before
    plain, _ = fmt.messages("Be brief.", FS_TOOLS, [example], history)
    assert FS_TOOLS[0].name in plain[0]["content"] and plain[-1]["content"] == "Read /tmp/a.txt"


class _RecordingBackend:
    """Records each stage's request and answers it with a fixed text (the model is not what is tested here)."""

    supports_prefix = True

    def __init__(self, text: str) -> None:
        self.text = text
        self.requests: list[Any] = []

    async def generate(self, request: Any) -> Any:
        from agent_runtime.agents.llm import GenerationChunk

        self.requests.append(request)
        yield GenerationChunk(self.text, self.text, True, "stop", 10, 3, 0)


@pytest.mark.anyio
async def test_the_decision_that_may_answer_is_biased_toward_the_last_results() -> None:
    from agent_runtime.agents.guided import COPY_BIAS, COPY_RESULTS, guided_turn
    from agent_runtime.agents.llm import GenerationRequest

    context = GroundingContext()
    context.add("How much did the monitor cost?")

    async def decide(allow_answer: bool, quote: bool = True) -> Any:
        backend = _RecordingBackend('answer": "329.50"}')
        turn = guided_turn(
            backend,
            GenerationRequest(messages=[]),
            TIME_TOOLS,
            [TIME_TOOLS[0].name],
            context,
            allow_answer=allow_answer,
            deadline=float("inf"),
            quote=quote,
        )
        async for _ in turn:
            pass
        return backend.requests[0]

    first = await decide(True)
    assert first.copy_text == "" and first.copy_bias == 0.0  # nothing seen yet: no bias
    for n in range(COPY_RESULTS + 1):
        context.add_result(f"result {n}: Monitor,hardware,329.50")
    later = await decide(True)
    assert later.copy_bias == COPY_BIAS > 0
    assert later.copy_text.splitlines() == [f"result {n}: Monitor,hardware,329.50" for n in range(1, 3)]
    assert "How much" not in later.copy_text  # the task is not a result
    assert later.copy_focus == ""
    context.focus = ["amount: 329.50", "Monitor,hardware,329.50"]
    focused = await decide(True)
    assert focused.copy_focus.splitlines() == ["329.50", "Monitor,hardware,329.50"]  # values, not keys
    # the answer starts with those values unless the agent's `quote_results` is off
    assert "329\\\\.50;\\\\ Monitor" in focused.grammar.payload
    assert "329\\\\.50;\\\\ Monitor" not in (await decide(True, quote=False)).grammar.payload
    forced = await decide(False)  # a step that must call a tool is not biased toward what it read
    assert forced.copy_bias == 0.0


def test_a_tool_that_makes_something_takes_the_name_the_task_gives_it() -> None:
    create_branch = {
        "type": "object",
        "properties": {
            "repo_path": {"title": "Repo Path", "type": "string"},
            "branch_name": {"title": "Branch Name", "type": "string"},
        },
        "required": ["repo_path", "branch_name"],
    }
    context = GroundingContext()
    context.add("Create a new branch called release-1.0 in the repo at /tmp/repo.")
    grounded = ground_schema(create_branch, context, read_only=False)
    assert grounded["properties"]["branch_name"]["enum"] == ["release-1.0"]
    assert (
        grounded["properties"]["repo_path"]["enum"][0] == "/tmp/repo"
    )  # its path stays a path the run has seen
    quoted = GroundingContext()
    quoted.add("Make a branch 'hotfix' in /tmp/repo")
    assert ground_schema(create_branch, quoted, read_only=False)["properties"]["branch_name"]["enum"] == [
        "hotfix"
    ]
    # a tool that only reads, or a task that gives no name, leaves the name free (bounded)
    assert "enum" not in ground_schema(create_branch, context, read_only=True)["properties"]["branch_name"]
    unnamed = GroundingContext()
    unnamed.add("Make a new branch in /tmp/repo")
    free = ground_schema(create_branch, unnamed, read_only=False)["properties"]["branch_name"]
    assert "enum" not in free and free["maxLength"] > 0


GIT_TOOLS = [
    ToolSpec(
        "git__git_add",
        "Adds file contents to the staging area",
        {
            "type": "object",
            "properties": {
                "repo_path": {"type": "string"},
                "files": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["repo_path", "files"],
        },
        "git",
        False,
    ),
    ToolSpec(
        "git__git_commit",
        "Records changes to the repository",
        {
            "type": "object",
            "properties": {"repo_path": {"type": "string"}, "message": {"type": "string"}},
            "required": ["repo_path", "message"],
        },
        "git",
        False,
    ),
    ToolSpec(
        "git__git_log",
        "Shows the commit logs",
        {"type": "object", "properties": {"repo_path": {"type": "string"}}, "required": ["repo_path"]},
        "git",
        True,
    ),
]


def test_the_folders_of_a_path_do_not_vote_for_tools() -> None:
    from agent_runtime.agents.routing import path_blind

    assert path_blind("Stage TODO.txt in /srv/git-commit-tools/repo now") == "Stage TODO.txt in repo now"
    assert path_blind("read /tmp/a/notes.txt and /tmp/b/") == "read notes.txt and b"
    task = "Stage TODO.txt in /srv/git-commit-tools/repo and commit it with the message 'Add TODO list'."
    # the folder's name says "commit": without path_blind the first part routed to git_commit and the plan was lost
    assert plan_route(task, GIT_TOOLS, None, evidence).plan == ("git__git_add", "git__git_commit")


def test_finding_out_from_a_file_is_reading_it_not_searching() -> None:
    search = SEARCH
    task = "Find out who owns Project Alpha from /tmp/f/projects/alpha.txt"
    assert _best(task, [*FS_TOOLS, search]) == "fs__read_text_file"
    assert _best("Find the files matching *.csv in /tmp/f", [*FS_TOOLS, search]) == "fs__search_files"


FILE_INFO = ToolSpec(
    "fs__get_file_info",
    "Retrieve detailed metadata about a file or directory.",
    {"type": "object", "properties": {"path": PATH}, "required": ["path"]},
    "fs",
    True,
)


def test_what_a_tools_path_names_comes_from_its_name_and_first_sentence() -> None:
    from agent_runtime.agents.grounding import path_kinds, path_operand

    kinds = {t.name: path_operand(t.name, t.description) for t in [*FS_TOOLS, SEARCH, FILE_INFO]}
    assert kinds == {
        "fs__read_text_file": "file",
        "fs__list_directory": "folder",
        "fs__create_directory": "folder",
        "fs__move_file": None,  # "files and directories"
        "fs__search_files": "folder",  # it searches recursively from a folder
        "fs__get_file_info": None,  # "a file or directory"
    }
    assert path_kinds("What's in /tmp/f/todo.md?") == {"file"}
    assert path_kinds("What files are in /tmp/f?") == {"folder"}
    assert path_kinds("Save notes.txt in /tmp/f/") == {"file", "folder"}


def test_a_folder_tool_is_not_routed_a_file_and_a_file_tool_not_a_folder() -> None:
    tools = [*FS_TOOLS, SEARCH, FILE_INFO]
    todo = "Which items in my to-do list (/tmp/f/todo.md) are not done yet?"
    read, listing = FS_TOOLS[0], FS_TOOLS[1]
    # "list" is in the task's words, but the path is a file: a folder tool fails on it with "not a directory"
    assert evidence(listing.parameters, todo, listing.description, listing.name) < 0
    assert evidence(read.parameters, todo, read.description, read.name) > 0
    assert (
        _best("In /tmp/f/budget.csv, which item is in the furniture category?", tools) == "fs__read_text_file"
    )
    assert _best("What files are in /tmp/f?", FS_TOOLS) == "fs__list_directory"
    assert evidence(SEARCH.parameters, "/tmp/f/budget.csv", SEARCH.description, SEARCH.name) < evidence(
        SEARCH.parameters, "/tmp/f", SEARCH.description, SEARCH.name
    )


def test_a_question_answered_by_reading_outranks_a_tool_that_changes_something() -> None:
    # git_commit has the most words in common with it ("commit", "message"), but it would make a commit
    assert _best("What was the last commit message in /tmp/r/repo?", GIT_TOOLS) == "git__git_log"
    # a request phrased as a question is not a question about what is
    assert _best("Can you commit it in /tmp/r/repo with the message 'x'?", GIT_TOOLS) == "git__git_commit"


def test_a_question_whose_parts_need_tools_of_two_servers_is_planned() -> None:
    task = (
        "Read /tmp/f/budget.csv and add the prices of the laptop and the office chair with the sum tool. "
        "What's the total?"
    )
    # the sum's numbers come from the file: the later part is not marked down for not stating them
    assert plan_route(task, [*FS_TOOLS, SEARCH, SUM], None, evidence).plan == (
        "fs__read_text_file",
        "everything__get-sum",
    )
    one_server = plan_route(
        "In /tmp/f/budget.csv, which item is in the furniture category?", [*FS_TOOLS, SEARCH], None, evidence
    )
    assert one_server.plan == ()


@pytest.mark.smollm2
def test_an_answer_copies_its_numbers_from_the_run(grammars: tuple[GrammarCompilerCache, Any]) -> None:
    from agent_runtime.agents.guided import answer_schema

    context = GroundingContext()
    context.add("How much did the monitor cost? It's in /tmp/f/budget.csv.")
    assert answer_schema(context) == {"type": "string", "minLength": 1}  # no result yet: any answer
    context.add_result("item,category,amount\nLaptop,hardware,1299.00\nMonitor,hardware,329.50")
    decide = decision_spec(["fs__read_text_file"], allow_answer=True, context=context)
    assert _accepts(grammars, decide, 'answer": "The monitor cost 329.50 (see budget.csv)."}')
    assert _accepts(grammars, decide, 'answer": "Laptop: 1299.00, monitor: 329.50"}')
    assert not _accepts(grammars, decide, 'answer": "The monitor cost 129.50."}')  # two values blended
    assert not _accepts(grammars, decide, 'answer": "About 330."}')  # a number nobody wrote
    assert _accepts(grammars, decide, 'tool": "fs__read_text_file"')
    assert _accepts(grammars, decide, 'answer": "329.50"}')
    assert not _accepts(grammars, decide, 'answer": "1299.00329.50"}')  # two numbers run together


def test_records_to_make_are_grounded_field_by_field_with_the_names_the_task_writes() -> None:
    from agent_runtime.agents.grounding import capitalised_names

    add_observations = {
        "type": "object",
        "properties": {
            "observations": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "entityName": {"type": "string"},
                        "contents": {"type": "array", "items": {"type": "string"}},
                    },
                    "required": ["entityName", "contents"],
                },
            }
        },
        "required": ["observations"],
    }
    context = GroundingContext()
    context.add("Add to my knowledge graph that Priya's favourite drink is mint tea.")
    record = ground_schema(add_observations, context, read_only=False)["properties"]["observations"]["items"]
    assert record["properties"]["entityName"]["enum"] == ["Priya"]
    assert record["properties"]["contents"]["maxItems"] > 0  # bounded, as a top-level array is
    # after a result the thing may be named there ("store that person"): the task's names are no longer the only ones
    context.add_result("Owner: Kenji Watanabe")
    record = ground_schema(add_observations, context, read_only=False)["properties"]["observations"]["items"]
    assert "enum" not in record["properties"]["entityName"]
    assert capitalised_names("Where does Priya work? Ask Acme Corp in Tokyo.") == [
        "Priya",
        "Acme Corp",
        "Tokyo",
    ]
    assert capitalised_names("Remember this: Tomás lives in Porto.") == ["Tomás", "Porto"]


def test_each_step_of_a_plan_takes_the_paths_of_its_own_part() -> None:
    write = WRITE
    task = "Read /tmp/f/budget.csv, add up the hardware amounts and write the total to /tmp/f/total.txt."
    r = plan_route(task, [*FS_TOOLS, write], None, evidence)
    assert r.plan == ("fs__read_text_file", "fs__write_file")
    context = GroundingContext()
    context.add(task)
    read_path = ground_schema(FS_TOOLS[0].parameters, context.for_part(r.part_of("fs__read_text_file")))
    write_path = ground_schema(
        write.parameters, context.for_part(r.part_of("fs__write_file")), read_only=False
    )
    assert read_path["properties"]["path"]["enum"] == ["/tmp/f/budget.csv"]
    # without the parts, the write could overwrite the file it was asked to read
    assert write_path["properties"]["path"]["enum"] == ["/tmp/f/total.txt"]
    assert ground_schema(write.parameters, context, read_only=False)["properties"]["path"]["enum"] == [
        "/tmp/f/budget.csv",
        "/tmp/f/total.txt",
    ]
    assert context.for_part("add up the hardware amounts") is context  # a part without paths: the run's
    assert r.part_of("fs__list_directory") is None


@pytest.mark.smollm2
def test_an_answer_starts_with_the_lines_that_fit(grammars: tuple[GrammarCompilerCache, Any]) -> None:
    from agent_runtime.agents.guided import answer_quote

    context = GroundingContext()
    context.add("In /tmp/f/budget.csv, which item is in the furniture category?")
    context.add_result("item,category,amount\nLaptop,hardware,1299.00\nOffice chair,furniture,249.99")
    context.focus = ["Office chair,furniture,249.99"]
    quote = answer_quote(context.focus)
    decide = decision_spec(["fs__read_text_file"], allow_answer=True, context=context, quote=quote)
    assert _accepts(grammars, decide, 'answer": "Office chair,furniture,249.99 is the furniture item."}')
    assert _accepts(grammars, decide, 'answer": "Office chair,furniture,249.99"}')
    assert not _accepts(grammars, decide, 'answer": "Laptop,hardware,1299.00"}')
    assert not _accepts(grammars, decide, 'answer": "Office chair,furniture,249.991"}')
    assert answer_quote(
        ['entities[0].observations: ["works at Acme Corp", "likes tea"]', "temperature: 36"]
    ) == ("works at Acme Corp, likes tea; 36")
    assert answer_quote(['note: say "hi"']) == ""  # a quote the answer's grammar would have to escape


@pytest.mark.smollm2
def test_after_the_quote_an_answer_adds_only_the_numbers_it_has_not_quoted(
    grammars: tuple[GrammarCompilerCache, Any],
) -> None:
    """A quoted datetime is not followed by a datetime of the model's own made from its digits (what SmolLM2 wrote
    after "2026-03-14T14:26:53+09:00 (Saturday) in Tokyo"); a number of the result the quote does not hold is."""
    from agent_runtime.agents.guided import answer_quote

    context = GroundingContext()
    context.add("When it is 9:00 in Tokyo, what time is it in Paris?")
    context.add_result("target.datetime: 2026-03-14T01:00:00+01:00\ntime_difference: -8.0h")
    context.focus = ["target.datetime: 2026-03-14T01:00:00+01:00"]
    quote = answer_quote(context.focus)
    decide = decision_spec([], allow_answer=True, context=context, quote=quote)
    assert _accepts(grammars, decide, 'answer": "2026-03-14T01:00:00+01:00 (Saturday) in Paris."}')
    assert _accepts(grammars, decide, 'answer": "2026-03-14T01:00:00+01:00 is -8.0h from Tokyo."}')
    assert not _accepts(grammars, decide, 'answer": "2026-03-14T01:00:00+01:00 (2026-14-14T01:00)"}')
    assert not _accepts(grammars, decide, 'answer": "2026-03-14T01:00:00+01:00, 9:00 in Tokyo"}')


def test_a_configs_examples_show_their_results_as_a_guided_run_shows_results() -> None:
    """A hand-written example's JSON result is shown as the run's own results are: flat lines, then the lines
    that fit its task under "Most relevant:" (the demo's examples, shown raw, taught the model nothing about the
    flat result it then read)."""
    from agent_runtime.agents.guided import shown_guided
    from inference.formats import ExampleCall, WorkedExample

    result = json.dumps(
        {"timezone": "Europe/Berlin", "datetime": "2024-05-06T09:41:00+02:00", "day_of_week": "Monday"}
    )
    example = WorkedExample(
        "What time is it in Berlin?",
        (ExampleCall("time__get_current_time", {"timezone": "Europe/Berlin"}, result),),
        "The current time in Berlin is 2024-05-06T09:41:00+02:00 (Monday).",
    )
    shown = shown_guided(example)
    assert shown.task == example.task and shown.answer == example.answer
    assert shown.calls[0].arguments == {"timezone": "Europe/Berlin"}
    assert shown.calls[0].result == (
        "timezone: Europe/Berlin\ndatetime: 2024-05-06T09:41:00+02:00\nday_of_week: Monday"
        "\n\nMost relevant:\ndatetime: 2024-05-06T09:41:00+02:00"
    )
    plain = WorkedExample("List the files.", (ExampleCall("fs__list", {}, "[FILE] a.txt"),), "a.txt")
    assert shown_guided(plain).calls[0].result.startswith("[FILE] a.txt")  # text stays text


def test_a_tasks_parts_start_with_what_to_do() -> None:
    from agent_runtime.agents.routing import task_parts

    # a list of things, or a sentence that says where, is no step of its own
    assert task_parts(
        "Write a shopping list with milk, eggs and bread to /tmp/f/shopping.txt, one per line."
    ) == ["Write a shopping list with milk eggs bread to /tmp/f/shopping.txt one per line."]
    assert len(task_parts("Who owns Project Beta? The details are in /tmp/f/projects/beta.txt")) == 1
    assert task_parts(
        "Read /tmp/f/budget.csv, add up the hardware amounts and write the total to /tmp/f/t.txt."
    ) == [
        "Read /tmp/f/budget.csv",
        "add up the hardware amounts",
        "write the total to /tmp/f/t.txt.",
    ]


def test_a_question_never_plans_a_change_and_quoted_text_does_not_vote() -> None:
    from agent_runtime.agents.routing import path_blind

    write = WRITE
    elsewhere = ToolSpec("other__write_file", write.description, write.parameters, "other", False)
    # a question whose parts route to two servers is planned only when every step reads
    task = "What is written in /tmp/f/notes.txt? Write it to /tmp/f/copy.txt?"
    assert plan_route(task, [*FS_TOOLS, elsewhere], None, evidence).plan == ()
    unstated = ToolSpec("other__write_file", write.description, write.parameters, "other", None)
    assert plan_route(task, [*FS_TOOLS, unstated], None, evidence).plan == (
        "fs__read_text_file",
        "other__write_file",
    )
    assert path_blind("commit it with the message 'Add TODO list'.") == "commit it with the message ''."
    assert path_blind("What's Priya's job?") == "What's Priya's job?"  # apostrophes are not quotes
    task = "Stage TODO.txt in /tmp/r/repo and commit it with the message 'Add TODO list'."
    assert plan_route(task, GIT_TOOLS, None, evidence).plan == ("git__git_add", "git__git_commit")


def test_a_path_arguments_own_name_says_what_it_names() -> None:
    branches = ToolSpec(
        "git__git_branch",
        "List Git branches",
        {"type": "object", "properties": {"repo_path": {"type": "string"}}, "required": ["repo_path"]},
        "git",
        True,
    )
    on_file = evidence(
        branches.parameters, "Which items in my to-do list (/tmp/f/todo.md) are open?", "", branches.name
    )
    on_repo = evidence(branches.parameters, "List the branches of /tmp/f/repo", "", branches.name)
    assert on_file < 0 < on_repo  # a repository is a folder, whatever the tool's name says
