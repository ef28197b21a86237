"""Compact a tuning run's full log into the file Kiln ships in `tuning_logs/<cpu-kind>/`.

    python -m kiln.autotune.ship tuning_logs/znver5/resnet50.jsonl --out shipped/resnet50.jsonl
    python -m kiln.autotune.ship FULL.jsonl --in-place --archive docs/tuning-runs/2026-12-01-znver5/

A full log holds every measured candidate (1-3 MB a model); `kiln compile` reads from a log that has them only
the tuner's final A/B records (`"verified": true`) and the whole-model decision (`"end_to_end"`), so those are
what ships: the package stays small and applying the shipped file gives the same configs as the full log. A
log without them (a run stopped before its A/B) keeps each workload's fastest record, which is what a reader
would pick. Lines are copied byte for byte, in order. The full log is never dropped unasked: `--in-place`
needs `--archive`, which keeps it gzipped there first.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import statistics
import sys
from pathlib import Path


def compact_lines(lines: list[str]) -> list[str]:
    """The lines of a full log that decide what it applies (see the module docstring), in their order."""
    parsed: list[tuple[str, dict | None]] = []
    for line in lines:
        try:
            d = json.loads(line)
        except ValueError:
            d = None
        parsed.append((line, d if isinstance(d, dict) else None))
    deciding = [line for line, d in parsed if d and (d.get("verified") or d.get("end_to_end"))]
    if deciding:
        return deciding
    best: dict[str, tuple[float, int]] = {}
    for i, (_, d) in enumerate(parsed):
        if not d or d.get("error") or not d.get("costs_s") or "key" not in d:
            continue
        cost = statistics.median(d["costs_s"])
        if d["key"] not in best or cost < best[d["key"]][0]:
            best[d["key"]] = (cost, i)
    return [parsed[i][0] for i in sorted(i for _, i in best.values())]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", type=Path, help="a tuning run's full log (JSON lines)")
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="write the compacted log here (refuses an existing file)")
    where.add_argument("--in-place", action="store_true", help="replace LOG by its compacted form (needs --archive)")
    ap.add_argument("--archive", type=Path, help="folder: keep the full log there as LOG.gz first")
    args = ap.parse_args(argv)
    lines = [ln for ln in args.log.read_text(encoding="utf-8").splitlines() if ln.strip()]
    kept = compact_lines(lines)
    if args.in_place and args.archive is None:
        ap.error("--in-place replaces the full log: say where to keep it with --archive")
    if args.archive is not None:
        args.archive.mkdir(parents=True, exist_ok=True)
        gz = args.archive / (args.log.name + ".gz")
        if gz.exists():
            ap.error(f"{gz} exists: not overwriting an archived log")
        with open(args.log, "rb") as src, gzip.open(gz, "wb") as dst:
            shutil.copyfileobj(src, dst)
    out = args.log if args.in_place else args.out
    if not args.in_place and out.exists():
        ap.error(f"{out} exists: not overwriting it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")
    tmp.replace(out)
    print(f"{args.log}: kept {len(kept)} of {len(lines)} records -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
