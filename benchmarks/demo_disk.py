"""How much disk does `thinkfast demo` use? Runs the demo into a fresh --out folder and polls the folder's size.

    python benchmarks/demo_disk.py DIR [--interval 0.05] [--out benchmarks/demo_disk] [-- extra demo arguments]

DIR must not exist. The size is the sum of the files' sizes under DIR (`thinkfast.utils.folder_bytes`, what the
demo's own disk check counts), read every --interval seconds, so a copy that lives shorter than that can be missed:
the peak is a lower bound. Records the peak, when it happened, what each top-level folder held then, the size at
the end, and what the demo asks for before it starts (`DISK_PER_TEACHER_BYTE` x the teacher's weights).
Writes --out .md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def by_top_folder(root: Path) -> dict[str, int]:
    from thinkfast.utils import folder_bytes

    sizes = {}
    with os.scandir(root) as entries:
        for entry in entries:
            path = Path(entry.path)
            sizes[entry.name] = folder_bytes(path) if entry.is_dir() else path.stat().st_size
    return sizes


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--interval", type=float, default=0.05)
    ap.add_argument("--out", default="benchmarks/demo_disk")
    args = ap.parse_args(argv)
    root = Path(args.dir)
    if root.exists():
        raise SystemExit(f"{root}: exists; pass a new folder so the whole run is measured")

    from thinkfast.demo import DISK_PER_TEACHER_BYTE
    from thinkfast.embedded import embedded_teacher_dir
    from thinkfast.utils import folder_bytes

    teacher_bytes = (embedded_teacher_dir() / "model.safetensors").stat().st_size
    cmd = [sys.executable, "-m", "thinkfast", "demo", "--out", str(root), *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak, peak_at, peak_parts, polls = 0, 0.0, {}, 0
    while proc.poll() is None:
        size = folder_bytes(root)
        polls += 1
        if size > peak:
            peak, peak_at = size, time.perf_counter() - t0
            try:
                peak_parts = by_top_folder(root)
            except OSError:  # a file renamed away between the walk and this one
                pass
        time.sleep(args.interval)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the demo exited with {proc.returncode}; nothing recorded")
    end = folder_bytes(root)
    own_clock = json.loads((root / "demo.json").read_text()).get("wall_seconds")
    mib = 2**20
    row = {"command": " ".join(["thinkfast", "demo", "--out", str(root), *extra]), "wall_seconds": round(wall, 1),
           "demo_wall_seconds": own_clock, "polls": polls, "interval_seconds": args.interval, "peak_bytes": peak, "peak_at_seconds": round(peak_at, 1),
           "peak_by_folder_bytes": peak_parts, "end_bytes": end, "teacher_weights_bytes": teacher_bytes,
           "asked_bytes": DISK_PER_TEACHER_BYTE * teacher_bytes}
    md = ["# Disk used by `thinkfast demo`", "",
          f"`python benchmarks/demo_disk.py {args.dir} --interval {args.interval}`"
          + (f" `-- {' '.join(extra)}`" if extra else "") + f": the folder's size every {args.interval} s "
          f"({polls} polls over {wall:.0f} s from the start of the command, {own_clock:.0f} s in the demo's own clock, "
          f"`demo.json`; a copy living shorter than a poll can be missed, so the peak is a lower bound).", "",
          "| | MiB |", "|---|---:|",
          f"| peak (at {peak_at:.0f} s) | {peak / mib:.1f} |", f"| end | {end / mib:.1f} |",
          f"| asked for before the first step ({DISK_PER_TEACHER_BYTE} x the teacher's {teacher_bytes / mib:.1f} MiB) | "
          f"{DISK_PER_TEACHER_BYTE * teacher_bytes / mib:.1f} |", "",
          "At the peak: " + ", ".join(f"{name} {size / mib:.1f} MiB" for name, size in
                                      sorted(peak_parts.items(), key=lambda kv: -kv[1]) if size >= mib // 10) + "."]
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    Path(args.out + ".json").write_text(json.dumps(row, indent=1) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
