"""Hash a run's artifacts (their data, not their metadata) to check that a change keeps results.

    python bench/snapshot.py REPO_DIR > before.json   # after `dvc repro` in REPO_DIR
    ... change the code, `dvc repro` again ...
    python bench/snapshot.py REPO_DIR > after.json; diff before.json after.json

Parquet tables are hashed without their metadata (code version, params hash) and without
`exec_seconds` (a timing); adapters tensor by tensor; JSON metrics are kept as they are.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
from safetensors.torch import load_file


def snapshot(root: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    iterations = root / "data" / "iterations"
    for f in sorted(iterations.glob("*/*.parquet")) + sorted(iterations.glob("*/eval/samples.parquet")):
        table = pq.read_table(f).replace_schema_metadata(None)
        table = table.drop_columns([c for c in ("exec_seconds",) if c in table.column_names])
        out[str(f.relative_to(root))] = _digest(json.dumps(table.to_pylist(), default=str).encode())
    for f in sorted(iterations.glob("*/adapters/**/*.safetensors")):
        tensors = sorted(load_file(f).items())
        out[str(f.relative_to(root))] = _digest(
            b"".join(k.encode() + v.float().numpy().tobytes() for k, v in tensors)
        )
    metrics = sorted(iterations.glob("*/eval/*.json")) + sorted(iterations.glob("*/metrics/metrics.json"))
    for f in [*metrics, root / "data" / "report" / "summary.json"]:
        if f.exists():
            out[str(f.relative_to(root))] = json.loads(f.read_text())
    return out


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


if __name__ == "__main__":
    json.dump(snapshot(Path(sys.argv[1] if len(sys.argv) > 1 else ".")), sys.stdout, indent=1, sort_keys=True)
