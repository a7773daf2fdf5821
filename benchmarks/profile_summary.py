"""Summarize py-spy raw (collapsed) stacks: where each thread spends its samples.

``bench.py --profile aiodcp_sync`` records ``results/profile-<scenario>-<ckpt>-<loader>-r<n>.txt``
(py-spy ``--threads --idle --format raw``). This prints, per thread, the share of samples that
were idle, and the functions with the most inclusive and self samples (``--top``), so the
question "where does the load spend its time" has an answer in text.

    python profile_summary.py results/profile-full_1file-aiodcp_sync-r0.txt [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

_THREAD = re.compile(r"^thread \(")
_IDLE_FUNCS = (
    "Condition.wait (threading.py",
    "select (selectors.py",
    "_worker (concurrent",
    "PeakRSS._run",
)


def parse(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        frames, _, count = line.rpartition(" ")
        try:
            stacks.append((frames.split(";"), int(count)))
        except ValueError:
            continue
    return stacks


def thread_of(frames: list[str]) -> tuple[str, list[str]]:
    """(thread label, frames without process/thread entries)."""
    label = "?"
    rest = []
    for f in frames:
        if f.startswith("process "):
            continue
        m = _THREAD.match(f)
        if m:
            label = f
            continue
        rest.append(f)
    return label, rest


def summarize(path: Path, top: int, focus: str = "") -> str:
    stacks = parse(path)
    by_thread: dict[str, list[tuple[list[str], int]]] = collections.defaultdict(list)
    for frames, count in stacks:
        label, rest = thread_of(frames)
        if focus and label.endswith("MainThread") and not any(focus in f for f in rest):
            continue  # the main thread outside the load (imports, allocation, checking)
        by_thread[label].append((rest, count))
    total = sum(c for _, c in stacks)
    out = [f"{path.name}: {total} samples, {len(by_thread)} threads"]
    for label, entries in sorted(by_thread.items(), key=lambda kv: -sum(c for _, c in kv[1])):
        n = sum(c for _, c in entries)
        inclusive: collections.Counter[str] = collections.Counter()
        own: collections.Counter[str] = collections.Counter()
        idle = 0
        for frames, c in entries:
            for f in set(frames):
                inclusive[f] += c
            if frames:
                own[frames[-1]] += c
                if any(x in frames[-1] for x in _IDLE_FUNCS):
                    idle += c
        out.append("")
        out.append(f"== {label}: {n} samples ({n / total:.0%}), idle-ish leaf {idle / n:.0%}")
        out.append("  inclusive:")
        for f, c in inclusive.most_common(top):
            out.append(f"    {c / n:6.1%}  {f}")
        out.append("  self (leaf):")
        for f, c in own.most_common(top):
            out.append(f"    {c / n:6.1%}  {f}")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=20)
    p.add_argument(
        "--focus",
        default="read_data",
        help="keep main-thread samples whose stack has this frame (default: the DCP read)",
    )
    args = p.parse_args()
    for f in args.files:
        print(summarize(f, args.top, args.focus))
        print()


if __name__ == "__main__":
    main()
