"""Beyond this Linux box: macOS (no /proc, ru_maxrss in bytes, no RLIMIT_AS), native Windows (refused), Python 3.10.

Nothing here runs on a Mac or on Windows: each test simulates the other platform (sys.platform, a missing
/proc, what psutil or sysctl would answer) on Linux, or reads the source for imports another platform lacks."""

import ast
import builtins
import json
import resource
import subprocess
import sys
import types
from pathlib import Path

import pytest

import thinkfast
from thinkfast.engine import bench, engine, run
from thinkfast.errors import ConfigError, ThinkfastError
from thinkfast.eval import _mathverify_worker as worker
from thinkfast.eval import grading
from thinkfast.utils import check_device

PACKAGE = Path(thinkfast.__file__).parent
TESTS = Path(__file__).parent
POSIX_ONLY = {"resource", "fcntl", "termios", "pwd", "grp", "pty", "tty", "posix"}


def no_proc(monkeypatch, *modules):
    """No /proc (macOS) for `modules`' own reads: opening anything under it fails there as on a Mac. Libraries
    (psutil) still read it, standing in for what they ask the macOS kernel."""
    def open_without_proc(path, *args, **kwargs):
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return builtins.open(path, *args, **kwargs)

    for module in modules:
        monkeypatch.setattr(module, "open", open_without_proc, raising=False)


def _imports(tree):
    """(module name, guarded) for every import in `tree`; guarded: inside a function or a try that catches ImportError."""
    out = []

    def visit(node, guarded):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            guarded = True
        if isinstance(node, ast.Try) and any(
                h.type is not None and {n.id for n in ast.walk(h.type) if isinstance(n, ast.Name)} & {"ImportError", "ModuleNotFoundError"}
                for h in node.handlers):
            for child in node.body:
                visit(child, True)
            for child in node.handlers + node.orelse + node.finalbody:
                visit(child, guarded)
            return
        if isinstance(node, ast.Import):
            out.extend((a.name.split(".")[0], guarded) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module.split(".")[0], guarded))
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(tree, False)
    return out


# ------------------------------------------------------------------------------------------------ Windows


def test_the_command_refuses_native_windows_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "platform", "win32")
    from thinkfast.cli import main

    assert main(["--help"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Linux and macOS" in err and "WSL2" in err


def test_no_thinkfast_module_needs_a_posix_only_module_to_import():
    """`import thinkfast` and its modules must import on Windows (no resource, fcntl ...): those are imported
    where they are used, or behind an ImportError fallback."""
    bare = [f"{p.relative_to(PACKAGE.parent)}: import {name}" for p in sorted(PACKAGE.rglob("*.py"))
            for name, guarded in _imports(ast.parse(p.read_text())) if name in POSIX_ONLY and not guarded]
    assert bare == []


def test_math_grading_refuses_native_windows_in_one_line(monkeypatch):
    monkeypatch.setattr(sys, "platform", "win32")
    with pytest.raises(ThinkfastError, match="not on native Windows; use WSL2") as e:
        grading.MathGraderPool(workers=1)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ Python 3.10


def test_tomllib_has_its_python_310_fallback():
    """tomllib is 3.11+; requires-python is >= 3.10, where tomli (a dependency there) stands in."""
    bare = [str(p.relative_to(PACKAGE.parent)) for p in sorted(PACKAGE.rglob("*.py")) + sorted(TESTS.rglob("*.py"))
            for name, guarded in _imports(ast.parse(p.read_text())) if name == "tomllib" and not guarded]
    assert bare == []


# ------------------------------------------------------------------------------------------------ math grading workers


def test_worker_memory_cap_is_linux_only_and_best_effort(monkeypatch):
    calls = []

    def setrlimit(which, limits):
        calls.append((which, limits))
        raise ValueError("current limit exceeds maximum limit")  # what macOS answers for RLIMIT_AS

    monkeypatch.setattr(resource, "setrlimit", setrlimit)
    monkeypatch.setattr(sys, "platform", "darwin")
    worker.cap_address_space(4096)  # not tried: macOS does not enforce it
    assert calls == []
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(resource, "getrlimit", lambda which: (3 << 30, 3 << 30))  # `ulimit -v` set lower already
    worker.cap_address_space(4096)  # refused: the worker still starts, uncapped by us
    assert calls == [(resource.RLIMIT_AS, (3 << 30, 3 << 30))]  # never above the hard limit


MACOS_SETRLIMIT = """
import resource, runpy, sys
def refuse(which, limits):
    raise ValueError("current limit exceeds maximum limit")  # what macOS answers for RLIMIT_AS
resource.setrlimit = refuse
sys.platform = "darwin"
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="simulates on Linux")
@pytest.mark.parametrize("where", ["macos", "ulimit -v"])
def test_a_worker_starts_where_its_memory_cap_is_refused(where):
    """Each worker died at start (no math item could be graded) on macOS, and on Linux under `ulimit -v` below
    the worker's 4 GiB cap, where raising the hard limit is refused."""
    def lower_limit():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    worker_cmd = [str(grading.WORKER_SCRIPT), str(grading.WORKER_MEMORY_MB)]
    cmd = [sys.executable, "-I", "-u"] + (["-c", MACOS_SETRLIMIT] if where == "macos" else []) + worker_cmd
    said = subprocess.run(cmd, input="", capture_output=True, text=True, timeout=60,
                          preexec_fn=lower_limit if where == "ulimit -v" else None)
    assert said.returncode == 0 and json.loads(said.stdout.splitlines()[0]) == {"ready": True}, said.stderr[-300:]


def test_workers_that_die_at_start_stop_grading_with_one_line_saying_how_to_see_why(tmp_path, monkeypatch):
    dying = tmp_path / "worker.py"
    dying.write_text("raise SystemExit(1)\n")
    monkeypatch.setattr(grading, "WORKER_SCRIPT", dying)
    pool = grading.MathGraderPool(workers=2, startup_timeout=30)
    with pytest.raises(ThinkfastError, match="die on start-up") as e:
        pool.verify_many([(r"\boxed{1}", "$1$")])
    assert "\n" not in str(e.value) and f"{dying} {grading.WORKER_MEMORY_MB} < /dev/null" in str(e.value)
    assert pool.workers == []


# ------------------------------------------------------------------------------------------------ bench on macOS


@pytest.mark.parametrize("platform,factor", [("darwin", 1), ("linux", 1024)])
def test_whole_process_peak_in_bytes_on_each_platform(monkeypatch, platform, factor):
    """getrusage's ru_maxrss: bytes on macOS, KiB on Linux (a recorded peak 1024x too large otherwise)."""
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(resource, "getrusage", lambda who: types.SimpleNamespace(ru_maxrss=3_000_000))
    assert bench._peak_rss_bytes(since_reset=False) == 3_000_000 * factor


def test_a_row_peak_that_cannot_be_restarted_is_recorded_only_when_the_row_set_it(monkeypatch):
    """Without Linux's reset the high-water mark may be loading's: subtracting the loaded model's RSS from it
    would call loading's memory the row's."""
    monkeypatch.setattr(bench, "_peak_rss_bytes", lambda since_reset: 800)
    assert bench._cpu_row_peak(base=100, since_reset=False, peak_before=500) == (700, None)  # the row raised it
    peak, why = bench._cpu_row_peak(base=100, since_reset=False, peak_before=800)
    assert peak is None and "loading" in why
    assert bench._cpu_row_peak(base=100, since_reset=True, peak_before=None) == (700, None)  # Linux: since the reset
    peak, why = bench._cpu_row_peak(base=None, since_reset=False, peak_before=500)
    assert peak is None and "cannot be read" in why


@pytest.mark.parametrize("with_psutil", [False, True])
def test_a_bench_row_without_proc_records_no_wrong_peak(monkeypatch, with_psutil):
    """No /proc (macOS): the row is timed and its peak is either its own or left out with the reason, never a
    crash. Without psutil either, nothing can read the resident memory."""
    no_proc(monkeypatch, bench, engine)
    if not with_psutil:
        monkeypatch.setitem(sys.modules, "psutil", None)
    row = bench.run_row("tiny", "teacher", batch=1, prompt_len=4, gen_len=4)
    assert "error" not in row, row["error"]
    assert row["tokens_per_s"] > 0
    assert (row["peak_mem_bytes"] is None) == ("peak_mem_unmeasured" in row)
    if not with_psutil:
        assert row["peak_mem_bytes"] is None and "cannot be read" in row["peak_mem_unmeasured"]
    text = bench.markdown([row], "tiny", "test CPU", "thinkfast bench")
    if row["peak_mem_bytes"] is None:
        assert "| n/m |" in text and f"peak mem n/m: not measured ({row['peak_mem_unmeasured']})" in text
    logged = []
    monkeypatch.setattr(bench, "_run_isolated", lambda args, threads, role: dict(row))
    bench.run_bench("tiny", configs=[(1, 4, 4)], models=["teacher"], log=logged.append)
    assert logged[-1].startswith(f"  {row['tokens_per_s']:,.0f} tok/s")


# ------------------------------------------------------------------------------------------------ memory and CPU name


def test_free_memory_without_proc_comes_from_psutil(monkeypatch):
    """The engine refuses a batch whose decode state will not fit; on macOS that check had no figure to use."""
    no_proc(monkeypatch, engine)
    monkeypatch.setitem(sys.modules, "psutil", types.SimpleNamespace(
        virtual_memory=lambda: types.SimpleNamespace(available=123 * 2**20)))
    assert engine.available_memory(engine.torch.device("cpu")) == 123 * 2**20
    monkeypatch.setitem(sys.modules, "psutil", None)
    assert engine.available_memory(engine.torch.device("cpu")) is None  # unknown: the state is allocated unchecked


def test_cpu_name_on_macos_comes_from_sysctl(monkeypatch):
    """platform.processor() says only "arm" or "i386" on a Mac: a recorded benchmark's hardware line would too."""
    no_proc(monkeypatch, run)
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(run.platform, "processor", lambda: "arm")
    asked = []

    def sysctl(cmd, **kwargs):
        asked.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "Apple M2 Pro\n", "")

    monkeypatch.setattr(subprocess, "run", sysctl)
    assert run.hardware_string("cpu", threads=False).startswith("Apple M2 Pro")
    assert asked == [["sysctl", "-n", "machdep.cpu.brand_string"]]

    def no_sysctl(cmd, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", cmd[0])

    monkeypatch.setattr(subprocess, "run", no_sysctl)
    assert run.hardware_string("cpu", threads=False).startswith("arm")  # best effort: what platform says


# ------------------------------------------------------------------------------------------------ devices


@pytest.mark.parametrize("flag,fix", [("--device", "use --device cpu"), ("device", "use device='cpu'")])
def test_mps_is_refused_with_what_a_mac_user_should_use(flag, fix):
    with pytest.raises(ConfigError, match="thinkfast runs on cpu or cuda") as e:
        check_device("mps", flag)
    assert "MPS" in str(e.value) and str(e.value).endswith(f"on a Mac {fix}")
