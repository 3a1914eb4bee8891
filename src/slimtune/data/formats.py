"""Recognise and check the record formats (alpaca, chat `messages`, ShareGPT `conversations`, TRL's `prompt` /
`completion`, plain `text`).

`detect_format` names the format from the fields of the first record (overridable); `to_example` validates one record
and turns it into an `Example` (a list of role/content messages, or a text); every problem is a one-line `DataError`
naming the file, the line or record index, and the fix. Messages may have the `tool` role, assistant `tool_calls`
and OpenAI-style content parts ([{"type": "text", "text": ...}], joined into one string).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from slimtune.data.readers import Record, one_line
from slimtune.errors import DataError

FORMATS = ("alpaca", "messages", "sharegpt", "prompt_completion", "text")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "tool": "tool"}
EXTRA_KEYS = ("tool_calls", "name", "tool_call_id")  # kept on a message (when not null) for chat templates
PART_SEP = "\n"  # text parts of one message are joined with a newline (as vLLM does for text-only content)


@dataclass
class Example:
    """A validated record. Chat-like records: `messages` [{role, content, (tool_calls, name, tool_call_id)}], roles
    in ROLES; the first `context` messages are never trained (TRL's conversational prompt). Plain text: `text`,
    after an untrained `prompt` (TRL's standard prompt / completion) when there is one.

    Alpaca records become [system?], user (the instruction), assistant (the output), with the alpaca `input` kept
    apart in `input` so that the alpaca template can place it under its own heading.
    """

    messages: list[dict[str, Any]] = field(default_factory=list)
    text: str | None = None
    input: str = ""
    where: str = ""
    context: int = 0
    prompt: str | None = None


def detect_format(rec: Record) -> str:
    """The format named by the fields of `rec`: messages > conversations > instruction > text.

    Raises:
        DataError: none of the known fields is present.
    """
    keys = rec.data.keys()
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "instruction" in keys:
        return "alpaca"
    if "text" in keys:
        return "text"
    raise DataError(f"{rec.where()}: cannot tell the data format from the fields {one_line(sorted(keys), 60)}; "
                    f"fix: give instruction/output, messages, conversations, prompt/completion or text fields, "
                    f"or set data_format to {'|'.join(FORMATS)}")


def _string(rec: Record, value: Any, name: str, fix: str, allow_empty: bool = False) -> str:
    """`value` if it is a string (non-empty unless allowed); otherwise a DataError about field `name`."""
    if not isinstance(value, str):
        raise DataError(f"{rec.where()}: {name} is a {type(value).__name__}, expected a string; fix: {fix}")
    if not allow_empty and not value.strip():
        raise DataError(f"{rec.where()}: {name} is empty; fix: {fix}")
    return value


def _alpaca(rec: Record) -> Example:
    d = rec.data
    for key, fix in (("instruction", "give every record an 'instruction' string (the task)"),
                     ("output", "give every record an 'output' string (the answer to learn)")):
        if key not in d or d[key] is None:
            raise DataError(f"{rec.where()}: the alpaca record has no '{key}'; fix: {fix}")
    instruction = _string(rec, d["instruction"], "'instruction'", "write the task as a non-empty string")
    output = _string(rec, d["output"], "'output'", "write the answer to learn as a non-empty string")
    inp = d.get("input")
    inp = "" if inp is None else _string(rec, inp, "'input'", "make 'input' a string ('' when there is none)", True)
    msgs = []
    if d.get("system"):
        msgs.append({"role": "system", "content": _string(rec, d["system"], "'system'", "make it a string")})
    msgs += [{"role": "user", "content": instruction}, {"role": "assistant", "content": output}]
    return Example(messages=msgs, input=inp, where=rec.where())


def _content(rec: Record, value: Any, place: str, may_be_empty: bool) -> str:
    """A message's text: a string, or a list of {"type": "text", "text": ...} parts joined by PART_SEP."""
    if isinstance(value, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
            kinds = sorted({str(p.get("type")) if isinstance(p, dict) else type(p).__name__ for p in value})
            raise DataError(f"{rec.where()}: {place}.content is a list of {one_line(', '.join(kinds), 40)}; fix: give "
                            f"a string or a list of {{\"type\": \"text\", \"text\": ...}} parts (text only)")
        value = PART_SEP.join(p["text"] for p in value)
    if value is None and may_be_empty:
        return ""
    return _string(rec, value, f"{place}.content", "give every turn non-empty text", may_be_empty)


def _tool_calls(rec: Record, calls: Any, place: str) -> list:
    """OpenAI-style tool calls: [{"type": "function", "function": {"name": ..., "arguments": ...}}] (or flat
    {"name", "arguments"})."""
    if not isinstance(calls, list) or not calls:
        raise DataError(f"{rec.where()}: {place}.tool_calls must be a non-empty list; fix: give "
                        f"[{{\"type\": \"function\", \"function\": {{\"name\": ..., \"arguments\": ...}}}}]")
    for c in calls:
        fn = c.get("function", c) if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise DataError(f"{rec.where()}: {place}.tool_calls has a call without a function name; fix: give "
                            f"each call {{\"function\": {{\"name\": ..., \"arguments\": ...}}}}")
    return calls


def _turns(rec: Record, turns: Any, key: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[dict]:
    """Check a list of turns and return them as messages (role renamed, content a string, tool fields kept)."""
    if not isinstance(turns, list) or not turns:
        what = "missing" if turns is None else ("empty" if isinstance(turns, list) else f"a {type(turns).__name__}")
        raise DataError(f"{rec.where()}: '{key}' is {what}; fix: make '{key}' a non-empty list of "
                        f"{{\"{role_key}\": ..., \"{text_key}\": ...}} objects")
    msgs = []
    for i, m in enumerate(turns):
        place = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{rec.where()}: {place} is a {type(m).__name__}, not an object; fix: write each turn "
                            f"as {{\"{role_key}\": ..., \"{text_key}\": ...}}")
        calls = m.get("tool_calls")
        if role_key not in m or (text_key not in m and calls is None):
            missing = role_key if role_key not in m else text_key
            raise DataError(f"{rec.where()}: {place} has no '{missing}'; fix: give every turn "
                            f"'{role_key}' and '{text_key}'")
        role = m[role_key]
        if not isinstance(role, str) or role.lower() not in roles:
            raise DataError(f"{rec.where()}: {place} has unknown {role_key} {one_line(repr(role), 30)}; "
                            f"fix: use one of {', '.join(roles)}")
        role = roles[role.lower()]
        msg = {"role": role, "content": _content(rec, m.get(text_key), place, calls is not None or role == "tool")}
        if calls is not None:
            if role != "assistant":
                raise DataError(f"{rec.where()}: {place} has tool_calls but role {role}; fix: only assistant turns "
                                f"call tools")
            msg["tool_calls"] = _tool_calls(rec, calls, place)
        msg.update({k: m[k] for k in EXTRA_KEYS[1:] if m.get(k) is not None})
        msgs.append(msg)
    return msgs


def _chat(rec: Record, key: str, role_key: str, text_key: str, roles: dict[str, str]) -> Example:
    """Shared check of `messages` (role/content) and ShareGPT `conversations` (from/value, roles renamed)."""
    msgs = _turns(rec, rec.data.get(key), key, role_key, text_key, roles)
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{rec.where()}: the conversation has no assistant turn, so nothing to learn; "
                        f"fix: add the assistant's answer or drop the record")
    return Example(messages=msgs, where=rec.where())


def _prompt_completion(rec: Record) -> Example:
    """TRL's prompt / completion: two strings (standard: the completion is trained after the prompt, no template),
    or two message lists (conversational: prompt turns are context, the completion's assistant turns trained)."""
    p, c = rec.data.get("prompt"), rec.data.get("completion")
    if isinstance(p, str) and isinstance(c, str):
        _string(rec, c, "'completion'", "write the text to learn as a non-empty string")
        return Example(text=c, prompt=p, where=rec.where())
    if not (isinstance(p, list) and isinstance(c, list)):
        raise DataError(f"{rec.where()}: 'prompt' is a {type(p).__name__} and 'completion' a {type(c).__name__}; "
                        f"fix: make both strings (standard) or both lists of messages (conversational)")
    role = {r: r for r in ROLES}
    prompt = _turns(rec, p, "prompt", "role", "content", role)
    completion = _turns(rec, c, "completion", "role", "content", role)
    if not any(m["role"] == "assistant" for m in completion):
        raise DataError(f"{rec.where()}: the completion has no assistant turn, so nothing to learn; fix: put the "
                        f"assistant's answer in 'completion'")
    return Example(messages=prompt + completion, where=rec.where(), context=len(prompt))


def to_example(rec: Record, fmt: str) -> Example:
    """Validate `rec` as format `fmt` (one of FORMATS) and return it as an `Example`.

    Raises:
        DataError: a missing field, a wrong type, empty text, an unknown role, a conversation with no assistant turn.
    """
    if fmt == "alpaca":
        return _alpaca(rec)
    if fmt == "messages":
        return _chat(rec, "messages", "role", "content", {r: r for r in ROLES})
    if fmt == "sharegpt":
        return _chat(rec, "conversations", "from", "value", SHAREGPT_ROLES)
    if fmt == "prompt_completion":
        return _prompt_completion(rec)
    if fmt == "text":
        if "text" not in rec.data:
            raise DataError(f"{rec.where()}: the record has no 'text'; fix: give every record a 'text' string")
        return Example(text=_string(rec, rec.data["text"], "'text'", "write non-empty text"), where=rec.where())
    raise DataError(f"data_format '{fmt}' is unknown; fix: use auto or one of {', '.join(FORMATS)}")


def to_examples(records: list[Record], fmt: str = "auto", skip_bad: bool = False,
                skipped: list[str] | None = None) -> tuple[list[Example], str]:
    """Validate every record (all of them, before any training) and return (examples, format used).

    Args:
        records: from `read_records` / `read_many`.
        fmt: "auto" (detected from the first record) or one of FORMATS.
        skip_bad: leave bad records out instead of stopping (for large scraped sets with a few empty answers);
            the message of each one is appended to `skipped` when given.
    Raises:
        DataError: no records, or (unless skip_bad) the first bad record: file, line or index, what, the fix.
    """
    if not records:
        raise DataError("no data records were given; fix: point data_path at a non-empty file")
    if fmt == "auto":
        fmt = detect_format(records[0])
    elif fmt not in FORMATS:
        raise DataError(f"data_format '{fmt}' is unknown; fix: use auto or one of {', '.join(FORMATS)}")
    if not skip_bad:
        return _same_form([to_example(r, fmt) for r in records]), fmt
    out = []
    for r in records:
        try:
            out.append(to_example(r, fmt))
        except DataError as e:
            if skipped is not None:
                skipped.append(str(e))
    if not out:
        raise DataError(f"{records[0].source}: every record is malformed for format {fmt} ({skipped[0] if skipped else ''})"
                        f"; fix: check data_format")
    return _same_form(out), fmt


def _same_form(examples: list[Example]) -> list[Example]:
    """All texts or all conversations: one template and one tokenizer call serve them all."""
    texts = [ex.text is not None for ex in examples]
    if any(texts) and not all(texts):
        i = texts.index(not texts[0])
        raise DataError(f"{examples[i].where}: the data mixes plain-text and conversation records; fix: make "
                        f"'prompt' and 'completion' strings in every record, or message lists in every record")
    return examples
