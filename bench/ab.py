"""A/B of a bench script: this tree against an older revision, alternating runs in one session.

    python bench/ab.py --rev 2a2ae1a --rounds 2 -- bench/data_throughput.py --images 800 --repeat 3

The older revision is checked out as a git worktree in a temporary folder. Each round runs the
script once in each tree (old, then new, then the next round swaps the order), each run as its own
process importing its own tree's `pixeldit` (PYTHONPATH), writing `--json`. Every numeric list or
number under the JSON's "summary" is then reported per arm: the median over all rounds of the runs'
own medians, the spread (min-max), and new/old. Ratios that a bench measures against a baseline
in the same run (ours / bound) are the figures to compare: load drifts hit both arms alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def leaves(tree, prefix=()):
    """(path, value) for each number or list of numbers in a JSON tree; a list stands for its median."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from leaves(value, prefix + (str(key),))
    elif isinstance(tree, list) and tree and all(isinstance(x, (int, float)) for x in tree):
        yield "/".join(prefix), statistics.median(tree)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield "/".join(prefix), float(tree)


def run_arm(tree: Path, script: str, args: list[str], out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(tree / script), *args, "--json", str(out)]
    print(f"+ ({tree.name}) {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["summary"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", required=True, help="the older revision (the A arm)")
    ap.add_argument("--rounds", type=int, default=2, help="runs per arm, alternating")
    ap.add_argument("script", help="bench script, relative to the repository root; it must take --json PATH")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the script (after --)")
    a = ap.parse_args()
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    with tempfile.TemporaryDirectory(prefix="pixeldit-ab-") as tmp:
        old = Path(tmp) / f"old-{a.rev}"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), a.rev], check=True,
                       stdout=subprocess.DEVNULL)
        try:
            results = {"old": [], "new": []}
            for r in range(a.rounds):
                order = (("old", old), ("new", ROOT)) if r % 2 == 0 else (("new", ROOT), ("old", old))
                for arm, tree in order:
                    results[arm].append(dict(leaves(run_arm(tree, a.script, args, Path(tmp) / f"{arm}{r}.json"))))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)
    print(f"\nCPU: {cpu_model()}, {os.cpu_count()} logical CPUs; {a.rounds} rounds per arm, alternating")
    print(f"{'figure':<36} {'old median':>10} {'old spread':>15} {'new median':>10} {'new spread':>15} {'new/old':>8}")
    for key in results["new"][0]:
        if not all(key in run for run in results["old"]):
            continue
        o, n = [run[key] for run in results["old"]], [run[key] for run in results["new"]]
        mo, mn = statistics.median(o), statistics.median(n)
        print(f"{key:<36} {mo:10.3f} {min(o):7.3f}-{max(o):<7.3f} {mn:10.3f} {min(n):7.3f}-{max(n):<7.3f} "
              f"{mn / mo if mo else float('nan'):8.3f}")


if __name__ == "__main__":
    main()
