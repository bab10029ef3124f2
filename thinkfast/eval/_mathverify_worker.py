"""A math-verify grading worker: one process, one item at a time, JSON lines over stdin/stdout.

Started by `thinkfast.eval.grading.MathGraderPool` as a plain script (not `import thinkfast`: that would load
torch into every worker). It imports only the standard library and math-verify, so a worker starts in about
half a second. The parent enforces the time limit by killing this process: math-verify's own SIGALRM timeouts
are switched off (`parsing_timeout=None, timeout_seconds=None`), since sympy can hang inside C code where a
signal would never be seen anyway.

Protocol (one JSON object per line):
  worker -> parent  {"ready": true}                          once, after importing math-verify
                    {"fatal": "reason"}                      when math-verify cannot be imported
  parent -> worker  {"id": 7, "gold": "...", "pred": "..."}  gold is wrapped in $...$ by the parent
  worker -> parent  {"id": 7, "correct": true|false, "error": null | "reason"}
End of input (the parent closed the pipe or died) ends the worker.
"""

import json
import logging
import os
import sys


def cap_address_space(mib: int) -> None:
    """A runaway sympy computation fails with MemoryError, not the machine. Best effort and Linux only: macOS
    neither enforces RLIMIT_AS nor takes it (setrlimit raises ValueError there), and a lower hard limit already
    set (`ulimit -v`) cannot be raised: it stays the cap. A worker without a cap still grades."""
    if not sys.platform.startswith("linux"):
        return
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = mib << 20 if hard == resource.RLIM_INFINITY else min(mib << 20, hard)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (ValueError, OSError):
        pass


def main() -> None:
    if len(sys.argv) > 1:
        cap_address_space(int(sys.argv[1]))
    # the protocol owns the real stdout; anything a library prints goes to stderr instead
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(obj) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    try:
        logging.disable(logging.WARNING)  # math-verify warns on every call that its own timeouts are off
        from math_verify import parse, verify

        verify(parse("$1$", parsing_timeout=None), parse("$1$", parsing_timeout=None), timeout_seconds=None)  # warm up
    except Exception as e:  # noqa: BLE001  reported to the parent, which raises a clear error
        send({"fatal": f"{type(e).__name__}: {e}"})
        return
    send({"ready": True})

    for line in sys.stdin:
        item = json.loads(line)
        try:
            gold = parse(item["gold"], parsing_timeout=None)
            if not gold:
                send({"id": item["id"], "correct": None, "error": "math-verify could not parse the gold answer"})
                continue
            pred = parse(item["pred"], parsing_timeout=None)
            correct = bool(verify(gold, pred, timeout_seconds=None)) if pred else False
            send({"id": item["id"], "correct": correct, "error": None})
        except Exception as e:  # noqa: BLE001  a math-verify failure marks one item ungraded, never wrong
            send({"id": item["id"], "correct": None, "error": f"math-verify raised {type(e).__name__}: {str(e)[:200]}"})


if __name__ == "__main__":
    main()
