"""The snippet as an npm package (frontend-snippet/package.json): its
version, what ``npm pack`` ships, that its builds load, and that its
hand-written types check a typed use (frontend-snippet/examples/usage.ts)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gateway import __version__

SNIPPET_DIR = Path(__file__).resolve().parent.parent / "frontend-snippet"
NODE_BIN = SNIPPET_DIR / "node_modules" / ".bin"
#: Everything the tarball holds: the two builds, the types, and what npm
#: always adds (package.json, README, LICENSE). Source, tests, scripts, the
#: demo and the example stay out.
SHIPPED = {
    "package.json",
    "README.md",
    "LICENSE",
    "dist/snippet.js",
    "dist/snippet.mjs",
    "snippet.d.ts",
}


def run(*args: str | Path, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    node = shutil.which("node")
    assert node, "node is not installed (Debian: apt-get install nodejs npm)"
    assert (NODE_BIN / "tsc").exists(), "frontend-snippet has no node_modules: run `make js`"
    return subprocess.run(
        [str(a) for a in args],
        cwd=SNIPPET_DIR,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@pytest.fixture(scope="module")
def built() -> Path:
    """``npm run build``: dist/ (and the LICENSE copy) from snippet.js."""
    result = run("node", "scripts/build.mjs")
    assert result.returncode == 0, result.stderr
    return SNIPPET_DIR / "dist"


def package() -> dict[str, Any]:
    data = json.loads((SNIPPET_DIR / "package.json").read_text())
    assert isinstance(data, dict)
    return data


def test_the_package_is_publishable_and_in_step_with_the_python_package() -> None:
    pkg = package()
    assert pkg["version"] == __version__, "bump frontend-snippet/package.json with gateway/"
    assert "private" not in pkg
    assert pkg["license"] == "Apache-2.0"
    assert pkg["types"] == "./snippet.d.ts"
    assert pkg["exports"]["."] == {"types": "./snippet.d.ts", "import": "./dist/snippet.mjs"}
    assert pkg["exports"]["./script"] == "./dist/snippet.js"
    # Every file the manifest names is one the tarball holds.
    named = {pkg["types"], pkg["unpkg"], *pkg["exports"]["."].values(), pkg["exports"]["./script"]}
    assert {name.removeprefix("./") for name in named} <= SHIPPED


def test_npm_pack_ships_the_builds_the_types_and_nothing_else(built: Path) -> None:
    # The build ran already (prepack would run it again, and print to stdout).
    result = run("npm", "pack", "--dry-run", "--json", "--ignore-scripts")
    assert result.returncode == 0, result.stderr
    [tarball] = json.loads(result.stdout)
    assert (tarball["name"], tarball["version"]) == ("latency-gateway-snippet", __version__)
    assert {f["path"] for f in tarball["files"]} == SHIPPED


def test_the_builds_load_and_the_module_exports_the_api(built: Path) -> None:
    """Imported outside a page (no document), the ES module defines the
    global and initialises nothing: init() returns the API and wraps no fetch."""
    script = (
        "const before = globalThis.fetch;"
        "const m = await import('./dist/snippet.mjs');"
        "const api = m.init({ gatewayOrigins: ['https://gw.example'] });"
        "console.log(JSON.stringify({"
        " same: api === m.default && api === globalThis.LatencyGateway,"
        " keys: Object.keys(m).sort(), api: Object.keys(api).sort(),"
        " fetchUntouched: globalThis.fetch === before }));"
    )
    result = run("node", "--input-type=module", "-e", script)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "same": True,
        "keys": ["default", "init"],
        "api": ["clock", "flush", "init", "now", "requests"],
        "fetchUntouched": True,
    }
    classic = (built / "snippet.js").read_text()
    assert classic.startswith(f"/*! latency-gateway-snippet {__version__} | Apache-2.0 */")
    # The classic build is a script (no export), ES2017 like its source.
    result = run(
        "node",
        "-e",
        "require('acorn').parse(require('fs').readFileSync('dist/snippet.js', 'utf8'),"
        " { ecmaVersion: 2017, sourceType: 'script' })",
    )
    assert result.returncode == 0, result.stderr


def test_the_typed_usage_example_checks_against_the_types() -> None:
    """examples/usage.ts imports the package by its name: TypeScript resolves
    it through package.json's exports to snippet.d.ts, as a user's would."""
    result = run(NODE_BIN / "tsc", "--noEmit", "-p", "examples")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_types_reject_a_wrong_use(tmp_path: Path) -> None:
    """The check bites: an unknown option and a misspelt detail field fail."""
    (tmp_path / "wrong.ts").write_text(
        'import { init } from "latency-gateway-snippet";\n'
        'init({ gatewayOrigin: ["https://gw.example"] });\n'
        'window.addEventListener("latency-gateway", (e) => e.detail.uplinkMs);\n'
    )
    examples = json.loads((SNIPPET_DIR / "examples" / "tsconfig.json").read_text())
    options = examples["compilerOptions"]
    # Outside the package, the name resolves through paths instead.
    options["paths"] = {"latency-gateway-snippet": [str(SNIPPET_DIR / "snippet.d.ts")]}
    config = tmp_path / "tsconfig.json"
    config.write_text(json.dumps({"compilerOptions": options, "files": ["wrong.ts"]}))
    result = run(NODE_BIN / "tsc", "--noEmit", "-p", config)
    assert result.returncode != 0
    assert "'gatewayOrigin' does not exist in type 'InitOptions'" in result.stdout
    assert "Property 'uplinkMs' does not exist on type 'LatencyGatewayDetail'" in result.stdout
