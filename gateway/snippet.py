"""The snippet's bytes as the gateway sends them: comments and indentation
out, then gzip, both once at start-up (README, "Add it to your frontend",
**Size.**).

What it is for: :func:`strip_source`, a line-based pass that drops the
comment-only lines and the leading indentation of ``snippet.js`` (the
program is unchanged: tests/test_snippet_strip.py minifies both with terser
and compares), and :class:`Encoded`, one body in the two codings it is
served in, each with its own entity tag.

Not for: minifying (names stay as written, so a stack trace from a page
still reads), choosing a coding per request (``http.accepts_gzip``), or
serving (``reserved.py``).
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from typing import Final

#: Lines starting with this are the gateway's markers (``reserved.py``), kept.
MARKER_PREFIX: Final = "/*@gateway-"
#: Words after which a ``/`` starts a regular expression, not a division
#: (ECMA-262 §12: the lexical goal is InputElementRegExp after them).
REGEX_AFTER_WORDS: Final = frozenset(
    {
        "return",
        "typeof",
        "instanceof",
        "in",
        "of",
        "new",
        "delete",
        "void",
        "throw",
        "case",
        "do",
        "else",
        "yield",
        "await",
    }
)
#: The state of a line that starts in plain code, at nesting depth zero.
CODE: Final[tuple[str, ...]] = ()


class Unstrippable(ValueError):
    """The source holds something this simple pass does not read with
    certainty; it is then served as it is."""


def strip_source(source: str) -> str:
    """``source`` without its comment-only lines (``//`` lines, ``/* … */``
    blocks that start a line, so JSDoc), blank lines and leading
    indentation; the gateway's ``/*@gateway-…*/`` markers, every code line
    and every line break between two code lines stay, so automatic
    semicolon insertion (ECMA-262 §12.10) reads the same.

    A line is only touched when the line before ended in plain code: inside
    a template literal, a string continued with ``\\`` or a comment opened
    after code, lines are kept byte for byte. A scan of each kept line tells
    which; anything it cannot read with certainty (an unterminated string or
    regular expression, an unbalanced ``}``, a line break JavaScript has but
    ``\\n``-splitting does not see) raises :class:`Unstrippable`."""
    # ECMA-262 §12.3: CR, U+2028 and U+2029 end a line too; a "//" comment
    # would end there, and dropping its "\n" line would drop code.
    if "\u2028" in source or "\u2029" in source or "\r" in source.replace("\r\n", ""):
        raise Unstrippable("a line terminator other than \\n or \\r\\n")
    kept: list[str] = []
    state = CODE
    prev = ";"
    in_dropped_comment = False
    for line in source.split("\n"):
        if in_dropped_comment:
            end = line.find("*/")
            if end < 0:
                continue
            in_dropped_comment = False
            # A comment with a line break in it reads as one (ECMA-262
            # §12.4), and a "\n" is still kept before the rest.
            line = line[end + 2 :]
        elif not _plain(state):
            kept.append(line)
            state, prev = _scan(line, state, prev)
            continue
        text = line.lstrip(" \t")
        if text.startswith("//"):
            continue
        if text.startswith("/*") and not text.startswith(MARKER_PREFIX):
            end = text.find("*/", 2)
            if end < 0:
                in_dropped_comment = True
                continue
            text = text[end + 2 :].lstrip(" \t")
        if not text.strip():
            continue
        kept.append(text)
        state, prev = _scan(text, state, prev)
    if state != CODE or in_dropped_comment:
        raise Unstrippable("the source ends inside a literal, a comment or a block")
    return "\n".join(kept) + ("\n" if source.endswith("\n") else "")


def _plain(state: tuple[str, ...]) -> bool:
    """Whether a line starting in ``state`` starts between two tokens."""
    return not any(frame in ("`", "'", '"', "/*") for frame in state)


def _scan(line: str, state: tuple[str, ...], prev: str) -> tuple[tuple[str, ...], str]:
    """The state at the end of ``line`` given the state at its start: a stack
    of frames (``{``, a template's ``` ` ```, its ``${``, a string's quote, a
    ``/*`` comment), and ``prev``, the last significant character of code
    (``a`` for any word or value), which tells a regular expression from a
    division."""
    stack = list(state)
    i, n = 0, len(line)
    while i < n:
        top = stack[-1] if stack else ""
        c = line[i]
        if top == "/*":
            end = line.find("*/", i)
            if end < 0:
                return tuple(stack), prev
            stack.pop()
            i = end + 2
        elif top in ("'", '"'):
            if c == "\\":
                i += 2
                continue
            if c == top:
                stack.pop()
                prev = "a"
            i += 1
        elif top == "`":
            if c == "\\":
                i += 2
            elif c == "`":
                stack.pop()
                prev = "a"
                i += 1
            elif line.startswith("${", i):
                stack.append("${")
                prev = "("
                i += 2
            else:
                i += 1
        elif c in " \t":
            i += 1
        elif line.startswith("//", i):
            break
        elif line.startswith("/*", i):
            stack.append("/*")
            i += 2
        elif c in "'\"`":
            stack.append(c)
            i += 1
        elif c == "/":
            if prev == "a" or prev in ")]}":
                prev = "/"
                i += 1
            else:
                i = _regex_end(line, i)
                prev = "a"
        elif c == "{":
            stack.append("{")
            prev = "{"
            i += 1
        elif c == "}":
            if top not in ("{", "${"):
                raise Unstrippable("a } that closes nothing")
            stack.pop()
            prev = "}"
            i += 1
        elif c.isalnum() or c in "_$\\" or ord(c) > 127:
            start = i
            while i < n and (line[i].isalnum() or line[i] in "_$\\" or ord(line[i]) > 127):
                i += 1
            prev = "(" if line[start:i] in REGEX_AFTER_WORDS else "a"
        else:
            prev = c
            i += 1
    if stack and stack[-1] in ("'", '"') and not line.endswith("\\"):
        raise Unstrippable("a string that does not end on its line")
    return tuple(stack), prev


def _regex_end(line: str, start: int) -> int:
    """Where the regular expression literal at ``start`` ends (after its
    flags); one never spans lines (ECMA-262 §12.9.5)."""
    i, in_class = start + 1, False
    while i < len(line):
        c = line[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":
            in_class = True
        elif c == "]":
            in_class = False
        elif c == "/" and not in_class:
            i += 1
            while i < len(line) and (line[i].isalnum() or line[i] in "_$"):
                i += 1
            return i
        i += 1
    raise Unstrippable("a regular expression that does not end on its line")


def stripped(source: bytes) -> bytes:
    """:func:`strip_source` on UTF-8 bytes."""
    return strip_source(source.decode("utf-8")).encode("utf-8")


def etag_of(body: bytes) -> str:
    """A strong entity tag for these bytes (RFC 9110 §8.8.3)."""
    return '"' + hashlib.sha256(body).hexdigest()[:20] + '"'


@dataclass(frozen=True, slots=True)
class Encoded:
    """One snippet body in both codings, compressed once, each with its tag.

    RFC 9110 §8.8.3: a strong entity tag belongs to one representation, and
    the gzip-coded bytes are another representation than the identity ones,
    so theirs differs (``-gzip`` inside the quotes)."""

    identity: bytes
    etag: str
    gzip: bytes
    gzip_etag: str

    @classmethod
    def of(cls, body: bytes) -> Encoded:
        etag = etag_of(body)
        # mtime=0: the same bytes from every start and every gateway.
        coded = gzip.compress(body, compresslevel=9, mtime=0)
        return cls(body, etag, coded, etag[:-1] + '-gzip"')
