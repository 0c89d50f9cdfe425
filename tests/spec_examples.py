"""The examples of a specification document, read from its own text.

The documents in ../shared/spec/ are web pages saved as plain text: their code blocks have no
fences, so a block is a run of lines that look like code (blank lines may sit inside one),
between lines of prose. A run is cut where a new example starts (the Avangenio document puts
its JavaScript, Python and curl tabs one after another), and each block is named by what it
is: `curl`, `python`, `node`, a documented `json` or `sse` response, or `other` (prose with a
parenthesis, a one-line fragment). A response belongs to the example
before it where a heading `Response` stands between them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

SPEC_DIR = Path(__file__).resolve().parents[2] / "shared" / "spec"
CODE_CHARS = set("(){}[];=,'\"`")
# Lines that open an example, and so cut a run of code in two.
STARTS = re.compile(r"^(curl |# pip install|from openai import|// npm install|import \w+ from )")
# A sentence: a capitalised word, then lower-case words ("If you want only the response...").
PROSE = re.compile(r"^[A-Z][a-z]+ [a-z]+ ")


@dataclass
class Block:
    kind: str
    text: str
    line: int  # 1-based, in the document
    lead: list[str] = field(default_factory=list, repr=False)  # the prose just before it
    response: Block | None = field(default=None, repr=False)  # what the document says it prints


def spec_documents() -> list[Path]:
    return sorted(SPEC_DIR.glob("*.txt"))


def _codeish(line: str) -> bool:
    s = line.strip()
    if STARTS.match(s) or s.startswith("-H ") or s.endswith(" \\"):
        return True
    if PROSE.match(s):
        return False
    return (not s or line[0] in " \t" or s.startswith(("//", "#", "data: "))
            or any(c in CODE_CHARS for c in s))


def _kind(text: str) -> str:
    first = text.lstrip().splitlines()[0]
    if first.startswith("curl "):
        return "curl"
    if "from openai import" in text or first.startswith("# pip"):
        return "python"
    if first.startswith("{"):
        return "json"
    if first.startswith("data: "):
        return "sse"
    if re.search(r"^(const |import |// |ws\.)", text, re.M) and re.search(r"[;)]\s*$|^}", text, re.M):
        return "node"
    return "other"


def blocks(text: str) -> list[Block]:
    """Every block of code-like lines, in document order, each response tied to its example."""
    out: list[Block] = []
    current: list[str] = []
    lead: list[str] = []
    start = 0

    def close() -> None:
        body = "\n".join(current).strip("\n")
        if body.strip():
            out.append(Block(_kind(body), body + "\n", start, lead=list(lead)))
            lead.clear()
        current.clear()

    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if not _codeish(line):
            close()
            lead.append(line.strip())
            continue
        opened = [c for c in current if c.strip() and not c.startswith(("//", "#"))]
        if STARTS.match(line) and opened:
            close()
        if not current:
            start = n
        current.append(line)
    close()
    example: Block | None = None
    for b in out:
        if b.kind in ("json", "sse"):
            said = any(re.match(r"^(API )?Response\S*$", p) for p in b.lead)
            if example is not None and example.response is None and said:
                example.response = b
        elif b.kind != "other":
            example = b
    return out


def examples(path: Path) -> list[Block]:
    return [b for b in blocks(path.read_text()) if b.kind in ("curl", "python", "node")]


def substitute(text: str, table: dict[str, str]) -> str:
    """Replace whole words only (`radiance`, not part of a longer name), longest first."""
    for old in sorted(table, key=len, reverse=True):
        text = re.sub(rf"(?<![\w-]){re.escape(old)}(?![\w-])", table[old], text)
    return text
