"""Render an `Example` to text plus the character spans that are trained (the answers), and build generation prompts.

The tokenizer's own chat template is used when it has one; otherwise a named built-in template: `alpaca` (the
Stanford Alpaca prompt) or `chatml`. Rendering is text-level so that the whole example is tokenized in one call and
the trained tokens are found from the tokenizer's character offsets.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from slimtune.data.formats import Example
from slimtune.data.readers import one_line
from slimtune.errors import DataError

# The Stanford Alpaca prompt (Taori et al. 2023, "Stanford Alpaca: An Instruction-following LLaMA model",
# github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT). As there, the answer follows "### Response:" directly
# and is followed by the EOS token.
ALPACA_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                         "context. Write a response that appropriately completes the request.\n\n")
ALPACA_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes " \
                  "the request.\n\n"


@dataclass(frozen=True)
class BuiltinTemplate:
    """A prompt format for tokenizers without a chat template. Fields are `str.format` patterns.

    system / user: untrained turns ({content}); first_user / first_user_input: the first user turn, without and
    with an alpaca `input` ({content}, {input}); assistant_prefix: untrained text before an answer; assistant_end:
    trained text after it (then EOS, trained); turn_sep: untrained text after the answer.
    """

    name: str
    system: str
    user: str
    first_user: str
    first_user_input: str
    assistant_prefix: str
    assistant_end: str
    turn_sep: str
    tool: str | None = None  # an untrained tool-result turn ({content}); None where the format has none


TEMPLATES: dict[str, BuiltinTemplate] = {
    "alpaca": BuiltinTemplate(
        name="alpaca", system="{content}\n\n",
        user="\n\n### Instruction:\n{content}\n\n### Response:",
        first_user=ALPACA_PREAMBLE + "### Instruction:\n{content}\n\n### Response:",
        first_user_input=ALPACA_PREAMBLE_INPUT + "### Instruction:\n{content}\n\n### Input:\n{input}\n\n### Response:",
        assistant_prefix="", assistant_end="", turn_sep=""),
    "chatml": BuiltinTemplate(
        name="chatml", system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n", first_user="<|im_start|>user\n{content}<|im_end|>\n",
        first_user_input="<|im_start|>user\n{content}\n\n{input}<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n", assistant_end="<|im_end|>", turn_sep="\n",
        tool="<|im_start|>tool\n{content}<|im_end|>\n"),
}
TEMPLATE_NAMES = ("auto", "tokenizer", *TEMPLATES)

Segments = list[tuple[str, bool]]  # (text, trained) in order


def _join(segs: Segments) -> tuple[str, list[tuple[int, int]]]:
    """Concatenate segments; return the text and the [start, end) character spans of the trained ones."""
    text, spans, pos = [], [], 0
    for s, trained in segs:
        if trained and s:
            spans.append((pos, pos + len(s)))
        text.append(s)
        pos += len(s)
    return "".join(text), spans


def tool_call_text(calls: list) -> str:
    """Tool calls as ChatML models write them (the Hermes / Qwen2.5 convention): one
    <tool_call>\n{"name": ..., "arguments": ...}\n</tool_call> per call, newline-separated."""
    out = []
    for c in calls:
        fn = c.get("function", c)
        out.append("<tool_call>\n" + json.dumps({"name": fn["name"], "arguments": fn.get("arguments")},
                                                ensure_ascii=False) + "\n</tool_call>")
    return "\n".join(out)


def _merged(ex: Example) -> list[dict[str, Any]]:
    """Messages with the alpaca `input` appended to the first user turn (for templates without an input slot)."""
    msgs = [dict(m) for m in ex.messages]
    if ex.input:
        for m in msgs:
            if m["role"] == "user":
                m["content"] = m["content"] + "\n\n" + ex.input
                break
    return msgs


class Renderer:
    """Turns Examples into (text, trained spans) and prompts. Build with `get_renderer`.

    Attributes:
        name: "tokenizer", "alpaca", "chatml" or "text".
        add_special_tokens: what to pass to the tokenizer (False for chat templates, which write BOS themselves).
    """

    def __init__(self, tokenizer: Any, name: str, add_eos: bool = True) -> None:
        self.tok, self.name, self.add_eos = tokenizer, name, add_eos
        self.eos = getattr(tokenizer, "eos_token", None) or ""
        self.add_special_tokens = name != "tokenizer"
        self.builtin = TEMPLATES.get(name)

    # ---- built-in templates --------------------------------------------------------------------------------------
    def _answer(self, body: str, trained: bool) -> Segments:
        """An assistant turn of a built-in template: prefix, the answer with its end (and EOS), separator."""
        t = self.builtin
        eos = self.eos if self.add_eos and self.eos != t.assistant_end else ""
        return [(t.assistant_prefix, False), (body + t.assistant_end + eos, trained), (t.turn_sep, False)]

    def _builtin(self, ex: Example, generation: bool) -> Segments:
        t, segs, first_user = self.builtin, [], True
        msgs = ex.messages[:-1] if generation and ex.messages and ex.messages[-1]["role"] == "assistant" \
            else ex.messages
        for i, m in enumerate(msgs):
            if m["role"] == "system":
                segs.append((t.system.format(content=m["content"]), False))
            elif m["role"] == "user":
                pat = (t.first_user_input if ex.input else t.first_user) if first_user else t.user
                segs.append((pat.format(content=m["content"], input=ex.input), False))
                first_user = False
            elif m["role"] == "tool" or m.get("tool_calls"):
                if t.tool is None:
                    raise DataError(f"{ex.where}: the {t.name} template has no tool turns; fix: set template=chatml "
                                    f"or use a tokenizer whose chat template handles tools")
                if m["role"] == "tool":
                    segs.append((t.tool.format(content=m["content"]), False))
                else:
                    sep = "\n" if m["content"] else ""
                    segs += self._answer(m["content"] + sep + tool_call_text(m["tool_calls"]), i >= ex.context)
            else:
                segs += self._answer(m["content"], i >= ex.context)
        if generation:
            segs.append((t.assistant_prefix, False))
        return segs

    # ---- the tokenizer's chat template ----------------------------------------------------------------------------
    def _apply(self, ex: Example, msgs: list[dict[str, str]], gen: bool) -> str:
        try:
            return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # jinja raises its own errors (e.g. "roles must alternate")
            raise DataError(f"{ex.where}: the tokenizer's chat template refused this conversation "
                            f"({one_line(e, 60)}); fix: fix the turn order or set template=chatml") from None

    def _chat_template(self, ex: Example) -> Segments:
        """Render prefixes: conv[:i] + generation prompt, then conv[:i+1]; the difference is answer i.

        Needs templates whose renders of a shorter conversation are prefixes of longer ones (true of the common
        ones); otherwise the answers could not be located and a DataError asks for a built-in template.
        """
        msgs, segs, done = _merged(ex), [], ""
        for i, m in enumerate(msgs):
            if m["role"] != "assistant" or i < ex.context:  # prompt turns (TRL) are context, rendered later
                continue
            prefix = self._apply(ex, msgs[:i], True)
            full = self._apply(ex, msgs[:i + 1], False)
            if not (prefix.startswith(done) and full.startswith(prefix)):
                raise DataError(f"{ex.where}: the tokenizer's chat template does not render conversations "
                                f"incrementally, so answers cannot be located; fix: set template=chatml or alpaca")
            answer = full[len(prefix):]
            for c in m.get("tool_calls") or []:
                if c.get("function", c)["name"] not in answer:
                    raise DataError(f"{ex.where}: the tokenizer's chat template does not write tool_calls, so the "
                                    f"call would not be learned; fix: use a template that renders tool_calls, or "
                                    f"template=chatml")
            body = answer.rstrip()  # trailing newlines after the end-of-turn token stay untrained
            segs += [(prefix[len(done):], False), (body, True), (answer[len(body):], False)]
            done = full
        if msgs[-1]["role"] != "assistant":  # turns after the last answer: context only
            rest = self._apply(ex, msgs, False)
            if rest.startswith(done):
                segs.append((rest[len(done):], False))
        if self.add_eos and self.eos and not done.rstrip().endswith(self.eos):
            segs.append((self.eos, True))  # the answer is followed by EOS, so generation learns to stop
        return segs

    # ---- public -----------------------------------------------------------------------------------------------------
    def segments(self, ex: Example) -> Segments:
        """The example as ordered (text, trained) pieces: answers (and their end/EOS tokens) trained, the rest not."""
        if ex.text is not None:  # plain text, after a TRL standard prompt when there is one
            return [(ex.prompt or "", False), (ex.text + (self.eos if self.add_eos else ""), True)]
        if self.builtin is not None:
            return self._builtin(ex, generation=False)
        return self._chat_template(ex)

    def render(self, ex: Example) -> tuple[str, list[tuple[int, int]]]:
        """(full text, [start, end) character spans of the trained text)."""
        return _join(self.segments(ex))

    def prompt(self, ex: Example) -> str:
        """The text a model continues to answer `ex` (its final assistant turn, if any, left out)."""
        if ex.text is not None:
            return ex.prompt if ex.prompt is not None else ex.text
        if self.builtin is not None:
            return _join(self._builtin(ex, generation=True))[0]
        msgs = _merged(ex)
        if msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        return self._apply(ex, msgs, True)


def get_renderer(tokenizer: Any, template: str = "auto", fmt: str = "alpaca", add_eos: bool = True) -> Renderer:
    """Choose how examples become text.

    Args:
        tokenizer: a Hugging Face tokenizer.
        template: "auto" (the tokenizer's chat template if it has one, else "alpaca" for alpaca data and "chatml"
            for conversations), "tokenizer", "alpaca" or "chatml". Plain-text data ignores templates.
        fmt: the data format (see `formats.FORMATS`).
        add_eos: append the tokenizer's EOS after answers (built-in templates: after every answer; chat templates:
            after the last, unless the template already ends it with EOS; text: after the text).
    Raises:
        DataError: unknown template, or "tokenizer" for a tokenizer without a chat template.
    """
    if template not in TEMPLATE_NAMES:
        raise DataError(f"template '{template}' is unknown; fix: use one of {', '.join(TEMPLATE_NAMES)}")
    if fmt == "text":
        return Renderer(tokenizer, "text", add_eos)
    has_own = bool(getattr(tokenizer, "chat_template", None))
    if template == "tokenizer" and not has_own:
        raise DataError("template 'tokenizer' was asked for but the tokenizer has no chat template; "
                        "fix: set template=alpaca or template=chatml")
    if template == "auto":
        template = "tokenizer" if has_own else ("alpaca" if fmt == "alpaca" else "chatml")
    return Renderer(tokenizer, template, add_eos)
