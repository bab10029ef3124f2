"""`thinkfast env`: the versions, hardware and packages a bug report needs."""

import importlib.metadata
import json
import re
import types

import torch
import transformers

from thinkfast.cli import main


def test_env_names_versions_hardware_and_what_is_missing(capsys, monkeypatch):
    installed = importlib.metadata.version

    def version(name):
        if name == "peft":
            raise importlib.metadata.PackageNotFoundError(name)
        return installed(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    assert re.search(rf"^torch +{re.escape(torch.__version__)} ", text, re.M)
    assert re.search(rf"^transformers +{re.escape(transformers.__version__)} ", text, re.M)
    assert re.search(r"^peft +not installed +\[LoRA adapters\]$", text, re.M)
    assert re.search(r"^gpus +none visible to torch$", text, re.M)

    assert main(["env", "--json"]) == 0
    env = json.loads(capsys.readouterr().out)
    assert env["torch"] == torch.__version__ and env["packages"]["transformers"] == transformers.__version__
    assert env["packages"]["peft"] is None and env["gpus"] == []
    assert 0 < env["memory_available_bytes"] <= env["memory_total_bytes"]


def test_env_lists_each_gpu(capsys, monkeypatch):
    """Simulated (no GPU here): what a GPU machine's report shows."""
    props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=80 * 2**30, major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^gpus +NVIDIA H100 80GB HBM3 \(80.0 GiB, sm 9.0\); NVIDIA H100 80GB HBM3 \(80.0 GiB, sm 9.0\)$",
                     text, re.M)
    assert re.search(r"^torch +\S+ \(CUDA 13.0[,)]", text, re.M)


def test_a_reader_that_leaves_early_gets_no_error_line():
    """`thinkfast env | head`: the pipe closes before env writes; that is no error to report."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "thinkfast", "env", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # long before env has gathered what it prints
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Broken pipe" not in err and "Traceback" not in err and proc.returncode in (0, 1), err
