"""The OpenAI request format, checked field by field: a request that is malformed, names an unknown model, does not fit
the context or asks for something unsupported becomes an `ApiError`, answered as OpenAI does:
{"error": {"message", "type", "param", "code"}} with a 4xx status.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

MAX_N = 16  # choices per request
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_STOP = 16  # stop strings (OpenAI allows 4)
# fields the server refuses unless they hold their neutral value (it would otherwise silently ignore them)
UNSUPPORTED = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "repetition_penalty": (1, 1.0),
               "logprobs": (False, 0), "top_logprobs": (0,), "logit_bias": ({},), "best_of": (1,), "echo": (False,),
               "suffix": ("",), "tools": ([],), "functions": ([],), "tool_choice": ("none", "auto"),
               "response_format": ({"type": "text"},)}


class ApiError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def parse_json(raw: bytes) -> dict:
    """The request body as a dict.

    Raises:
        ApiError: not UTF-8 JSON, or not an object.
    """
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def _bad(key: str, what: str) -> ApiError:
    return ApiError(400, f"`{key}` {what}", param=key, code="invalid_value")


def get_number(body: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    """body[key] (default when absent or null), a finite number in [lo, hi] ((lo, hi] with lo_open)."""
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(key, f"must be a number, got {json.dumps(v)[:40]}")
    if not math.isfinite(v):
        raise _bad(key, f"must be a finite number, got {v}")
    if v < lo or v > hi or (lo_open and v == lo):
        raise _bad(key, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
    return float(v)


def get_int(body: dict, key: str, default: int | None, lo: int, hi: int) -> int | None:
    """body[key] (default when absent or null), an integer in [lo, hi]."""
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(key, f"must be an integer, got {json.dumps(v)[:40]}")
    if not lo <= v <= hi:
        raise _bad(key, f"must be in [{lo}, {hi}], got {v}")
    return v


def get_bool(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(key, f"must be true or false, got {json.dumps(v)[:40]}")
    return v


@dataclass
class Params:
    """The generation settings of one request."""
    max_tokens: int | None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False  # vLLM's extension: token ids in each choice
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever comes
    stop_token_ids: list[int] = field(default_factory=list)  # vLLM's extension: more tokens that end the text


def parse_params(body: dict, max_tokens_keys: tuple[str, ...], vocab: int) -> Params:
    """Sampling and output settings; the first of `max_tokens_keys` present sets max_tokens (None if none is).

    Raises:
        ApiError: a value of the wrong type or out of range, or an unsupported option.
    """
    for key, neutral in UNSUPPORTED.items():
        if body.get(key) is not None and body[key] not in neutral:
            raise ApiError(400, f"`{key}` is not supported by slimtune serve", param=key, code="unsupported_parameter")
    max_tokens = None
    for key in max_tokens_keys:
        max_tokens = get_int(body, key, None, 1, 1 << 31)
        if max_tokens is not None:
            break
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise _bad("stop", f"must be a non-empty string or a list of at most {MAX_STOP} of them")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise _bad("stream_options", "must be an object")
    top_k = get_int(body, "top_k", 0, -1, 1 << 31)
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or len(stop_ids) > MAX_STOP or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in stop_ids):
        raise _bad("stop_token_ids", f"must be a list of at most {MAX_STOP} token ids in [0, {vocab})")
    return Params(max_tokens=max_tokens, temperature=get_number(body, "temperature", 1.0, 0.0, 2.0),
                  top_p=get_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True), top_k=max(top_k, 0),
                  seed=get_int(body, "seed", None, -(1 << 63), (1 << 63) - 1), n=get_int(body, "n", 1, 1, MAX_N),
                  stop=stop, stream=get_bool(body, "stream"),
                  include_usage=get_bool(opts or {}, "include_usage"),
                  return_token_ids=get_bool(body, "return_token_ids"), ignore_eos=get_bool(body, "ignore_eos"),
                  stop_token_ids=stop_ids)


def get_model(body: dict, names: list[str]) -> str:
    """The requested model name, one of `names`.

    Raises:
        ApiError: missing (400) or unknown (404, code model_not_found).
    """
    m = body.get("model")
    if not isinstance(m, str) or not m:
        raise ApiError(400, "`model` is required: the base model's name or an adapter's (see GET /v1/models)",
                       param="model", code="missing_model")
    if m not in names:
        raise ApiError(404, f"The model `{m}` does not exist; this server serves: {', '.join(names)}",
                       param="model", code="model_not_found")
    return m


def _check_ids(ids: list, vocab: int) -> list[int]:
    if not ids:
        raise ApiError(400, "the prompt is empty", param="prompt", code="invalid_value")
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
        raise _bad("prompt", f"token ids must be integers in [0, {vocab})")
    return ids


def completion_prompts(body: dict, tokenizer, vocab: int) -> list[list[int]]:
    """The token ids of each prompt: `prompt` is a string, a list of strings, a list of ids or a list of id lists.

    Raises:
        ApiError: missing, of another type, empty, too many prompts, ids out of range.
    """
    p = body.get("prompt")
    if isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(x, int) for x in p)):
        p = [p]
    if not isinstance(p, list) or not p or len(p) > MAX_PROMPTS:
        raise _bad("prompt", f"must be a string, a token id list, or a list of at most {MAX_PROMPTS} of those")
    out = []
    for x in p:
        if isinstance(x, str):
            out.append(_check_ids(tokenizer(x)["input_ids"], vocab))
        elif isinstance(x, list):
            out.append(_check_ids(x, vocab))
        else:
            raise _bad("prompt", "must be a string, a token id list, or a list of those")
    return out


def _content(m: dict, i: int) -> str:
    """A message's text: a string, or a list of {'type': 'text', 'text': ...} parts (null for an assistant turn)."""
    c = m.get("content")
    if c is None and m.get("role") == "assistant":
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(x, dict) and x.get("type") == "text" and isinstance(x.get("text"), str)
                                   for x in c):
        return "".join(x["text"] for x in c)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts (this server reads text "
                        "only)", param=f"messages[{i}].content", code="invalid_value")


def chat_prompt(body: dict, tokenizer) -> list[int]:
    """The token ids of `messages` through the tokenizer's chat template, ending with the assistant's turn.

    Raises:
        ApiError: malformed messages, a tokenizer without a chat template, a template that refuses the messages.
    """
    from slimtune.generate import chat_ids

    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "must be a non-empty list of {\"role\", \"content\"} objects")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] needs a role of system, developer, user or assistant",
                           param=f"messages[{i}].role", code="invalid_value")
        role = "system" if m["role"] == "developer" else m["role"]
        clean.append({"role": role, "content": _content(m, i)})
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages",
                       code="no_chat_template")
    try:
        return chat_ids(tokenizer, clean)
    except Exception as e:  # noqa: BLE001 - jinja templates raise what they like (e.g. roles must alternate)
        raise ApiError(400, f"the chat template refused the messages: {e}", param="messages",
                       code="invalid_value") from None


def fit_context(prompt_len: int, p: Params, default: int | None, max_len: int) -> int:
    """max_tokens for a prompt of prompt_len tokens: the requested one, else min(default, what the context leaves).

    Raises:
        ApiError: the prompt and the requested completion do not fit in max_len (code context_length_exceeded).
    """
    room = max_len - prompt_len
    if room < 1:
        raise ApiError(400, f"This model's maximum context length is {max_len} tokens, and the prompt has "
                            f"{prompt_len} tokens, which leaves no room for a completion", param="prompt",
                       code="context_length_exceeded")
    if p.max_tokens is None:
        return min(default or room, room)
    if p.max_tokens > room:
        raise ApiError(400, f"This model's maximum context length is {max_len} tokens. However, you requested "
                            f"{prompt_len + p.max_tokens} tokens ({prompt_len} in the prompt, {p.max_tokens} for "
                            "the completion)", param="max_tokens", code="context_length_exceeded")
    return p.max_tokens
