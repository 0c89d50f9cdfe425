"""JSONL training data: chat format ({"messages": [...]}) or prompt/completion. The first bad
line is reported by number with what is wrong, before any job can use the file."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from bastion.errors import InvalidRequestError

ROLES = ("system", "developer", "user", "assistant")
MAX_LINE_BYTES = 8 * 1024 * 1024


@dataclass
class Summary:
    format: str  # "chat" or "prompt_completion"
    examples: int
    tokens: int  # 0 when no tokenizer was at hand
    longest: int
    checked_with: str | None = None  # the base model whose tokenizer counted the tokens

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class InvalidFileError(InvalidRequestError):
    code = "invalid_file_format"

    def __init__(self, line: int, problem: str) -> None:
        super().__init__(f"Invalid training file: line {line}: {problem}.", param="file")


def _check_chat(messages: Any) -> str | None:
    """What is wrong with one chat example, or None."""
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of messages"
    has_assistant = False
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"messages[{i}] must be an object with 'role' and 'content'"
        role = m.get("role")
        if role not in ROLES:
            return (f"messages[{i}] has unknown role {role!r} (expected one of "
                    f"{', '.join(ROLES)})")
        content = m.get("content")
        if not isinstance(content, str):
            return f"messages[{i}].content must be a string"
        weight = m.get("weight", 1)
        if role == "assistant" and weight not in (0, 1):
            return f"messages[{i}].weight must be 0 or 1"
        extra = set(m) - {"role", "content", "weight", "name"}
        if extra:
            return f"messages[{i}] has unsupported field(s) {', '.join(sorted(extra))}"
        has_assistant |= role == "assistant" and weight == 1
    if not has_assistant:
        return "no assistant message to learn from (each example needs at least one)"
    return None


def _format_of(example: dict[str, Any]) -> tuple[str | None, str | None]:
    if "messages" in example:
        return "chat", _check_chat(example["messages"])
    if "prompt" in example or "completion" in example:
        for key in ("prompt", "completion"):
            if not isinstance(example.get(key), str):
                return "prompt_completion", f"'{key}' must be a string"
        if not example["completion"]:
            return "prompt_completion", "'completion' is empty"
        return "prompt_completion", None
    return None, ("missing 'messages' (chat format) or 'prompt' and 'completion' "
                  "(prompt/completion format)")


def validate_jsonl(path: Path, *, count_tokens: Callable[[dict[str, Any]], int] | None = None,
                   max_tokens: int | None = None, model: str = "the base model") -> Summary:
    """Read the file line by line (never whole); raise InvalidFileError at the first bad line."""
    fmt: str | None = None
    examples = tokens = longest = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), start=1):
            if len(raw) > MAX_LINE_BYTES:
                raise InvalidFileError(number, f"the line is longer than {MAX_LINE_BYTES} bytes")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidFileError(number, "the line is not valid UTF-8") from None
            if not text.strip():
                continue
            try:
                example = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InvalidFileError(number, f"invalid JSON ({exc.msg} at column {exc.colno})"
                                       ) from None
            except ValueError:  # an integer of more than 4300 digits
                raise InvalidFileError(number, "invalid JSON (a number too long to read)"
                                       ) from None
            except RecursionError:
                raise InvalidFileError(number, "invalid JSON (nested too deeply)") from None
            try:  # "\ud800" parses, but is no Unicode text: no tokenizer could take it
                json.dumps(example, ensure_ascii=False).encode("utf-8")
            except (UnicodeEncodeError, RecursionError):
                raise InvalidFileError(number, "a string holds a lone UTF-16 surrogate (such "
                                       "as \\ud800), which is not Unicode text") from None
            if not isinstance(example, dict):
                raise InvalidFileError(number, "each line must be a JSON object")
            kind, problem = _format_of(example)
            if problem:
                raise InvalidFileError(number, problem)
            if fmt is None:
                fmt = kind
            elif kind != fmt:
                raise InvalidFileError(number, f"the line is in {kind} format but the file "
                                       f"started in {fmt} format; use one format per file")
            if count_tokens is not None:
                try:
                    n = count_tokens(example)
                except (ValueError, InvalidRequestError) as exc:  # the chat template refused
                    problem = getattr(exc, "message", None) or str(exc)
                    raise InvalidFileError(number, problem.rstrip(".")) from None
                if max_tokens is not None and n > max_tokens:
                    raise InvalidFileError(number, f"the example is {n} tokens long, too long "
                                           f"for {model}, which takes at most {max_tokens} "
                                           f"tokens per training example")
                tokens += n
                longest = max(longest, n)
            examples += 1
    if fmt is None:
        raise InvalidRequestError("Invalid training file: it contains no examples.",
                                  param="file", code="invalid_file_format")
    return Summary(format=fmt, examples=examples, tokens=tokens, longest=longest)
