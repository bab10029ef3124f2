"""The README's demo results are read from the run kept in benchmarks/demo_run/: its tables must say what that
run's metrics.json and demo.json say, so neither can change without the other."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "demo_run"


def _section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(title)
    end = text.find("\n## ", start)
    return text[start:end if end >= 0 else None]


def _rows(section: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith(f"| {first_cell}")]


@pytest.fixture(scope="module")
def run():
    return (json.loads((RUN / "metrics.json").read_text()), json.loads((RUN / "demo.json").read_text()))


def test_the_results_table_is_the_recorded_runs(run):
    metrics, _ = run
    section = _section("### What it measured")
    columns = [("pass_at_k", 1), ("pass_at_k", 8), ("pass_at_k", 32), ("maj_at_k", 8), ("maj_at_k", 32), ("bon_at_k", 8),
               ("bon_at_k", 32), ("weighted_bon_at_k", 32)]
    seen = set()
    for name, e in metrics["models"].items():
        (row,) = _rows(section, f"{name} (")
        want = [f"{e[key][str(k)]:.3f}" for key, k in columns]
        want += [f"{e['seconds_per_sample']:.3f}", f"{e['tokens_per_second']:,.0f}", f"{e['mean_gen_tokens']:.0f}"]
        assert row[1:] == want, name
        seen.add(name)
    assert seen == {"teacher", "llamba", "hybrid"}


def test_the_claims_table_and_the_times_are_the_recorded_runs(run):
    metrics, demo = run
    section = _section("### What it measured")
    claims = {c["claim"]: c for c in metrics["claims"]}
    teacher_s = metrics["models"]["teacher"]["seconds_per_sample"]

    def interval(c):
        lo, hi = c["margin_ci"]
        shown = [f"{v:+.1e}" if abs(v) < 1e-3 else f"{v:+.3f}" for v in (lo, hi)]
        return f"margin {c['margin']:+.3f}, interval [{shown[0]}, {shown[1]}]"

    llamba = claims["llamba pass@1 >= 0.8 x teacher's"]
    hybrid = claims["hybrid pass@1 >= 0.9 x teacher's"]
    coverage = next(c for k, c in claims.items() if "covers >= teacher pass@8" in k)
    majority = claims["... and its majority vote >= teacher maj@8"]
    for c in (llamba, hybrid, coverage, majority):
        assert interval(c).replace("margin ", "") in section.replace("margin ", ""), c["claim"]
    for role, shown in (("llamba", "Llamba"), ("hybrid", "hybrid")):
        ratio = metrics["models"][role]["seconds_per_sample"] / teacher_s
        assert re.search(rf"\| {shown} seconds per sample <= 0\.7x the teacher's \| {ratio:.2f}x \|", section)
    assert f"(0.{round(8 * teacher_s * 100):02d} s)" in section  # the teacher's time for 8 samples
    assert not llamba["held"] and "**did not hold**" in section
    assert f"Whole demo {demo['wall_seconds']:.0f} s" in section
    spans = demo["step_seconds"]
    assert (f"the Llamba {spans['llamba']:.0f} s and the hybrid {spans['hybrid']:.0f} s" in section
            and f"sampling {spans['sample']:.0f} s, reward model {spans['reward']:.0f} s" in section)
