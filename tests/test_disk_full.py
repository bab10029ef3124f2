"""A disk that fills up, or a file-size limit, mid-run: one line naming the output and what to do, exit 2, what
was saved before kept, and the same command (with --resume where it needs one) continues the run."""

import errno
import os
import resource
import subprocess
import sys

import pytest
import torch
from conftest import write_distill_files
from safetensors import SafetensorError

import thinkfast.utils as utils
from thinkfast.cli import main
from thinkfast.distill.toy import char_tokenizer
from thinkfast.utils import atomic_dir, write_failure

FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_distill_files(tmp_path_factory.mktemp("disk"), char_tokenizer())


def _distill_args(root, out, *extra):
    return ["distill", "--teacher", str(root / "teacher"), "--data", f"jsonl:{root}/chain.jsonl?solution=solution",
            "--seq-len", "64", "--batch-size", "2", "--instruction", "none", "--no-progress", "--stages", "matrix,kd",
            "--tokens", "256,384", "--out", str(out), *extra]


def test_library_write_errors_become_the_os_error_behind_them(tmp_path, monkeypatch):
    err = write_failure(SafetensorError(FULL), tmp_path / "ckpt")
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC and err.filename == str(tmp_path / "ckpt")
    # torch.save's zip writer carries no errno: a nearly full disk makes it ENOSPC, else a plain I/O error
    torch_full = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    monkeypatch.setattr(utils, "free_bytes", lambda path: 1 << 20)
    assert write_failure(torch_full, tmp_path).errno == errno.ENOSPC
    monkeypatch.setattr(utils, "free_bytes", lambda path: 1 << 40)
    monkeypatch.setattr(utils, "_file_size_limited", lambda: False)
    assert write_failure(torch_full, tmp_path).errno == errno.EIO
    # ... unless the process runs under `ulimit -f`, the likelier cause then
    monkeypatch.setattr(utils, "_file_size_limited", lambda: True)
    assert write_failure(torch_full, tmp_path).errno == errno.EFBIG
    # not write failures: a reader's error, any other error
    assert write_failure(RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory")) is None
    assert write_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert write_failure(SafetensorError("Error while deserializing header: HeaderTooLarge")) is None
    # an OSError from a bare write() gets the path it was writing
    assert write_failure(OSError(errno.ENOSPC, "No space left on device"), tmp_path / "x").filename == str(tmp_path / "x")


def test_a_failed_save_leaves_the_old_folder_and_names_the_folder_not_its_temporary_copy(tmp_path):
    final = tmp_path / "ckpt"
    with atomic_dir(final) as d:
        (d / "model.safetensors").write_text("old")
    with pytest.raises(OSError) as caught:
        with atomic_dir(final) as d:
            (d / "model.safetensors").write_text("new, half written")
            raise SafetensorError(FULL)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(final)
    assert (final / "model.safetensors").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folder left behind


@pytest.mark.parametrize("failure, needles", [
    (SafetensorError(FULL), ["no space left on its disk", "MiB free", "free some space or choose another --out",
                             "re-run the same command with --resume"]),
    # shutil's copies name the source first and the destination second: a full disk is the destination's
    (OSError(errno.ENOSPC, "No space left on device", "/pkg/assets/model.safetensors", None, "DEST/model.safetensors"),
     ["DEST/model.safetensors: no space left on its disk"]),
    (OSError(errno.EFBIG, "File too large"), ["file too large", "ulimit -f"]),
    (OSError(errno.EIO, "Input/output error"), ["Input/output error; check the disk", "re-run the same command with --resume"]),
    (OSError(errno.EROFS, "Read-only file system", "RO/s.jsonl.lock"),
     ["RO/s.jsonl.lock: Read-only file system; this command writes there", "work on a copy in a writable folder"]),
    (OSError(errno.EACCES, "Permission denied", "DATA/x.jsonl"), ["DATA/x.jsonl: Permission denied; check its permissions"]),
])
def test_a_full_disk_is_one_line_saying_what_to_do(tmp_path, capsys, monkeypatch, failure, needles):
    import thinkfast.commands.distill as distill_cmd

    def fails(args):
        raise failure

    monkeypatch.setattr(distill_cmd, "run_distill", fails)
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("{}")  # a run that had started: the same command continues it with --resume
    assert main(["distill", "--teacher", "t", "--stages", "sft", "--tokens", "8", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    if not getattr(failure, "filename", None) and getattr(failure, "errno", None) != errno.EIO:  # EIO may be a read
        assert str(out) in err  # a bare write() names no file: the line names the output


def test_errors_that_are_not_write_failures_still_raise(monkeypatch, capsys):
    import thinkfast.commands.distill as distill_cmd

    def bug(args):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(distill_cmd, "run_distill", bug)
    with pytest.raises(RuntimeError, match="mat1"):
        main(["distill", "--teacher", "t", "--stages", "sft", "--tokens", "8", "--out", "o"])
    assert capsys.readouterr().err == ("thinkfast distill: unexpected RuntimeError, a bug: please report it with the "
                                       "traceback below and the output of `thinkfast env`\n")


def _limited(max_file_bytes):
    def set_limit():  # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG instead of killing it
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))
    return set_limit


def test_a_real_write_failure_mid_run_stops_in_one_line_and_the_run_continues(files, tmp_path):
    """A separate process under a file-size limit smaller than a checkpoint: its first checkpoint fails inside
    safetensors. Then, without the limit, --resume finishes the run with the weights of a run never stopped."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "thinkfast", *_distill_args(files, out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=_limited(16_000), timeout=300)
    assert first.returncode == 2, first.stderr
    assert "Traceback" not in first.stderr, first.stderr
    last = first.stderr.strip().splitlines()[-1]
    assert last.startswith("thinkfast distill: error: ") and "file too large" in last, first.stderr
    assert "stages/01-matrix/ckpt" in last, last  # names the checkpoint being written
    assert (out / "run.json").is_file() and not (out / "model.safetensors").exists()
    assert not [p for p in out.rglob(".*tmp-*")], "a temporary folder was left behind"

    again = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    clean = tmp_path / "clean"
    assert main(_distill_args(files, clean)) == 0
    from safetensors.torch import load_file

    resumed, fresh = load_file(out / "model.safetensors"), load_file(clean / "model.safetensors")
    assert resumed.keys() == fresh.keys()
    assert all(torch.equal(resumed[k], fresh[k]) for k in fresh)


def test_distill_warns_at_the_start_when_the_disk_looks_too_small(files, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(utils, "free_bytes", lambda path: 0)
    with caplog.at_level("WARNING"):
        assert main(_distill_args(files, tmp_path / "run")) == 0  # a warning: the estimate is rough
    lines = [r.getMessage() for r in caplog.records if "MiB free" in r.getMessage()]
    assert len(lines) == 1 and "this run writes about" in lines[0] and "choose another --out" in lines[0], lines


def test_demo_refuses_a_disk_too_small_before_any_step(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(utils, "free_bytes", lambda path: 10 << 20)
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "its disk has 10 MiB free, and the demo writes about" in lines[0], err
    assert "free some space or choose another --out" in lines[0]
    assert not out.exists()  # no step ran, and no record of a run that a re-run with other flags would be refused for
    assert main(["demo", "--no-progress", "--out", str(out)]) == 2  # not --quick: other settings
    assert "its disk has 10 MiB free" in capsys.readouterr().err
