"""Benchmark: distill.py's step against TRL's on-policy distillation trainer, same model and settings.

Issue 36. Four methods, each in a fresh subprocess (peak RSS = resource.getrusage of that process: model,
teacher, optimiser and libraries included, so the peaks of two methods never mix), interleaved over --repeats
runs so that the box's drift hits every method alike:

    trl        trl.DistillationTrainer, TRL's on-policy distillation: the student samples with `generate`,
               the loss is the generalized JSD at beta = 1 (the reverse KL of `full`), chunked over V
    port       ports/trl_port.py: TRL's DistillationTrainer with the method's loss (`collapsed` on S), its
               teacher (the hook on only while πt scores) and its mean over sequences; TRL's sampling
    full       distill.train_step with the full-vocabulary reverse KL (global distillation: TRL's loss)
    collapsed  distill.train_step with the localized loss (the method's default)

Settings: the demo's Stage 3 without anchors (TRL has nothing like them): 4 prompts per step x 4 samples,
48 new tokens, micro-batches of 8 (TRL: per_device_train_batch_size 8 x gradient_accumulation_steps 2),
gradient checkpointing on, AdamW at the same constant lr, gradient-norm clip 1.0, float32 on the CPU. The
teacher is πt = π0 + c·r at block l (Teacher): TRL gets the frozen copy of π0 with the hook in
place, and as it calls that model's backbone the hook runs there too. r is Stage 1's
(RUN/direction.safetensors) if it has run, else a random vector of the right size with a fixed seed: the
timing does not depend on it.

Same samples: each method samples its own completions from the same prompts in the same order, and none
stops early (ours: no stop token; TRL: min_new_tokens = max_new_tokens), so every step scores exactly
16 x 48 completion tokens in both. The tokens differ (two samplers, two random streams): what is compared
is the work. tests/test_vs_trl.py shows that on the same tokens both compute the same loss.

Per method, medians over the measured steps of all runs (each process first runs one warm-up step, not
counted): seconds per step, split into sampling and training, as wall time and as the process's CPU time
(steadier while other runs share the cores, since a one-thread process's CPU seconds do not count its waits,
though a heavily loaded box inflates them too); completion tokens per second; peak RSS, and its rise above
the RSS after setup (models, optimiser and libraries loaded). Then the CPU seconds of each phase (sampling,
teacher, student forward, loss, backward, optimiser), timed from outside both trainers (Phases), and how
many sampled tokens the two samplers happened to share.

Usage:
    python -m bench.vs_trl                          # 2 interleaved runs x 1 measured step: 10-20 min here
    python -m bench.vs_trl --repeats 3 --steps 2    # steadier, twice as long
    python -m bench.vs_trl --check          # exit 1 unless full >= 1.5x TRL's steps/s (CPU) at <= its RSS
    python -m bench.vs_trl --profile trl    # one process, torch profiler: the top operators of 2 steps
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# No hub traffic: the bundled model is on disk, and TRL's trainer would otherwise send a telemetry ping.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
from safesteer.cli import Parser, add_repeats, positive_float, positive_int
from safesteer.files import data_file, read_prompts
from safesteer.models import BUNDLED_MODEL, load_model
from safesteer.teacher import Teacher, load_teacher

METHODS = {"trl": "TRL DistillationTrainer, beta = 1", "port": "ports/trl_port.py (TRL, collapsed)",
           "full": "distill.py --loss full", "collapsed": "distill.py --loss collapsed"}
GOAL_SPEED = 1.5  # issue 36: full at least 1.5x TRL's steps per second, at no more peak memory


# ----------------------------------------------------------------------------- clocks and memory

class Clock:
    """Wall and CPU seconds, summed over the spans run inside `with clock:`."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def __enter__(self):
        self._start = time.perf_counter(), time.process_time()

    def __exit__(self, *exc):
        self.wall += time.perf_counter() - self._start[0]
        self.cpu += time.process_time() - self._start[1]


class Phases:
    """Wall and CPU seconds per phase of a step, timed from outside either trainer (the models' forwards, the
    loss function, autograd's backward, the optimiser's step). A call counts toward the phase it opens,
    everything it calls included: the student's forwards while it samples count as sampling, the forwards
    that gradient checkpointing recomputes count as backward."""

    def __init__(self):
        self.clocks, self.active = {}, None

    def wrap(self, fn, name: str):
        def wrapper(*args, **kwargs):
            if self.active is not None:  # inside another phase
                return fn(*args, **kwargs)
            self.active = name
            try:
                with self.clocks.setdefault(name, Clock()):
                    return fn(*args, **kwargs)
            finally:
                self.active = None
        return wrapper

    def models(self, student, teacher_model) -> None:
        """Time each model's backbone and LM head as its phase: πt's "teacher", the student's its forward."""
        for model, name in ((student, "student_forward"), (teacher_model, "teacher")):
            for module in (model.base_model, model.get_output_embeddings()):
                module.forward = self.wrap(module.forward, name)

    def take(self) -> dict:
        """{phase: [wall, cpu]} since the last take."""
        out, self.clocks = {k: [c.wall, c.cpu] for k, c in self.clocks.items()}, {}
        return out


def keep_samples(fn, samples: list, tokens):
    """fn, with each call's completion token ids appended to `samples` (tokens: output -> list of rows)."""
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        samples.append(tokens(out))
        return out
    return wrapper


def rss_mb() -> float:
    """The process's resident memory now (VmRSS), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- what both methods share

def setup(cfg: dict):
    """(student, tok, πt, the prompts of each step, S): π0 twice (the student and a frozen copy), πt the hook
    on the frozen copy. One step more than measured: the warm-up."""
    import copy
    import torch
    from safesteer.artifacts import load_safety_tokens
    torch.manual_seed(cfg["seed"])
    student, tok = load_model(cfg["model"], "cpu", dtype=torch.float32)
    frozen = copy.deepcopy(student).requires_grad_(False).eval()
    run = ROOT / cfg["run"]
    if (run / "direction.safetensors").is_file():
        teacher, _ = load_teacher(frozen, run / "direction.safetensors")
    else:
        vec = torch.randn(student.config.hidden_size, generator=torch.Generator().manual_seed(cfg["seed"]))
        vec = vec / vec.norm() * cfg["random_norm"]
        teacher = Teacher(frozen, "hook", vec, cfg["layer"], cfg["coefficient"])
    if (run / "safety_tokens.json").is_file():
        s_ids = load_safety_tokens(run / "safety_tokens.json", tok, student)[0]
    else:  # `collapsed` costs the same for any 50 ids
        s_ids = torch.arange(1000, 1050)
    prompts = read_prompts(data_file("harmful_train"))
    n = cfg["prompts"]
    steps = [prompts[i * n:(i + 1) * n] for i in range(cfg["steps"] + 1)]
    return student, tok, teacher, steps, s_ids


# ----------------------------------------------------------------------------- ours: distill.train_step

def run_ours(cfg: dict, loss: str) -> dict:
    import torch
    import distill
    student, tok, teacher, steps, s_ids = setup(cfg)
    teachers = (teacher, Teacher(teacher.model, "base"))  # (πt, π0); π0 unused without anchors
    student.activation_checkpointing_enable()
    recipe = distill.Recipe(loss=loss, samples=cfg["samples"], max_new_tokens=cfg["max_new_tokens"],
                            prompts_per_step=cfg["prompts"], lr=cfg["lr"], weight_decay=0.0, clip=1.0,
                            micro_batch=cfg["micro_batch"])
    opt = torch.optim.AdamW(student.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)  # constant, as TRL's below
    loop = distill.Loop(opt=opt, sched=sched, gen=torch.Generator().manual_seed(cfg["seed"]))
    distill.stop_token_ids = lambda tok: [-1]  # never stop: every row generates exactly max_new_tokens
    phases = Phases()
    phases.models(student, teacher.model)
    sampled = []  # each step's completions, to compare with TRL's
    sample = keep_samples(distill.sample, sampled, lambda out: out[0].tolist())
    distill.sample = phases.wrap(sample, "sample")  # steering's sampler, as distill calls it
    distill.localized_reverse_kl = phases.wrap(distill.localized_reverse_kl, "loss")
    if hasattr(distill, "log_losses"):  # the two other losses, computed on each micro-batch for the log
        distill.log_losses = phases.wrap(distill.log_losses, "diagnostics")
    torch.autograd.backward = phases.wrap(torch.autograd.backward, "backward")
    opt.step = phases.wrap(opt.step, "optimizer")
    setup_rss, recs = rss_mb(), []
    for prompts in steps:
        step = Clock()
        with step:
            rec = distill.train_step(student, tok, prompts, [], teachers, s_ids, recipe, loop)
        tokens = rec["mean_completion_tokens"] * len(prompts) * cfg["samples"]
        recs.append({"step": step.wall, "step_cpu": step.cpu, "phases": phases.take(), "loss": rec["loss"],
                     "tokens": tokens, "sampled": sampled.pop()})
    return {"steps": recs[1:], "setup_rss_mb": setup_rss}  # the first step warms up allocators and caches


# ----------------------------------------------------------------------------- TRL's DistillationTrainer

def trl_trainer(student, tok, teacher_model, prompts: list[str], cfg: dict, out_dir: str):
    """TRL's DistillationTrainer set up to train as distill.py does. TRL samples one completion per dataset
    row, so each prompt is `samples` rows, read in order (no shuffle): prompts x samples rows per optimiser
    step, sampled in one `generate` call, trained in micro-batches of `micro_batch` (gradient
    accumulation)."""
    from datasets import Dataset
    from trl import DistillationTrainer
    rows = [[{"role": "user", "content": p}] for p in prompts for _ in range(cfg["samples"])]
    return DistillationTrainer(model=student, teacher_model=teacher_model, processing_class=tok,
                               args=trl_args(cfg, len(rows), out_dir),
                               train_dataset=Dataset.from_dict({"prompt": rows}))


def port_trainer(student, tok, teacher: Teacher, s_ids, prompts: list[str], cfg: dict, out_dir: str):
    """ports/trl_port.py's trainer with trl_trainer's settings and rows; its teacher is the Teacher itself
    (the port puts the hook on while πt scores), its loss `collapsed` on S."""
    from ports.trl_port import SafeSteerTrainer, dataset
    n = cfg["prompts"]
    steps = [(prompts[i:i + n], []) for i in range(0, len(prompts), n)]
    return SafeSteerTrainer(student, teacher, s_ids, loss="collapsed", processing_class=tok,
                            args=trl_args(cfg, len(prompts) * cfg["samples"], out_dir),
                            train_dataset=dataset(steps, cfg["samples"]))


def trl_args(cfg: dict, n_rows: int, out_dir: str):
    """The DistillationConfig of both TRL trainers: distill.py's settings in TRL's names."""
    from trl import DistillationConfig
    per_step = cfg["prompts"] * cfg["samples"]
    return DistillationConfig(
        output_dir=out_dir, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        use_cpu=True, bf16=False, fp16=False,  # float32 on the CPU, as distill.py (TRL defaults to bf16)
        per_device_train_batch_size=cfg["micro_batch"],
        gradient_accumulation_steps=per_step // cfg["micro_batch"],
        max_steps=n_rows // per_step, shuffle_dataset=False, seed=cfg["seed"], dataloader_num_workers=0,
        learning_rate=cfg["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        optim="adamw_torch", max_grad_norm=1.0, activation_checkpointing=True,
        beta=1.0, temperature=1.0, top_p=1.0, top_k=0, max_completion_length=cfg["max_new_tokens"],
        generation_kwargs={"min_new_tokens": cfg["max_new_tokens"]},  # no early stop, as ours here
        chat_template_kwargs={"enable_thinking": False})  # as chat.render_chat renders every prompt


def run_trl(cfg: dict, port: bool = False) -> dict:
    """TRL's trainer, or (port) ports/trl_port.py's, timed as run_ours times distill.py."""
    import contextlib
    import torch
    from transformers import TrainerCallback
    import trl.trainer.distillation_trainer as trl_distillation
    from ports import plain_loop
    from safesteer.chat import encode_chats
    student, tok, teacher, steps, s_ids = setup(cfg)
    phases, recs, sampled = Phases(), [], []

    class StepClock(TrainerCallback):
        """From the start of an optimiser step (its sampling included) to the end of its AdamW update."""

        def on_train_begin(self, args, state, control, optimizer=None, **kw):
            optimizer.step = phases.wrap(optimizer.step, "optimizer")

        def on_step_begin(self, args, state, control, **kw):
            self.step = Clock()
            self.step.__enter__()

        def on_step_end(self, args, state, control, **kw):
            self.step.__exit__()
            recs.append({"step": self.step.wall, "step_cpu": self.step.cpu, "phases": phases.take(),
                         "sampled": sampled.pop()})

        def on_log(self, args, state, control, logs=None, **kw):  # logged right after on_step_end
            if logs and "loss" in logs and recs:
                recs[-1]["loss"] = logs["loss"]

    with tempfile.TemporaryDirectory() as out:
        prompts = [p for s in steps for p in s]
        if port:
            trainer = port_trainer(student, tok, teacher, s_ids, prompts, cfg, out)
        else:
            trainer = trl_trainer(student, tok, teacher.model, prompts, cfg, out)
        ours = encode_chats(tok, steps[0][:1])[0][0].tolist()
        theirs = list(trainer._tokenize_prompts([[{"role": "user", "content": steps[0][0]}]])[0][0])
        if theirs != ours:
            raise SystemExit("TRL renders the prompts unlike chat.encode_chats: not the same inputs")
        # TRL's forwards stop at the backbones: both LM-head projections run inside its loss (and again in
        # the loss's backward), so its "teacher" and "student_forward" hold less than ours.
        phases.models(student, teacher.model)
        generate = keep_samples(trainer._generate_single_turn, sampled, list)  # a list of rows already
        trainer._generate_single_turn = phases.wrap(generate, "sample")
        if port:  # the port's loss: the per-sequence losses of plain_loop (safesteer.losses inside)
            plain_loop.sequence_losses = phases.wrap(plain_loop.sequence_losses, "loss")
        else:
            trl_loss = trl_distillation._chunked_divergence_loss
            trl_distillation._chunked_divergence_loss = phases.wrap(trl_loss, "loss")
        torch.autograd.backward = phases.wrap(torch.autograd.backward, "backward")
        trainer.add_callback(StepClock())
        setup_rss = rss_mb()
        # TRL's own trainer: the hook stays on the frozen copy while it trains, so its teacher is πt; the port
        # puts the hook on itself, only while πt scores
        with contextlib.nullcontext() if port else teacher.steer():
            trainer.train()
    if len(recs) != len(steps):
        raise SystemExit(f"TRL ran {len(recs)} steps, expected {len(steps)}")
    tokens = cfg["prompts"] * cfg["samples"] * cfg["max_new_tokens"]  # min_new_tokens: every row this long
    return {"steps": [{**r, "tokens": tokens} for r in recs[1:]], "setup_rss_mb": setup_rss}


# ----------------------------------------------------------------------------- the processes

def child(cfg: dict) -> None:
    import torch
    torch.set_num_threads(cfg["threads"])
    print(json.dumps({**run_method(cfg), "peak_rss_mb": peak_rss_mb()}))


def run_method(cfg: dict) -> dict:
    if cfg["method"] in ("trl", "port"):
        return run_trl(cfg, port=cfg["method"] == "port")
    return run_ours(cfg, cfg["method"])


def profile(cfg: dict) -> None:
    """The torch profiler over the warm-up step and one step, in this process: top operators by self CPU."""
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile
    torch.set_num_threads(cfg["threads"])
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        out = run_method(cfg)
    for s in out["steps"]:
        split = ", ".join(f"{k} {wall:.1f} ({cpu:.1f})" for k, (wall, cpu) in s["phases"].items())
        print(f"measured step: {s['step']:.1f} s ({s['step_cpu']:.1f} s CPU); by phase: {split}")
    top = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60)
    print(top)


def run(cfg: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg["threads"])}
    out = subprocess.run([sys.executable, "-m", __spec__.name, "child", "--cfg", json.dumps(cfg)],
                         capture_output=True,
                         text=True, env=env)
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the table

PHASES = ["sample", "teacher", "student_forward", "loss", "backward", "diagnostics", "optimizer"]


def summary(results: list[dict]) -> dict:
    """Medians over every measured step of every run (phases in CPU seconds); the largest peak of any run."""
    steps = [s for r in results for s in r["steps"]]

    def median(key):
        return statistics.median(key(s) for s in steps)

    def sample(s, clock):  # clock 0: wall, 1: CPU
        return s["phases"]["sample"][clock]
    row = {"step": median(lambda s: s["step"]), "sample": median(lambda s: sample(s, 0)),
           "train": median(lambda s: s["step"] - sample(s, 0)), "step_cpu": median(lambda s: s["step_cpu"]),
           "sample_cpu": median(lambda s: sample(s, 1)),
           "train_cpu": median(lambda s: s["step_cpu"] - sample(s, 1)),
           "tokens_per_s": median(lambda s: s["tokens"] / s["step"]),
           "peak": max(r["peak_rss_mb"] for r in results),
           "rise": max(r["peak_rss_mb"] - r["setup_rss_mb"] for r in results)}
    row["phases"] = {k: median(lambda s: s["phases"].get(k, [0, 0])[1]) for k in PHASES}  # CPU seconds
    row["phases"]["rest"] = row["step_cpu"] - sum(row["phases"].values())
    return row


def table(rows: dict) -> str:
    lines = ["| method | s/step | sampling | training | CPU s/step | CPU sampling | CPU training "
             "| tokens/s | peak RSS MB | over setup MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m, s in rows.items():
        lines.append(f"| {METHODS[m]} | {s['step']:.1f} | {s['sample']:.1f} | {s['train']:.1f} "
                     f"| {s['step_cpu']:.1f} | {s['sample_cpu']:.1f} | {s['train_cpu']:.1f} "
                     f"| {s['tokens_per_s']:.1f} | {s['peak']:.0f} | {s['rise']:.0f} |")
    return "\n".join(lines)


def phase_table(rows: dict) -> str:
    """CPU seconds per step by phase. TRL's teacher and student_forward end at the last hidden state: its loss
    holds both LM-head projections (and its backward projects them again)."""
    lines = ["| method (CPU s per step) | " + " | ".join(PHASES + ["rest"]) + " |",
             "|---" * (len(PHASES) + 2) + "|"]
    for m, s in rows.items():
        lines.append(f"| {METHODS[m]} | " + " | ".join(f"{v:.1f}" for v in s["phases"].values()) + " |")
    return "\n".join(lines)


def ratios(s: dict, t: dict) -> str:
    """TRL's time over ours, a speed-up (> 1: ours is faster), by wall and CPU time; and the memory."""
    def x(k):
        return t[k] / s[k]
    return (f"{x('step'):.2f}x TRL's steps/s (sampling {x('sample'):.2f}x, training {x('train'):.2f}x); "
            f"by CPU time {x('step_cpu'):.2f}x (sampling {x('sample_cpu'):.2f}x, training "
            f"{x('train_cpu'):.2f}x); peak RSS {s['peak']:.0f} vs {t['peak']:.0f} MB "
            f"({s['peak'] - t['peak']:+.0f}), over setup {s['rise']:.0f} vs {t['rise']:.0f} MB")


def same_tokens(ours: list[dict], trl: list[dict]) -> str:
    """How many of the sampled completion tokens are the same as TRL's, step for step: both samplers draw
    with torch.multinomial from a generator seeded alike, so they can coincide."""
    same = total = 0
    for a, b in zip(ours, trl):
        if "error" in a or "error" in b:
            continue
        for sa, sb in zip(a["steps"], b["steps"]):
            for ra, rb in zip(sa["sampled"], sb["sampled"]):
                same += sum(x == y for x, y in zip(ra, rb))
                total += max(len(ra), len(rb))
    return f"{same} of {total} sampled tokens the same as TRL's" if total else "no samples to compare"


def parse_args(argv=None):
    p = Parser(__doc__)
    p.add_argument("what", nargs="?", default="compare", choices=["compare", "child"], help=argparse.SUPPRESS)
    p.add_argument("--cfg", help=argparse.SUPPRESS)  # child: its configuration, as JSON
    add_repeats(p, 2, "runs of each method, interleaved")
    p.add_argument("--steps", type=positive_int, default=1,
                   help="measured steps per run, after a warm-up step")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="which to run")
    p.add_argument("--prompts", type=positive_int, default=4, help="prompts per step (the demo's)")
    p.add_argument("--samples", type=positive_int, default=4, help="completions per prompt (demo's)")
    p.add_argument("--max-new-tokens", type=positive_int, default=48, help="new tokens (demo's)")
    p.add_argument("--micro-batch", type=positive_int, default=8, help="rows per backward (demo's)")
    p.add_argument("--lr", type=positive_float, default=8e-5, help="AdamW lr, constant (demo's peak)")
    p.add_argument("--run", default="runs/demo", help="run directory whose Stage 1 direction (and Stage 2 S) "
                   "to use, where it has them")
    p.add_argument("--layer", type=int, default=16, help="without a run: block of the random direction")
    p.add_argument("--coefficient", type=float, default=0.5, help="without a run: c of the random direction")
    p.add_argument("--random-norm", type=positive_float, default=8.0, help="without a run: |r|")
    p.add_argument("--model", default=BUNDLED_MODEL, help="the student and π0 (the bundled model)")
    p.add_argument("--seed", type=int, default=0, help="seeds the samplers, TRL and the random direction")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch threads per process (one: the box's other runs share its 2 cores)")
    p.add_argument("--profile", choices=list(METHODS), help="profile this method's warm-up and measured step")
    p.add_argument("--json", metavar="FILE", help="also write every run's raw measurements here")
    p.add_argument("--check", action="store_true",
                   help=f"exit 1 unless full is >= {GOAL_SPEED}x TRL's steps/s at no more peak RSS (steps/s "
                   "by CPU time: on a shared box the steadier measure)")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    if a.what == "child":
        return child(json.loads(a.cfg))
    if (a.prompts * a.samples) % a.micro_batch:
        raise SystemExit("error: prompts x samples must be a multiple of --micro-batch (TRL accumulates)")
    keys = ("steps", "prompts", "samples", "max_new_tokens", "micro_batch", "lr", "run", "layer",
            "coefficient", "random_norm", "model", "seed", "threads")
    cfg = {k: getattr(a, k) for k in keys}
    if a.profile:
        return profile({**cfg, "steps": 1, "method": a.profile})
    print(f"{a.prompts} prompts x {a.samples} samples x {a.max_new_tokens} new tokens "
          f"({a.prompts * a.samples * a.max_new_tokens} completion tokens) per step, micro-batch "
          f"{a.micro_batch}, gradient checkpointing, AdamW lr {a.lr}, {a.threads} thread(s) per process; "
          f"{a.repeats} interleaved runs x {a.steps} measured step(s) per method\n", flush=True)
    results = {m: [] for m in a.methods}
    t0 = time.time()
    for r in range(a.repeats):  # interleaved, so that the box's drift hits every method alike
        for m in a.methods:
            res = run({**cfg, "method": m})
            results[m].append(res)
            if "error" in res:
                print(f"  run {r + 1}/{a.repeats} {m}: failed: {res['error']}", flush=True)
                continue
            step = statistics.median(s["step"] for s in res["steps"])
            cpu = statistics.median(s["step_cpu"] for s in res["steps"])
            print(f"  run {r + 1}/{a.repeats} {m:<9} {step:.1f} s/step ({cpu:.1f} s CPU), peak RSS "
                  f"{res['peak_rss_mb']:.0f} MB", flush=True)
    print(f"\n{time.time() - t0:.0f} s in all\n")
    if a.json:
        Path(a.json).write_text(json.dumps({"settings": cfg, "runs": results}, indent=1))
    rows = {}
    for m, rs in results.items():
        ok = [x for x in rs if "error" not in x]
        if ok:
            rows[m] = summary(ok)
    print(table(rows))
    for m in ("port", "full", "collapsed"):
        if m in rows and "trl" in rows:
            same = same_tokens(results[m], results["trl"])
            print(f"\n{METHODS[m]}: {ratios(rows[m], rows['trl'])}; {same}")
    print("\n" + phase_table(rows))
    if a.check:
        if "full" not in rows or "trl" not in rows:
            raise SystemExit("--check needs both full and trl to have run")
        s, t = rows["full"], rows["trl"]
        speed = t["step_cpu"] / s["step_cpu"]
        if speed < GOAL_SPEED or s["peak"] > t["peak"]:
            raise SystemExit(f"full misses the goal: {speed:.2f}x TRL's steps/s by CPU time (goal "
                             f"{GOAL_SPEED}x), peak RSS {s['peak']:.0f} vs {t['peak']:.0f} MB")


if __name__ == "__main__":
    main()
