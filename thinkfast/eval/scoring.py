"""Samples files in, samples files out: (re)grade, add rewards, train a reward model from graded samples.

`score_files` rewrites each file atomically (a temporary file beside it, then one rename), keeping every field
and every line it did not touch (lines skipped with `skip_bad_lines` are copied through verbatim), and refuses
to replace a file that grew while it was being scored (a sampler still appending to it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from ..errors import DataError, ThinkfastError, option
from ..utils import HeldLock, atomic_write_text, progress_bar, recover_replaced, remove_temp_copies
from .grading import DEFAULT_TIMEOUT, grade_many
from .reward import (ORM_CONFIG, check_reward_model_out, ORMConfig, ORMTraining, OutcomeRewardModel, ProcessRewardModel, check_labels, load_backbone,
                     train_orm)
from .samples import Sample, check_drawn_from, read_samples, read_samples_file


class Questions:
    """The problems of data specs (the ones the samples were drawn from), by problem_id."""

    def __init__(self, data_specs):
        from ..data import load_problems

        self.specs = [data_specs] if isinstance(data_specs, str) else list(data_specs or [])
        self.problems = {str(p.id): p for spec in self.specs for p in load_problems(spec)}

    def check(self, samples: list[Sample]) -> None:
        """Every sample's problem is here, with the sample's gold answer and kind (ids alone can name other data)."""
        for s in samples:
            if s.problem_id not in self.problems:
                raise DataError(f"{s.where}: problem_id {s.problem_id!r} is not in the data given with "
                                f"{option('--data', 'data')}; pass the spec the samples were drawn from")
        check_drawn_from(samples, self.problems, option("--data ", "data="), ", ".join(self.specs))


def questions_for(samples: list[Sample], questions: Questions | None) -> list[str | None]:
    """The question of each sample: from the data specs when given (checked to be the samples' data), else a
    `question` field on the line."""
    if questions is not None:
        questions.check(samples)
        return [questions.problems[s.problem_id].question for s in samples]
    return [q if isinstance(q := s.record.get("question"), str) else None for s in samples]


def train_reward_model(samples_paths, backbone: str, out_dir, data=None, orm: ORMConfig | None = None,
                       training: ORMTraining | None = None, skip_bad_lines: bool = False, device=None, log=print) -> OutcomeRewardModel:
    """Train an ORM on the graded samples of the given files and save it to `out_dir` (written atomically)."""
    check_reward_model_out(out_dir)  # before the samples are read and the backbone trains
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with HeldLock.beside(out, "let it finish, or choose another " + option("--out", "out_dir")):
        remove_temp_copies(out)  # a killed save's copy (a whole backbone)
        return _train_reward_model(samples_paths, backbone, out_dir, data, orm, training, skip_bad_lines, device, log)


def _train_reward_model(samples_paths, backbone, out_dir, data, orm, training, skip_bad_lines, device, log):
    sset = read_samples(samples_paths, skip_bad_lines)
    graded = [s for s in sset.samples if s.correct is not None]
    if not graded:
        raise DataError("no graded samples (every `correct` is null); run `thinkfast score` without a reward model to grade them first")
    check_labels([bool(s.correct) for s in graded])  # before the backbone loads (tens of seconds)
    qs = questions_for(graded, Questions(data) if data else None)
    cfg = orm or ORMConfig()
    cfg.uses_question = any(q is not None for q in qs)
    model, tokenizer = load_backbone(backbone, device)
    if not cfg.uses_question:  # after the backbone loads: a bad backbone's error stays the only line
        log("note: no questions (no --data and no `question` field): the verifier sees completions only")
    ungraded = len(sset.samples) - len(graded)
    log(f"training a reward model on {len(graded)} completions ({sum(s.correct for s in graded)} correct) of "
        f"{len({s.problem_id for s in graded})} problems; backbone {backbone} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params)"
        + (f"; {ungraded} ungraded samples left out (`thinkfast score` grades them)" if ungraded else ""))
    rm = train_orm(qs, [s.completion for s in graded], [bool(s.correct) for s in graded], [s.problem_id for s in graded],
                   model, tokenizer, cfg, training, log)
    rm.save(out_dir)
    return rm


def load_reward_model(path, device=None) -> OutcomeRewardModel:
    path = Path(path)
    if not path.exists() and path.parent.is_dir():  # a train-rm killed between its save's two renames left the model moved aside: put back
        with HeldLock.beside(path, "let it finish, then score"):  # never under a train-rm that is saving it
            recover_replaced(path)
    if not (path / ORM_CONFIG).is_file():
        raise DataError(f"{path}: not a reward model folder (no {ORM_CONFIG}); train one with `thinkfast train-rm`")
    return OutcomeRewardModel.load(path, device)


def score_files(paths, reward_model=None, prm: str | None = None, prm_aggregation: str = "min", data=None, regrade: bool = True,
                rescore: bool = False, skip_bad_lines: bool = False, batch_size: int = 16, device=None,
                grade_timeout: float = DEFAULT_TIMEOUT, log=print) -> dict:
    """Grade samples whose `correct` is null (every sample with `regrade="all"`, none with False) and fill `reward`
    (null ones, or all with `rescore`) in place.

    reward_model: an ORM folder (or a loaded OutcomeRewardModel); prm: a PRM hub id or folder. Returns counts."""
    if regrade not in (True, False, "all"):
        raise ThinkfastError(f"regrade={regrade!r}: give True (samples whose correct is null), 'all' or False")
    if reward_model is not None and prm is not None:
        raise ThinkfastError(f"give either {option('--reward-model', 'reward_model')} or {option('--prm', 'prm')}, not both")
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    if not paths:
        raise DataError("no samples files given")
    with contextlib.ExitStack() as held:
        for p in dict.fromkeys(paths):  # the samples run's own lock: its appends would be lost in the rewrite
            if p.is_file():
                held.enter_context(HeldLock.beside(p, "let it finish, then score"))
                remove_temp_copies(p)  # a killed score's rewrite
        return _score_files(paths, reward_model, prm, prm_aggregation, data, regrade, rescore, skip_bad_lines,
                            batch_size, device, grade_timeout, log)


def _score_files(paths, reward_model, prm, prm_aggregation, data, regrade, rescore, skip_bad_lines, batch_size, device,
                 grade_timeout, log) -> dict:
    files = [read_samples_file(p, skip_bad_lines) for p in paths]  # validate all before touching any
    for f in files:
        if not f.samples:  # "0 samples scored" would read as success
            what = (f"all {len(f.bad)} of its lines are malformed (first: line {f.bad[0].line}, {f.bad[0].reason})" if f.bad
                    else "it is empty")
            raise DataError(f"{f.path}: no samples to score ({what}); pass samples files written by `thinkfast sample`")
    sizes = {p: os.stat(p).st_size for p in paths}
    questions = Questions(data) if data else None
    if questions is not None:  # every file's problems, before the first file is rewritten
        questions.check([s for f in files for s in f.samples.values()])
    scorer = None
    if reward_model is not None:
        scorer = reward_model if isinstance(reward_model, OutcomeRewardModel) else load_reward_model(reward_model, device)
        if scorer.cfg.uses_question and questions is None and not all(
                isinstance(s.record.get("question"), str) for f in files for s in f.samples.values()):
            raise DataError(f"this reward model was trained with questions; pass {option('--data SPEC', 'data=SPEC')} (the data the samples were drawn from)")
    elif prm is not None:
        scorer = ProcessRewardModel.from_pretrained(prm, prm_aggregation, device)
    identity = scorer.identity if scorer is not None else None  # once: it hashes the backbone's weight files
    totals = {"files": len(files), "samples": 0, "regraded": 0, "ungraded": 0, "scored": 0, "skipped_lines": 0}
    for f in files:
        samples = list(f.samples.values())
        totals["samples"] += len(samples)
        totals["skipped_lines"] += len(f.bad)
        graded = scored = 0
        if regrade:
            todo = [s for s in samples if regrade == "all" or s.correct is None]
            if todo:
                results = grade_many([s.completion for s in todo], [s.gold for s in todo], [s.kind for s in todo], timeout=grade_timeout)
                for s, r in zip(todo, results):
                    s.record.update(correct=r.correct, answer=r.answer, grade_error=r.error)
                    s.correct, s.answer = r.correct, r.answer
                graded = sum(r.correct is not None for r in results)
                totals["regraded"] += graded
                totals["ungraded"] += len(results) - graded
        if scorer is not None:
            todo = [s for s in samples if rescore or s.reward is None]
            if not rescore:
                _check_reward_source(f.path, samples, identity, bool(todo), log)
            if todo:
                qs = questions_for(todo, questions)
                if isinstance(scorer, ProcessRewardModel) and any(q is None for q in qs):
                    raise DataError(f"the PRM needs each problem's question; pass {option('--data SPEC', 'data=SPEC')}")
                journal = RewardJournal(f.path, identity)
                kept = journal.read()  # what a killed score of this file already computed
                with progress_bar(len(todo), f"scoring {f.path.name}", "sample", leave=False) as bar:
                    left = [(s, q) for s, q in zip(todo, qs) if journal.key(s) not in kept]
                    bar.update(len(todo) - len(left))
                    for at in range(0, len(left), JOURNAL_EVERY):
                        part = left[at:at + JOURNAL_EVERY]
                        rewards = scorer.score([q for _, q in part], [s.completion for s, _ in part],
                                               batch_size=batch_size, progress=bar)
                        kept.update(journal.append([s for s, _ in part], rewards))
                for s in todo:
                    s.record["reward"] = kept[journal.key(s)]
                    s.record["reward_model"] = identity
                scored = len(todo)
                totals["scored"] += scored
        lines = list(f.lines)
        for i, s in f.samples.items():
            lines[i] = json.dumps(s.record, ensure_ascii=False)
        if lines == f.lines:  # e.g. --rescore with the same reward model: the same rewards again
            RewardJournal.remove(f.path)
            done = ", ".join(x for x in (f"{graded} graded" if graded else "", f"{scored} given a reward" if scored else "") if x)
            log(f"{f.path}: {len(samples)} samples, " + (f"{done} (the same values the file had); left as it was" if done
                                                          else "nothing to grade or score"))
            continue
        if os.stat(f.path).st_size != sizes[f.path]:
            raise DataError(f"{f.path} changed while it was being scored (is `thinkfast sample` still writing it?); re-run when sampling is done")
        mode = os.stat(f.path).st_mode & 0o777
        atomic_write_text(f.path, "\n".join(lines) + "\n" if lines else "")
        os.chmod(f.path, mode)  # the temporary file was private; keep the samples file's own permissions
        RewardJournal.remove(f.path)
        log(f"{f.path}: {len(samples)} samples" + (f", {len(f.bad)} bad line(s) kept as they were" if f.bad else ""))
    return totals


def _check_reward_source(path: Path, samples: list[Sample], identity: str, filling: bool, log) -> None:
    """Rewards already in a file come from this reward model: filling the missing ones from another (or keeping
    another's while told to score) would rank one problem's samples on two scales."""
    theirs = sorted({s.record.get("reward_model") for s in samples if s.reward is not None} - {None, identity})
    if theirs:
        raise DataError(f"{path}: its rewards come from another reward model ({', '.join(theirs)}; this one is {identity}); "
                        f"pass {option('--rescore', 'rescore=True')} to replace them all with this one's")
    unnamed = sum(s.reward is not None and s.record.get("reward_model") is None for s in samples)
    if unnamed and filling:
        log(f"note: {path}: {unnamed} reward(s) were written before files recorded their reward model; if another "
            f"model gave them, pass {option('--rescore', 'rescore=True')} so that one model scores every sample")


JOURNAL_EVERY = 512  # samples scored between two appends to the journal


class RewardJournal:
    """`FILE.rewards.partial`: the rewards a `score` run has computed for FILE so far, appended and flushed every
    JOURNAL_EVERY samples, since the file itself is rewritten only once all are scored. A killed run's journal
    gives the next run those rewards back (those of the same reward model, for completions of the same text)
    instead of scoring the whole file again; it is removed once the file is rewritten."""

    def __init__(self, path: Path, identity: str):
        self.path = path.with_name(path.name + ".rewards.partial")
        self.identity = identity

    @staticmethod
    def key(s: Sample) -> tuple:
        return s.problem_id, s.sample_idx, hashlib.sha256(s.completion.encode()).hexdigest()[:16]

    def read(self) -> dict[tuple, float]:
        kept: dict[tuple, float] = {}
        if not self.path.is_file():
            return kept
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):  # the kill's torn last line: cut, so the next append starts a line
            data = data[: data.rfind(b"\n") + 1]
            with open(self.path, "r+b") as f:
                f.truncate(len(data))
        for raw in data.decode("utf-8", errors="replace").splitlines():
            try:  # a torn last line (the kill) or another model's lines are left out
                rec = json.loads(raw)
                if rec["reward_model"] == self.identity:
                    kept[(str(rec["problem_id"]), int(rec["sample_idx"]), str(rec["text"]))] = float(rec["reward"])
            except (ValueError, KeyError, TypeError):
                continue
        return kept

    def append(self, samples: list[Sample], rewards) -> dict[tuple, float]:
        got = {self.key(s): float(r) for s, r in zip(samples, rewards)}
        text = "".join(json.dumps({"problem_id": k[0], "sample_idx": k[1], "text": k[2], "reward": r,
                                   "reward_model": self.identity}) + "\n" for k, r in got.items())
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return got

    @staticmethod
    def remove(path: Path) -> None:
        path.with_name(path.name + ".rewards.partial").unlink(missing_ok=True)
