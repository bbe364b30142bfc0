"""gateway/snippet.py: the comment and indentation pass changes no program
(terser minifies the served source and the original to the same bytes), and
keeps or refuses what it cannot read with certainty; each snippet body is
compressed once, deterministically, with one entity tag per coding."""

from __future__ import annotations

import gzip
import json
import logging
import shutil
import subprocess

import pytest

from gateway.reserved import SNIPPET_MODULE_FOOTER, SNIPPET_PATH, served_source
from gateway.snippet import Encoded, Unstrippable, strip_source, stripped
from tests.servers import ROOT

SNIPPET_DIR = ROOT / "frontend-snippet"

#: terser with scripts/size.mjs's options, comments dropped; the outputs of
#: each {name: [source, module]} pair, as JSON.
MINIFY = r"""
const { minify } = require("terser");
const input = JSON.parse(require("node:fs").readFileSync(0, "utf8"));
(async () => {
  const out = {};
  for (const [name, [source, module]] of Object.entries(input)) {
    const options = {
      ecma: 2017, compress: { passes: 2 }, mangle: true, module, format: { comments: false },
    };
    out[name] = (await minify(source, options)).code;
  }
  process.stdout.write(JSON.stringify(out));
})();
"""


def minified(sources: dict[str, tuple[str, bool]]) -> dict[str, str]:
    node = shutil.which("node")
    assert node, "node is not installed (Debian: apt-get install nodejs)"
    assert (SNIPPET_DIR / "node_modules" / "terser").is_dir(), "run `make js` (npm ci)"
    done = subprocess.run(
        [node, "-e", MINIFY],
        input=json.dumps(sources),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=SNIPPET_DIR,
    )
    result: dict[str, str] = json.loads(done.stdout)
    return result


def test_the_served_snippet_is_the_same_program_as_the_source() -> None:
    """terser parses both and prints the same minified program: stripping
    removed only comments and whitespace, and ASI reads the same (a line
    break stays between every two code lines)."""
    source = SNIPPET_PATH.read_text()
    served = strip_source(source)
    footer = SNIPPET_MODULE_FOOTER.decode()
    out = minified(
        {
            "classic": (source, False),
            "classic_served": (served, False),
            "module": (source + footer, True),
            "module_served": (served + footer, True),
        }
    )
    assert out["classic_served"] == out["classic"]
    assert out["module_served"] == out["module"]
    # And it is worth it: well under half the bytes, markers kept.
    assert len(served) < 0.5 * len(source)
    for marker in ("/*@gateway-allowed-origins*/ null", "/*@gateway-sample-bound*/ null"):
        assert served.count(marker) == 1
    for dropped in ("\n  ", "\n//", "\n/**"):
        assert dropped not in served


def test_the_check_catches_a_changed_program() -> None:
    """The comparison above can fail: a dropped code line shows in terser's
    output (here, a line beginning with "*" read as a comment line)."""
    source = "const a = 2\n* 3;\nwindow.x = a;\n"
    out = minified({"a": (source, False), "b": (source.replace("* 3", "// 3"), False)})
    assert out["a"] != out["b"]


@pytest.mark.parametrize(
    ("source", "served"),
    [
        # Comment-only lines and JSDoc go, indentation goes, code stays.
        ("  // a\n  /** b\n   * c */\n  x();\n", "x();\n"),
        ("/* one */\n\n\ty = 1;", "y = 1;"),
        # The gateway's markers stay, even starting a line.
        ("  /*@gateway-sample-bound*/ null,\n", "/*@gateway-sample-bound*/ null,\n"),
        # Code after a dropped block stays, on its own line.
        ("a\n/* x\n y */ b;\n", "a\nb;\n"),
        # A trailing comment is code's line: kept as it is.
        ("  f(); // g\n", "f(); // g\n"),
        # "//" inside a string, a regular expression, a URL: code.
        ('  u = "http://x//y";\n  // c\n', 'u = "http://x//y";\n'),
        ("  r = /\\/\\//g;\n  // c\n", "r = /\\/\\//g;\n"),
        ("  r = /[/]/;\n  s = 1;\n", "r = /[/]/;\ns = 1;\n"),
        # A division is not a regular expression: the next line is code.
        ("  a = b / c;\n  // c\n", "a = b / c;\n"),
        # ASI: the line break between return and its value stays.
        ("return\n  // why\n  x;\n", "return\nx;\n"),
    ],
)
def test_strip_drops_comment_lines_and_indentation_only(source: str, served: str) -> None:
    assert strip_source(source) == served


@pytest.mark.parametrize(
    "source",
    [
        # Lines inside a template literal are its characters: kept as they are.
        "t = `a\n  // not a comment\n  * nor this\n  /* nor this */\n`;\n",
        # Inside a template's ${…} that spans lines, and a template in there.
        "t = `${f({\n  // x\n  a: `\n  // y\n`})}`;\n",
        # A string continued with a backslash: its next line is in the string.
        "s = 'a\\\n  // b';\n",
        # A comment opened after code: the lines up to its end are kept.
        "x(); /* a\n  // b\n  */ y();\n",
    ],
)
def test_strip_keeps_lines_inside_a_literal_or_a_comment_byte_for_byte(source: str) -> None:
    assert strip_source(source) == source


@pytest.mark.parametrize(
    "source",
    [
        # JavaScript ends a line at CR, U+2028, U+2029 too: a "//" line
        # would end there, and the code after it would be dropped.
        "// a\rx();\n",
        "// a\u2028x();\n",
        # What the scan cannot read: refused, never guessed.
        "s = 'open\nx();\n",
        "r = /open\nx();\n",
        "}\n",
        "t = `open\n",
        "/* open\n",
    ],
)
def test_strip_refuses_what_it_cannot_read(source: str) -> None:
    with pytest.raises(Unstrippable):
        strip_source(source)


def test_each_body_is_compressed_once_deterministically_with_its_own_tag() -> None:
    body = stripped(SNIPPET_PATH.read_bytes())
    first, again = Encoded.of(body), Encoded.of(body)
    assert first == again  # mtime=0: the same bytes from every start
    assert gzip.decompress(first.gzip) == first.identity == body
    # RFC 9110 §8.8.3: a strong tag per representation.
    assert first.etag != first.gzip_etag
    assert first.gzip_etag == first.etag[:-1] + '-gzip"'
    assert len(first.gzip) < len(body) / 2


def test_a_source_the_pass_cannot_read_is_served_as_it_is(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The gateway never serves a guess: it falls back to the whole source
    (the same program, only larger) and says so once, at start-up."""
    source = b"// a\ns = 'not closed\n"
    with caplog.at_level(logging.WARNING, logger="gateway.reserved"):
        assert served_source(source) == source
    assert "unstripped" in caplog.text
    assert served_source(b"  // a\n  x();\n") == b"x();\n"
