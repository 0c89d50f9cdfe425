"""How each chat-template family is told about tools and shown its earlier calls and their
results. A template that renders OpenAI `tools` itself gets them as Hugging Face templates
expect (function objects, assistant `tool_calls` with `arguments` as an object, `role: "tool"`
messages); any other gets its family's built-in tool prompt as ordinary turns:

- chatml (Hermes, Qwen, SmolLM): the tools in <tools></tools> in the system prompt, calls as
  `<tool_call>{"name", "arguments"}</tool_call>`, results a user turn of <tool_response>s;
- llama3: Llama 3.1's JSON tool calling (its template's own wording) in the system prompt,
  calls as bare `{"name", "parameters"}` objects (`; ` between several, `<|python_tag|>`
  allowed before them), results `ipython` turns;
- gemma: Google's documented JSON prompt for Gemma 3 (Gemma has no tool tokens): the
  instructions and functions open the user turn (Gemma's template folds the system prompt
  into it), calls as bare `{"name", "parameters"}` objects, results a user turn of
  ```tool_output``` blocks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from bastion.protocol.chat import ChatMessage, ToolDefinition


@dataclass(frozen=True)
class CallSyntax:
    """How one family's model writes a tool call: `open` + {"name": ..., key: {...}} +
    `close`, `sep` between calls; `prefix` may come before the calls and is not content."""

    family: str
    open: str
    close: str
    sep: str
    key: str
    prefix: str = ""


SYNTAXES = {
    "chatml": CallSyntax("chatml", "<tool_call>\n", "\n</tool_call>", "\n", "arguments"),
    "llama3": CallSyntax("llama3", "", "", "; ", "parameters", prefix="<|python_tag|>"),
    "gemma": CallSyntax("gemma", "", "", "\n", "parameters"),
}


def syntax_of(family: str) -> CallSyntax:
    return SYNTAXES.get(family, SYNTAXES["chatml"])


def _rule(choice: Any) -> str:
    if choice == "required":
        return "You must call at least one function."
    if not isinstance(choice, str):
        return f"You must call the function {choice.function.name}."
    return "Call a function only when it helps; otherwise answer directly."


def instructions(syntax: CallSyntax, tools: list[ToolDefinition], choice: Any) -> str:
    """The built-in tool prompt of a family."""
    rule = _rule(choice)
    if syntax.family == "llama3":
        listed = "\n\n".join(json.dumps(t.model_dump(exclude_none=True), indent=4)
                             for t in tools)
        return ("You have access to the following functions. To call a function, please "
                "respond with JSON for a function call. Respond in the format {\"name\": "
                "function name, \"parameters\": dictionary of argument name and its value}. "
                "Do not use variables. To call several, separate the calls with '; '.\n\n"
                f"{listed}\n\n{rule}")
    if syntax.family == "gemma":
        listed = json.dumps([t.function.model_dump(exclude_none=True) for t in tools], indent=2)
        return ("You have access to functions. If you decide to invoke any of the "
                "function(s), you MUST put it in the format of\n{\"name\": function name, "
                "\"parameters\": dictionary of argument name and its value}\n\nYou SHOULD NOT "
                f"include any other text in the response if you call a function\n{listed}\n"
                f"{rule}")
    listed = "\n".join(json.dumps(t.model_dump(exclude_none=True)) for t in tools)
    return ("You can call functions. Their signatures are within <tools></tools>:\n"
            f"<tools>\n{listed}\n</tools>\n{rule} To call a function, answer with a JSON "
            "object holding its name and arguments within <tool_call></tool_call> tags:\n"
            '<tool_call>\n{"name": <function-name>, "arguments": <arguments-object>}\n'
            "</tool_call>")


def call_text(syntax: CallSyntax, name: str, arguments: str) -> str:
    """One earlier call as the family's model writes it."""
    return (syntax.open + json.dumps({"name": name, syntax.key: arguments_value(arguments)})
            + syntax.close)


def _result(syntax: CallSyntax, text: str) -> dict[str, Any]:
    """One tool result as the turn a family's model reads it in."""
    if syntax.family == "llama3":
        return {"role": "ipython", "content": text}
    if syntax.family == "gemma":
        return {"role": "user", "content": f"```tool_output\n{text}\n```", "results": True}
    return {"role": "user", "content": f"<tool_response>\n{text}\n</tool_response>",
            "results": True}


def arguments_value(text: str) -> Any:
    """A call's arguments as an object (HF templates and the built-in prompts want JSON)."""
    try:
        return json.loads(text)
    except ValueError:
        return text  # the client's own history; shown to the model as it was sent


def built_in_messages(messages: list[ChatMessage], rendered: list[dict[str, Any]],
                      syntax: CallSyntax, prompt: str | None) -> list[dict[str, Any]]:
    """The conversation as plain turns any chat template takes: an assistant's calls become
    the family's call text, tool results the family's result turns (several in a row share
    one turn where results are user turns, and on Gemma, whose template wants turns to
    alternate, so does a user turn after them), and the tools' instructions join the system
    prompt."""
    out: list[dict[str, Any]] = []
    for m, msg in zip(messages, rendered):
        msg = {k: v for k, v in msg.items() if k not in ("tool_calls", "tool_call_id")}
        if m.role == "tool":
            turn = _result(syntax, m.text())
            if turn.get("results") and out and out[-1].get("results"):
                out[-1]["content"] += "\n" + turn["content"]
            else:
                out.append(turn)
            continue
        if syntax.family == "gemma" and m.role == "user" and out \
                and out[-1].get("results") and isinstance(msg["content"], str):
            out[-1] = {"role": "user", "content": out[-1]["content"] + "\n\n" + msg["content"]}
            continue
        if m.role == "assistant" and m.tool_calls:
            calls = syntax.sep.join(call_text(syntax, c.function.name, c.function.arguments)
                                    for c in m.tool_calls)
            text = msg["content"] if isinstance(msg["content"], str) else ""
            msg = {**msg, "content": (text + "\n" if text else "") + calls}
        out.append(msg)
    for msg in out:
        msg.pop("results", None)
    if prompt:
        _add_system(out, prompt)
    return out


def template_messages(rendered: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation for a template that renders tools: assistant `tool_calls` with their
    `arguments` as objects, as Hugging Face templates expect; tool messages stay `tool`."""
    out = []
    for msg in rendered:
        if msg.get("tool_calls"):
            msg = {**msg, "tool_calls": [
                {"id": c["id"], "type": "function",
                 "function": {"name": c["function"]["name"],
                              "arguments": arguments_value(c["function"]["arguments"])}}
                for c in msg["tool_calls"]]}
        out.append(msg)
    return out


def _add_system(out: list[dict[str, Any]], prompt: str) -> None:
    if out and out[0]["role"] == "system" and isinstance(out[0]["content"], str):
        out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + prompt}
    else:
        out.insert(0, {"role": "system", "content": prompt})
