"""The lines of a tool's result that answer the task, repeated after it for a small model."""

from __future__ import annotations

from agent_runtime.agents.focus import FOCUS_HEADING, focus_lines, focus_note, names_in

CONVERTED = """source.timezone: Europe/London
source.datetime: 2026-03-14T15:00:00+00:00
source.day_of_week: Saturday
source.is_dst: false
target.timezone: Australia/Sydney
target.datetime: 2026-03-15T02:00:00+11:00
target.day_of_week: Sunday
target.is_dst: true
time_difference: +11.0h"""
NOW = """timezone: Pacific/Honolulu
datetime: 2026-03-13T19:26:53-10:00
day_of_week: Friday
is_dst: false"""
BUDGET = """item,category,amount
Laptop,hardware,1299.00
Monitor,hardware,329.50
Office chair,furniture,249.99
Coffee beans,supplies,36.75"""
GRAPH = """entities[0].name: Priya
entities[0].entityType: person
entities[0].observations: ["works at Acme Corp", "prefers email over phone"]
entities[1].name: Acme Corp
entities[1].entityType: company
entities[1].observations: ["based in Rotterdam"]"""


def test_a_converted_time_is_the_targets_not_the_one_the_task_gave() -> None:
    task = "If I schedule a call for 3 pm London time, what time will that be in Sydney?"
    assert focus_lines(task, CONVERTED) == ["target.datetime: 2026-03-15T02:00:00+11:00"]
    # the other way round, the other record
    back = "If it's 2:00 in Sydney, what time is it in London?"
    flipped = CONVERTED.replace("15:00:00+00:00", "15:00:00+00:00")
    assert focus_lines(back, flipped.replace("02:00", "02:00"))[0].startswith("source.datetime")


def test_the_key_says_what_is_asked_and_the_subject_is_not_the_answer() -> None:
    assert focus_lines("What's today's date in Honolulu?", NOW) == ["datetime: 2026-03-13T19:26:53-10:00"]
    assert focus_lines("What day of the week is it in Honolulu?", NOW) == ["day_of_week: Friday"]
    # lower-case places are names too: "london" is the subject, not the answer
    london = NOW.replace("Pacific/Honolulu", "Europe/London")
    assert focus_lines("hey, whats the time in london", london) == ["datetime: 2026-03-13T19:26:53-10:00"]


def test_csv_rows_about_the_task_and_records_about_its_names() -> None:
    # a row is shown with its columns' names: "Monitor,hardware,329.50" runs a name into its number
    assert focus_lines("How much did the monitor cost?", BUDGET) == [
        "item: Monitor, category: hardware, amount: 329.50"
    ]
    assert focus_lines("Add the prices of the laptop and the office chair", BUDGET) == [
        "item: Laptop, category: hardware, amount: 1299.00",
        "item: Office chair, category: furniture, amount: 249.99",
    ]
    assert focus_lines("Where does Priya work?", GRAPH) == [
        'entities[0].observations: ["works at Acme Corp", "prefers email over phone"]'
    ]
    assert focus_lines("Which city is Acme Corp based in?", GRAPH) == [
        'entities[1].observations: ["based in Rotterdam"]'
    ]


def test_nothing_is_pointed_at_when_nothing_stands_out() -> None:
    assert focus_lines("What is 2 plus 3?", "5") == []
    assert focus_lines("Tell me a joke", NOW) == []
    assert focus_note(focus_lines("Tell me a joke", NOW)) == ""
    note = focus_note(focus_lines("How much did the monitor cost?", BUDGET))
    assert note == f"\n\n{FOCUS_HEADING}\nitem: Monitor, category: hardware, amount: 329.50"
    assert names_in("Where does Priya work? Ask Acme Corp in Tokyo.") >= {"priya", "acme", "corp", "tokyo"}
    assert "where" not in names_in("Where does Priya work?")


def test_numbers_for_arguments_come_from_the_lines_that_fit() -> None:
    from agent_runtime.agents.grounding import GroundingContext, ground_schema

    task = "Look up the prices of the laptop and the office chair and add them with the sum tool."
    context = GroundingContext()
    context.add(task)
    context.add_result(BUDGET)
    schema = {"type": "object", "properties": {"a": {"type": "number"}}, "required": ["a"]}
    assert ground_schema(schema, context)["properties"]["a"]["enum"] == [1299.0, 329.5, 249.99, 36.75]
    context.focus = focus_lines(task, BUDGET)
    assert ground_schema(schema, context)["properties"]["a"]["enum"] == [1299.0, 249.99]


def test_the_generic_examples_show_results_as_a_guided_run_shows_them() -> None:
    from agent_runtime.agents.guided import GUIDED_EXAMPLES

    results = [call.result for ex in GUIDED_EXAMPLES for call in ex.calls]
    assert any(f"\n\n{FOCUS_HEADING}\n" in r for r in results)
    assert not any(r.lstrip().startswith("{") for r in results)  # flat lines, as observations are shown


def test_two_numbers_for_two_arguments_take_one_each() -> None:
    from agent_runtime.agents.grounding import GroundingContext, ground_schema

    task = "Look up the prices of the laptop and the office chair and add them with the sum tool."
    context = GroundingContext()
    context.add(task)
    context.add_result(BUDGET)
    context.focus = focus_lines(task, BUDGET)
    schema = {
        "type": "object",
        "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
        "required": ["a", "b"],
    }
    props = ground_schema(schema, context)["properties"]
    assert (props["a"]["enum"], props["b"]["enum"]) == ([1299.0], [249.99])
    context.focus = []  # five numbers seen for two arguments: the model picks
    props = ground_schema(schema, context)["properties"]
    assert props["a"]["enum"] == props["b"]["enum"] == [1299.0, 329.5, 249.99, 36.75]


LOG = """Commit history:
Commit: d00ede95
Author: Grace Hopper
Message: Fix rounding in temperature display

Commit: ddee3981
Author: Grace Hopper
Message: Add sensor reader

Commit: 5b1f0c2a
Author: Ada Lovelace
Message: Initial commit"""


def test_a_log_shows_the_newest_first_and_a_list_is_not_cut_to_two() -> None:
    assert (
        focus_lines("What was the last commit message?", LOG)[0]
        == "Message: Fix rounding in temperature display"
    )
    assert focus_lines("Who made the first commit?", LOG) == ["Author: Ada Lovelace", "Author: Grace Hopper"]
    listing = "[FILE] budget.csv\n[FILE] notes.txt\n[DIR] projects\n[FILE] todo.md"
    assert focus_lines("What files are in /tmp/f?", listing) == []
    weather = "temperature: 36\nconditions: Light rain / drizzle\nhumidity: 82"
    assert set(
        focus_lines("What's the weather in Chicago? Give me the temperature and conditions.", weather)
    ) == {
        "temperature: 36",
        "conditions: Light rain / drizzle",
    }


def test_digits_in_a_path_are_no_number() -> None:
    from agent_runtime.agents.grounding import number_values

    # found in CI: pytest's tmp folder "pytest-563" in the task's path became a third candidate for two arguments
    assert number_values(["Look up the prices in /tmp/pytest-563/files/budget.csv and add 2 and 3"]) == [2, 3]
