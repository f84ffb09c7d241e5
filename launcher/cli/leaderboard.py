"""How a sweep stands (`launch status SWEEP_DIR`): its trials ranked by the recipe's best metric, a warning where
the best value lies at the edge of a searched range, and a picture per searched number."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..text import first_line
from . import jobs


def columns(cells: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)


def load(folder: Path) -> dict | None:
    path = folder / "sweep.json"
    return json.loads(path.read_text()) if path.exists() else None


def rows(folder: Path) -> list[dict]:
    """Each trial's status row with its values, the best first by the recipe's metric; trials without one last."""
    record = load(folder)
    metric, mode = record["best"]
    out = []
    for index, values in enumerate(record["trials"]):
        where = folder / f"trial-{index}"
        row = jobs.status(where) if jobs.is_run(where) else {"run": str(where), "state": "pending"}
        out.append({"trial": index, "values": values, **row})

    def key(row):
        best = row.get("best")
        if not best or best["metric"] != metric:
            return (1, 0.0, row["trial"])
        return (0, best["value"] if mode == "min" else -best["value"], row["trial"])

    return sorted(out, key=key)


def edges(folder: Path, ranked: list[dict]) -> list[str]:
    """A warning for each searched number whose best trial took the smallest or largest value tried (of three or
    more): the optimum may lie beyond the range."""
    record = load(folder)
    scored = [r for r in ranked if r.get("best")]
    warnings = []
    if len(scored) < 3:
        return warnings
    for spec in record["specs"]:
        flag = spec["flag"]
        tried = sorted({r["values"][flag] for r in scored if isinstance(r["values"][flag], (int, float))})
        top = scored[0]["values"][flag]
        if len(tried) >= 3 and top in (tried[0], tried[-1]):
            side = "smallest" if top == tried[0] else "largest"
            warnings.append(f"warning: the best {scored[0]['best']['metric']} came with the {side} {flag} tried "
                            f"({top}): the best value may lie beyond the range; search further that way")
    return warnings


def status_main(argv: list[str]) -> int:
    """`launch status SWEEP_DIR [--json]`."""
    parser = argparse.ArgumentParser(prog="launch status", description="How a sweep stands: its trials, best first.")
    parser.add_argument("folder", type=Path, metavar="SWEEP_DIR")
    parser.add_argument("--json", action="store_true", help="one JSON object per trial, for scripts")
    args = parser.parse_args(argv)
    print("\n".join(json.dumps(row) for row in rows(args.folder)) if args.json else status_text(args.folder))
    return 0


def status_text(folder: Path) -> str:
    """`launch status SWEEP_DIR`: the trials as a table, best first, the edge warnings, and the pictures drawn."""
    record = load(folder)
    ranked = rows(folder)
    flags_ = [s["flag"] for s in record["specs"]]
    cells = [["TRIAL", "STATE", *(f[2:] for f in flags_), f"BEST {record['best'][0]} ({record['best'][1]})",
              "STEP"]]
    for row in ranked:
        best = row.get("best")
        cells.append([str(row["trial"]), row["state"], *(str(row["values"][f]) for f in flags_),
                      f"{best['value']:.4g} @{best['step']}" if best else "-",
                      f"{row['step']}/{row['total_steps']}" if row.get("total_steps") else "-"])
    lines = [f"sweep {record['name']}: {folder}", columns(cells), *edges(folder, ranked)]
    reasons = [f"  trial {r['trial']}: {first_line(r['reason'])}" for r in ranked
               if r.get("reason") and r["state"] not in ("completed", "stopped")]
    drawn = draw(folder, record, ranked)
    if drawn:
        lines.append(f"pictures: {', '.join(str(p) for p in drawn)}")
    return "\n".join(lines + reasons)


def draw(folder: Path, record: dict, ranked: list[dict]) -> list[Path]:
    """A picture per searched number: the best metric of each trial against its value (a log axis for a log
    range), in SWEEP_DIR/pictures."""
    scored = [r for r in ranked if r.get("best")]
    if not scored:
        return []
    from ..runs import pictures

    written = []
    for spec in record["specs"]:
        points = [(r["values"][spec["flag"]], r["best"]["value"]) for r in scored]
        if all(isinstance(x, (int, float)) for x, _ in points):
            path = folder / "pictures" / f"{spec['flag'][2:]}.png"
            pictures.save(pictures.sweep(points, spec, record["best"], record["name"]), path)
            written.append(path)
    return written
