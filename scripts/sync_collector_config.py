"""Copy ``deploy/otel-collector.yaml`` into the Kubernetes ConfigMap
``deploy/kubernetes/collector-config.yaml``: one Collector configuration for
docker compose and Kubernetes.

What it is for: kustomize refuses to read files outside its directory, so
the ConfigMap carries a copy; run this after editing the collector file
(``tests/test_kubernetes.py`` fails while the two differ).

Not for: anything else in the manifests (they are written by hand).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "deploy" / "otel-collector.yaml"
CONFIG_MAP = ROOT / "deploy" / "kubernetes" / "collector-config.yaml"

HEADER = """\
# Generated copy of deploy/otel-collector.yaml (kustomize will not read a
# file outside this directory). After editing that file, run
#   .venv/bin/python scripts/sync_collector_config.py
# tests/test_kubernetes.py fails while the two differ.
apiVersion: v1
kind: ConfigMap
metadata:
  name: otel-collector-config
  labels:
    app.kubernetes.io/name: otel-collector
data:
  config.yaml: |
"""


def render(source: str) -> str:
    """The ConfigMap manifest whose ``config.yaml`` is exactly ``source``."""
    lines = source.splitlines(keepends=True)
    return HEADER + "".join("    " + line if line.strip() else "\n" for line in lines)


def main() -> int:
    CONFIG_MAP.write_text(render(SOURCE.read_text()))
    print(f"wrote {CONFIG_MAP.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
