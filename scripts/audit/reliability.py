"""Reliability audit: feed ``fewstep`` broken, hostile and unlucky inputs through its command line and count how each
ends, into ``docs/reliability.md`` (the ``audit`` section).

    python scripts/audit/reliability.py                 # every case (about 10 minutes on 2 CPU cores)
    python scripts/audit/reliability.py --only 1,3      # the cases of some failure classes
    python scripts/audit/reliability.py --no-write      # print the table only

Every case starts from a fresh copy of one tiny real run (the shipped digits teacher, LCM, 4 steps, checkpoints at
steps 2 and 4, EMA on) and its export, changes one thing, runs one ``fewstep`` command in a subprocess and judges:

* **handled**: the expected outcome: a refusal with exit 1 or 2 and one ``error:`` line, or a recovery (exit 0)
  whose warning names the problem, with nothing bad left behind;
* **traceback**: a Python traceback, or the process died (a signal, an exit status other than 0/1/2);
* **silent-wrong**: exit 0 (or a refusal) that hides a wrong result: code ran that never should, bad weights were
  written, another run's files were used or deleted, an input was accepted that should not be;
* **hang**: no end within the case's time limit.

The classes follow the failures a security and reliability review looks for: 1 code execution on resume, 2 non-finite
or exploding weights, 3 corrupted files, 4 another model's checkpoint, 5 reuse of an output directory, 6 changed
hyperparameters on resume, 7 an interrupted prune, 8 corrupt checkpoints and bad recipes (tracebacks), 9 YAML bombs,
10 an error in the middle of training, 11 two trainers on one directory, 12 exports, 13 code and weights from outside.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "quickstart" / "digits_lcm.yaml"
TINY = ["train.max_steps=4", "train.checkpoint_every=2", "train.keep_last=5", "train.sample_every=null",
        "train.ema_decay=0.9", "data.batch_size=8", "optim.warmup_steps=0"]  # fmt: skip
OUTCOMES = ("handled", "traceback", "silent-wrong", "hang")
CLASSES = {
    1: "code execution on resume (pickle)",
    2: "non-finite / exploding weights",
    3: "corrupted weight files",
    4: "another model's checkpoint",
    5: "reused output directory",
    6: "changed hyperparameters on resume",
    7: "interrupted pruning",
    8: "corrupt checkpoints, bad recipes, OS errors",
    9: "YAML bombs",
    10: "an error in the middle of training",
    11: "two trainers, torchrun without accelerate",
    12: "exports",
    13: "code and weights from outside",
}


@dataclass
class Result:
    rc: int | None
    out: str
    err: str
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.rc is None

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.err or (self.rc is not None and self.rc not in (0, 1, 2))

    @property
    def error_line(self) -> str:
        lines = [line for line in self.err.splitlines() if line.startswith("error:")]
        return lines[0] if lines else ""


@dataclass
class Verdict:
    item: int
    case: str
    outcome: str
    detail: str


@dataclass
class Audit:
    work: Path
    base: Path = field(init=False)
    export: Path = field(init=False)
    counter: int = 0

    def fewstep(self, *args: str, env: dict[str, str] | None = None, timeout: float = 180, cwd: Path | None = None,
                ) -> Result:  # fmt: skip
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    **(env or {})}  # fmt: skip
        began = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "fewstep", *args], capture_output=True, text=True,
                                  timeout=timeout, env=full_env, cwd=cwd or self.work)  # fmt: skip
        except subprocess.TimeoutExpired as err:
            out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
            return Result(None, out, "", time.perf_counter() - began)
        return Result(proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - began)

    def train(self, run: Path, *overrides: str, recipe: Path = RECIPE, **kw) -> Result:
        return self.fewstep("train", str(recipe), *TINY, f"output_dir={run}", *overrides, **kw)

    def setup(self) -> None:
        self.base, self.export = self.work / "base" / "run", self.work / "base" / "export"
        for res in (self.train(self.base), self.fewstep("export", str(self.base), "--out", str(self.export))):
            if res.rc != 0:
                raise SystemExit(f"audit setup failed (exit {res.rc}):\n{res.err[-3000:]}")

    def fresh(self) -> tuple[Path, Path]:
        """A copy of the base run and its export in a new directory."""
        self.counter += 1
        root = self.work / f"case{self.counter:03d}"
        shutil.copytree(self.base.parent, root)
        return root / "run", root / "export"


def newest(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step_*"))[-1]


def flip_bit(path: Path, offset_from_end: int = 16) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def max_abs_weight(ckpt: Path) -> float:
    from safetensors.torch import load_file

    worst = 0.0
    for f in (ckpt / "trainable").glob("*.safetensors"):
        for t in load_file(f).values():
            if t.is_floating_point():
                if not bool(t.isfinite().all()):
                    return float("inf")
                worst = max(worst, float(t.abs().max()))
    return worst


def judge(res: Result, expect: str, wrong: str | None = None, warned: str | None = None, limit: float | None = None,
          ) -> tuple[str, str]:  # fmt: skip
    """``expect``: ``refuse`` (exit 1/2 with an error line), ``recover`` (exit 0 whose stderr names ``warned``, or a
    clean refusal) or ``succeed`` (exit 0)."""
    said = res.error_line or (res.err.strip().splitlines() or [""])[-1]
    if res.timed_out or (limit is not None and res.seconds > limit):
        return "hang", f"still running after {res.seconds:.0f} s"
    if res.traceback:
        last = [line for line in res.err.splitlines() if line.strip()]
        return "traceback", f"exit {res.rc}: {last[-1][:160] if last else ''}"
    if wrong:
        return "silent-wrong", wrong
    clean_refusal = res.rc in (1, 2) and bool(res.error_line)
    if expect == "refuse":
        return ("handled", said) if clean_refusal else ("silent-wrong", f"exit {res.rc}: accepted")
    if expect == "recover":
        if clean_refusal:
            return "handled", said
        if res.rc == 0 and warned is not None and warned in res.err:
            return "handled", f"exit 0, warned about {warned}"
        return "silent-wrong", f"exit {res.rc} without a word about {warned}"
    return ("handled", "exit 0") if res.rc == 0 else ("silent-wrong", f"exit {res.rc}: {said[:160]}")


CASES: list[tuple[int, str, Callable[[Audit], tuple[str, str]]]] = []


def case(item: int, name: str) -> Callable:
    def register(fn: Callable[[Audit], tuple[str, str]]) -> Callable:
        CASES.append((item, name, fn))
        return fn

    return register


# --- 1 code execution on resume ---------------------------------------------------------------------------------------


def _plant_pickle(target: Path, marker: Path) -> None:
    import torch

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"state": Payload()}, target)


for _where in ("objective.pt", "optimizers/student.pt", "rng/rank_0.pt"):

    def _pickle_case(a: Audit, where: str = _where) -> tuple[str, str]:
        run, _ = a.fresh()
        marker = run.parent / "PWNED"
        _plant_pickle(newest(run) / where, marker)
        res = a.train(run, "train.max_steps=6")
        wrong = f"the planted {where} ran code on resume" if marker.exists() else None
        return judge(res, "recover", wrong, warned=Path(where).name)

    case(1, f"pickle payload in {_where}, resume")(_pickle_case)


# --- 2 non-finite / exploding weights ---------------------------------------------------------------------------------


for _override in ("optim.lr=.inf", "optim.lr=1e10", "optim.weight_decay=.nan", "optim.lr=-1"):

    def _weights_case(a: Audit, override: str = _override) -> tuple[str, str]:
        run = a.work / f"weights{a.counter}"
        a.counter += 1
        res = a.train(run, override, "optim.lr_scheduler=constant")
        saved = sorted((run / "checkpoints").glob("step_*")) if (run / "checkpoints").is_dir() else []
        worst = max((max_abs_weight(c) for c in saved), default=0.0)
        wrong = f"a checkpoint holds weights with max |w| = {worst:.3g}" if worst > 1e4 else None
        return judge(res, "refuse", wrong)

    case(2, f"train with {_override}")(_weights_case)


# --- 3 corrupted files ------------------------------------------------------------------------------------------------


@case(3, "one flipped bit in trainable/student.safetensors, resume=auto")
def _flip_resume(a: Audit) -> tuple[str, str]:
    run, _ = a.fresh()
    flip_bit(newest(run) / "trainable" / "student.safetensors")
    return judge(a.train(run, "train.max_steps=6"), "recover", warned="student.safetensors")


@case(3, "one flipped bit in trainable/student.safetensors, export")
def _flip_export(a: Audit) -> tuple[str, str]:
    run, _ = a.fresh()
    flip_bit(newest(run) / "trainable" / "student.safetensors")
    res = a.fewstep("export", str(run), "--out", str(run.parent / "export2"), "--checkpoint", str(newest(run)))
    return judge(res, "refuse")


@case(3, "one flipped bit in ema.safetensors, eval")
def _flip_eval(a: Audit) -> tuple[str, str]:
    run, _ = a.fresh()
    flip_bit(newest(run) / "ema.safetensors")
    res = a.fewstep("eval", str(run), "--checkpoint", str(newest(run)), "--steps", "1", "--no-teacher",
                    "--num-samples", "8", "--metrics", "accuracy", "--out", str(run.parent / "ev"))  # fmt: skip
    return judge(res, "refuse")


@case(3, "one flipped bit in an exported UNet, eval of the export")
def _flip_export_eval(a: Audit) -> tuple[str, str]:
    _, export = a.fresh()
    flip_bit(next((export / "unet").glob("*.safetensors")))
    res = a.fewstep("eval", str(export), "--steps", "1", "--no-teacher", "--num-samples", "8", "--metrics",
                    "accuracy", "--out", str(export.parent / "ev"))  # fmt: skip
    return judge(res, "refuse")


# --- 4 another model's checkpoint -------------------------------------------------------------------------------------


@case(4, "resume a digits-vp checkpoint with the digits-flow teacher (same UNet shapes)")
def _other_teacher(a: Audit) -> tuple[str, str]:
    run, _ = a.fresh()
    res = a.train(run, "train.max_steps=6", recipe=ROOT / "recipes" / "quickstart" / "digits_flow_lcm.yaml")
    wrong = None
    if res.rc == 0 and "Resuming" in res.err + res.out:
        wrong = "resumed a VP teacher's student as a flow student"
    return judge(res, "refuse", wrong)


@case(4, "an EMA file whose tensors have other shapes, resume")
def _ema_shapes(a: Audit) -> tuple[str, str]:
    from safetensors.torch import load_file, save_file

    run, _ = a.fresh()
    path = newest(run) / "ema.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    shadows = {k: (v[:1].clone() if v.ndim == 1 and v.shape[0] > 1 else v) for k, v in load_file(path).items()}
    save_file(shadows, path, metadata=metadata)
    return judge(a.train(run, "train.max_steps=6"), "recover", warned="ema.safetensors")


# --- 5 reused output directory ----------------------------------------------------------------------------------------


@case(5, "train.resume=never on a directory holding another run")
def _resume_never(a: Audit) -> tuple[str, str]:
    run, _ = a.fresh()
    before = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    res = a.train(run, "train.resume=never", "train.max_steps=2", "train.keep_last=1")
    after = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    wrong = None
    if res.rc == 0:
        wrong = f"overwrote the old run without asking (checkpoints {before} -> {after})"
    return judge(res, "refuse", wrong)


# --- 6 changed hyperparameters on resume ------------------------------------------------------------------------------


@case(6, "resume with a different optim.lr")
def _changed_lr(a: Audit) -> tuple[str, str]:
    import torch

    run, _ = a.fresh()
    res = a.train(run, "train.max_steps=6", "optim.lr=0.05")
    if res.rc != 0:
        return judge(res, "refuse")
    state = torch.load(newest(run) / "optimizers" / "student.pt", weights_only=True)
    lrs = [g["lr"] for g in state["optimizer"]["param_groups"]]
    wrong = None if all(abs(lr - 0.05) < 1e-12 for lr in lrs) else f"asked lr 0.05, the optimizer used {lrs}"
    return judge(res, "succeed", wrong)


# --- 7 interrupted pruning --------------------------------------------------------------------------------------------


@case(7, "a newest checkpoint half deleted (COMPLETE kept), resume=auto")
def _half_pruned(a: Audit) -> tuple[str, str]:
    run, _ = a.fresh()
    shutil.rmtree(newest(run) / "trainable")
    return judge(a.train(run, "train.max_steps=6"), "recover", warned="trainable")


@case(7, "leftover temporary directories are swept by the next run")
def _leftovers(a: Audit) -> tuple[str, str]:
    run, _ = a.fresh()
    (run / "checkpoints" / ".tmp_step_00000006" / "rng").mkdir(parents=True)
    res = a.train(run, "train.max_steps=6")
    left = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    return judge(res, "succeed", f"left behind {left}" if left else None)


# --- 8 corrupt checkpoints, bad recipes, OS errors --------------------------------------------------------------------


def _corrupt(where: str, content: bytes | None) -> Callable[[Audit], tuple[str, str]]:
    def run_case(a: Audit) -> tuple[str, str]:
        run, _ = a.fresh()
        path = newest(run) / where
        if content is None:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        elif content == b"<half>":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        else:
            path.write_bytes(content)
        return judge(a.train(run, "train.max_steps=6"), "recover", warned=Path(where).name)

    return run_case


for _where, _content, _what in (
    ("trainable/student.safetensors", b"<half>", "truncated"),
    ("trainable/student.safetensors", b"", "empty"),
    ("state.json", b"", "empty"),
    ("state.json", b"{not json", "garbled"),
    ("state.json", b'{"step": "four"}', "wrong types"),
    ("state.json", b"[]", "a list"),
    ("optimizers/student.pt", b"<half>", "truncated"),
    ("optimizers/student.pt", None, "missing"),
    ("rng", None, "missing"),
    ("rng/rank_0.pt", b"garbage", "garbage"),
    ("objective.pt", b"<half>", "truncated"),
    ("ema.safetensors", None, "missing"),
    ("ema.safetensors", b"<half>", "truncated"),
):
    case(8, f"resume with {_where} {_what}")(_corrupt(_where, _content))


@case(8, "train.resume pointing at a missing path")
def _missing_resume(a: Audit) -> tuple[str, str]:
    return judge(a.train(a.work / "nowhere", f"train.resume={a.work / 'no' / 'such' / 'checkpoint'}"), "refuse")


@case(8, "output_dir pointing at a file")
def _output_file(a: Audit) -> tuple[str, str]:
    target = a.work / "a_file"
    target.write_text("not a directory")
    return judge(a.train(target), "refuse")


@case(8, "disk full while writing a checkpoint (ulimit -f)")
def _disk_full(a: Audit) -> tuple[str, str]:
    run, _ = a.fresh()
    before = newest(run).name
    cmd = f"ulimit -f 2000; exec {sys.executable} -m fewstep train {RECIPE} {' '.join(TINY)} output_dir={run} " \
          "train.max_steps=6"  # fmt: skip
    began = time.perf_counter()
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=a.work)  # fmt: skip
    res = Result(proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - began)
    intact = (run / "checkpoints" / before / "COMPLETE").is_file()
    return judge(res, "refuse", None if intact else "the previous checkpoint was damaged")


@case(8, "a YAML nested 5,000 levels deep")
def _deep_yaml(a: Audit) -> tuple[str, str]:
    path = a.work / "deep.yaml"
    path.write_text("teacher: " + "[" * 5000 + "]" * 5000 + "\n")
    return judge(a.fewstep("validate", str(path), timeout=60), "refuse", limit=10)


_BAD_RECIPES = {
    "data.batch_size=0": "a zero batch",
    "train.max_steps=-5": "negative steps",
    "teacher.pretrained=fewstep:no-such-asset": "an unknown shipped asset",
    "teacher.pretrained=/no/such/dir": "a missing teacher directory",
    "objective.name=no_such_objective": "an unknown objective",
    "data.source=no_such_source": "an unknown data source",
    "student.kind=halfway": "an unknown student kind",
    "train.sample_steps=[0]": "zero sampling steps",
    "objective.num_ddim_timesteps=0": "an empty skipping grid",
    "objective.w_min=3 objective.w_max=1": "an inverted guidance range",
    "train.gradient_accumulation_steps=0": "zero accumulation",
    "train.mixed_precision=fp8": "an unknown precision",
}
for _override, _what in _BAD_RECIPES.items():

    def _bad_recipe(a: Audit, override: str = _override) -> tuple[str, str]:
        return judge(a.fewstep("validate", str(RECIPE), *override.split(), timeout=120), "refuse")

    case(8, f"validate a recipe with {_what} ({_override})")(_bad_recipe)


# --- 9 YAML bombs -----------------------------------------------------------------------------------------------------


@case(9, "a 9-level alias bomb (billion laughs) under an unknown key")
def _alias_bomb(a: Audit) -> tuple[str, str]:
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    bomb = RECIPE.read_text() + "\nsurprise:\n" + "\n".join("  " + line for line in lines) + "\n"
    path = a.work / "bomb.yaml"
    path.write_text(bomb)
    return judge(a.fewstep("validate", str(path), timeout=60), "refuse", limit=10)


# --- 10 an error in the middle of training ----------------------------------------------------------------------------


@case(10, "the user's reward function raises at step 4 (checkpoints every 100 steps)")
def _mid_failure(a: Audit) -> tuple[str, str]:
    run = a.work / f"midfail{a.counter}"
    a.counter += 1
    run.mkdir()
    (run / "flaky_reward.py").write_text(
        "calls = 0\n\n\ndef reward(x0, cond):\n    global calls\n    calls += 1\n    if calls == 4:\n"
        "        raise RuntimeError('the reward service went away')\n    return x0.flatten(1).mean(1)\n"
    )
    reward = ["objective.reward=custom:flaky_reward:reward", "objective.reward_weight=0.1", "--allow-code"]
    recipe = ROOT / "recipes" / "bench" / "digits_pcm.yaml"
    res = a.fewstep("train", str(recipe), *TINY, f"output_dir={run / 'out'}", "train.max_steps=8",
                    "train.checkpoint_every=100", *reward, cwd=run, env={"PYTHONPATH": str(run)})  # fmt: skip
    saved = sorted(p.name for p in (run / "out" / "checkpoints").glob("step_*"))
    if res.rc == 0:
        return "silent-wrong", "the reward's error was swallowed"
    if res.rc is None:
        return "hang", f"still running after {res.seconds:.0f} s"
    if not saved:
        return "silent-wrong", "the failed run kept no checkpoint of its finished steps"
    # the user's own code failed: its traceback is shown on purpose (it is theirs to fix)
    return "handled", f"exit {res.rc}, the finished steps kept in {saved[-1]}, the reward's traceback shown"


# --- 11 two trainers, torchrun ----------------------------------------------------------------------------------------


@case(11, "a second trainer on the directory of a running one")
def _two_trainers(a: Audit) -> tuple[str, str]:
    run, _ = a.fresh()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "fewstep", "train", str(RECIPE), *TINY, f"output_dir={run}",
                              "train.max_steps=400", "train.checkpoint_every=1000"], env=env, cwd=a.work,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 120
        while time.time() < deadline and f'"pid": {first.pid}' not in _read_text(run / ".lock"):  # the lock is held
            time.sleep(0.5)
        time.sleep(2)
        res = a.train(run, "train.max_steps=8")
    finally:
        first.kill()
        first.wait()
    return judge(res, "refuse", "both trainers ran on one directory" if res.rc == 0 else None)


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


@case(11, "torchrun with 2 processes, no accelerate launch")
def _torchrun(a: Audit) -> tuple[str, str]:
    run = a.work / f"torchrun{a.counter}"
    a.counter += 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", "-m",
           "fewstep", "train", str(RECIPE), *TINY, f"output_dir={run}"]  # fmt: skip
    began = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=a.work,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    except subprocess.TimeoutExpired:
        return "hang", "still running after 240 s"
    res = Result(proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - began)
    if res.rc == 0:
        return "silent-wrong", "two independent single-process runs wrote one directory"
    children = [line for line in res.err.splitlines() if "error:" in line]  # torchrun prefixes the rank
    if res.rc != 0 and len(children) >= 2:  # torchrun's own launcher then reports the failed children
        return "handled", children[0].strip()
    return judge(res, "refuse")


# --- 12 exports -------------------------------------------------------------------------------------------------------


@case(12, "export into a directory holding a stale file")
def _stale_export(a: Audit) -> tuple[str, str]:
    run, export = a.fresh()
    (export / "unet" / "stale_weights.safetensors").write_bytes(b"old")
    res = a.fewstep("export", str(run), "--out", str(export))
    left = (export / "unet" / "stale_weights.safetensors").exists()
    return judge(res, "succeed", "a stale file survived the export" if left else None)


def _student_json(edit: Callable[[dict], object]) -> Callable[[Audit], tuple[str, str]]:
    def run_case(a: Audit) -> tuple[str, str]:
        _, export = a.fresh()
        path = export / "fewstep_student.json"
        data = json.loads(path.read_text())
        new = edit(data)
        path.write_text(new if isinstance(new, str) else json.dumps(data))
        res = a.fewstep("eval", str(export), "--steps", "1", "--no-teacher", "--num-samples", "8", "--metrics",
                        "accuracy", "--out", str(export.parent / "ev"))  # fmt: skip
        return judge(res, "refuse")

    return run_case


case(12, "fewstep_student.json garbled")(_student_json(lambda d: "{garbled"))
case(12, "fewstep_student.json without its scheduler")(_student_json(lambda d: d.pop("scheduler", None)))
case(12, "fewstep_student.json naming a non-scheduler class")(
    _student_json(lambda d: d.update(scheduler={**d.get("scheduler", {}), "class_name": "DiffusionPipeline"}))
)


# --- 13 code and weights from outside ---------------------------------------------------------------------------------


def _evil_module(where: Path, marker: Path) -> None:
    (where / "evil_reward.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n\n"
        "def reward(x0, cond):\n    return x0.mean((1, 2, 3))\n"
    )


for _weight in ("0", "0.1"):

    def _reward_case(a: Audit, weight: str = _weight) -> tuple[str, str]:
        run = a.work / f"reward{a.counter}"
        a.counter += 1
        run.mkdir()
        marker = run / "IMPORTED"
        _evil_module(run, marker)
        reward = ["objective.reward=custom:evil_reward:reward", f"objective.reward_weight={weight}"]
        recipe = ROOT / "recipes" / "bench" / "digits_pcm.yaml"
        res = a.fewstep("train", str(recipe), *TINY, f"output_dir={run / 'out'}", *reward, cwd=run)
        wrong = "a module in the current directory was imported without --allow-code" if marker.exists() else None
        return judge(res, "refuse" if weight != "0" else "succeed", wrong)

    case(13, f"objective.reward=custom:<module in cwd> at weight {_weight}, no opt-in")(_reward_case)


# --- the report -------------------------------------------------------------------------------------------------------


def table(verdicts: list[Verdict]) -> str:
    lines = [
        "| class | failure | tried | handled | traceback | silent-wrong | hang |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for item, title in CLASSES.items():
        mine = [v for v in verdicts if v.item == item]
        if mine:
            counts = [sum(v.outcome == o for v in mine) for o in OUTCOMES]
            lines.append(f"| {item} | {title} | {len(mine)} | " + " | ".join(map(str, counts)) + " |")
    totals = [sum(v.outcome == o for v in verdicts) for o in OUTCOMES]
    lines.append(f"| | **all** | **{len(verdicts)}** | " + " | ".join(f"**{c}**" for c in totals) + " |")
    return "\n".join(lines)


def details(verdicts: list[Verdict]) -> str:
    lines = ["| class | case | outcome | what fewstep said or did |", "| ---: | --- | --- | --- |"]
    for v in verdicts:
        said = re.sub(r"\s+", " ", v.detail).replace("|", "\\|")[:200]
        lines.append(f"| {v.item} | {v.case} | {v.outcome} | {said} |")
    return "\n".join(lines)


def write_section(md: Path, verdicts: list[Verdict], command: str, commit: str) -> None:
    start, end = "<!-- audit:start -->", "<!-- audit:end -->"
    when = time.strftime("%Y-%m-%d")
    body = (
        f"{start}\n## Audit\n\nWritten by `scripts/audit/reliability.py` (`{command}`, fewstep at `{commit}`, {when})."
        f"\n\n{table(verdicts)}\n\n### Every case\n\n{details(verdicts)}\n{end}\n"
    )
    text = md.read_text() if md.is_file() else "# Reliability\n\n"
    if start in text:
        text = text[: text.index(start)] + body + text[text.index(end) + len(end) + 1 :]
    else:
        text = text.rstrip() + "\n\n" + body
    md.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", type=lambda s: {int(i) for i in s.split(",")}, default=None, help="classes to run")
    parser.add_argument("--no-write", action="store_true", help="print the tables only")
    parser.add_argument("--md", type=Path, default=ROOT / "docs" / "reliability.md")
    parser.add_argument("--json", type=Path, default=None, help="also write the verdicts as JSON here")
    args = parser.parse_args(argv)
    verdicts = []
    with tempfile.TemporaryDirectory(prefix="fewstep-audit-") as work:
        audit = Audit(Path(work))
        audit.setup()
        for item, name, fn in CASES:
            if args.only is not None and item not in args.only:
                continue
            try:
                outcome, detail = fn(audit)
            except Exception as err:  # the audit itself failed on this case: say so, never hide it
                outcome, detail = "traceback", f"audit error: {type(err).__name__}: {err}"
            verdicts.append(Verdict(item, name, outcome, detail))
            print(f"[{item:2d}] {outcome:12s} {name}: {detail[:150]}", flush=True)
    print("\n" + table(verdicts))
    if args.json is not None:
        args.json.write_text(json.dumps([v.__dict__ for v in verdicts], indent=2))
    if not args.no_write:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        command = "python scripts/audit/reliability.py" + (
            f" {' '.join(argv or sys.argv[1:])}" if (argv or sys.argv[1:]) else ""
        )
        write_section(args.md, verdicts, command, commit.stdout.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
