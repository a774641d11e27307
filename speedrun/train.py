"""`speedrun train`: the training loop. `run` reads top to bottom: the run directory, the trainer
(`resume`d from a checkpoint if asked), the log, the warm-up, `fit` (the step loop), the summary.
Timing counts optimizer steps only (`Stopwatch`): compile warm-up runs on untimed steps whose
effects are then undone, and validations and checkpoints are paused out of the clock."""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from speedrun import analysis, checkpoint, rundir
from speedrun.attention import attention_backend
from speedrun.config import (COMPILE_HELP, SECTIONS, Config, add_config_arguments, config_from_args, default_preset,
                             scale_steps, to_dict, to_toml, validate)
from speedrun.data import shards
from speedrun.data.corpus import builtin_corpus_dir
from speedrun.data.loader import TrainLoader, find_shards, val_batches, val_fingerprint
from speedrun.distributed import (GradientAverager, Runtime, all_reduce_sum, backend_name, barrier, broadcast_parameters,
                                  setup, teardown)
from speedrun.errors import DataError, SpeedrunError, UsageError, first_line
from speedrun.evaluate import loss_sums
from speedrun.model import GPT
from speedrun.prepare import COMPILED_REGIONS, compile_scope, fp8_supported, graphs_compiled, prepare
from speedrun.optim import apply_schedule, build_optimizers, schedule_at
from speedrun.optim.tied import add_embedding_grad, copy_head_to_embedding, untie
from speedrun.stages import (StepPlan, grad_accum, graph_key, head_tied_at, shape_steps, step_plan, tokens_before,
                             untie_step, window_at, yarn_windows)
from speedrun.runlog import RunLog, device_description, mfu, peak_flops, peak_memory_mib


class TrainingDiverged(SpeedrunError):
    pass


# Command-line flags that are shorthands for one config key each.
FLAG_KEYS = {"data": "data.dir", "device": "train.device", "compile": "train.compile", "seed": "train.seed",
             "save_every": "train.save_every", "keep": "train.keep"}


def resolve_config(args: argparse.Namespace) -> Config:
    if args.preset is None and args.config is None:
        preset = default_preset()
        print(f"speedrun train: no --preset given; using '{preset}' "
              f"({'a CUDA device is present' if preset != 'tiny' else 'no CUDA device'})")
    cfg = config_from_args(args, FLAG_KEYS)
    if args.steps is not None:
        scale_steps(cfg, args.steps)
    if args.val_every is not None:  # after scaling: an explicit interval is taken as given
        if args.val_every < 0:
            raise UsageError(f"--val-every must be 0 (only at the end) or positive, got {args.val_every}")
        cfg.train.val_every = args.val_every
    return cfg


def _run_dir(out: str | None, resume: str | None, overwrite: bool, rt: Runtime) -> Path:
    """Rank 0 chooses and checks the run directory (rundir.prepare); every rank gets its answer,
    so that all of them raise the same error or write to the same place."""
    answer: list = [None, None]
    if rt.is_main:
        try:
            answer[0] = str(rundir.prepare(out, resume, overwrite))
        except UsageError as e:
            answer[1] = str(e)
    if rt.distributed:
        dist.broadcast_object_list(answer, src=0)
    if answer[1] is not None:
        raise UsageError(answer[1])
    return Path(answer[0])


def _data_files(cfg: Config):
    data_dir = Path(cfg.data.dir) if cfg.data.dir else builtin_corpus_dir()
    return data_dir, *find_shards(data_dir, cfg.data.train_pattern, cfg.data.val_pattern)


def tokens_needed(cfg: Config) -> tuple[int, int]:
    """(train, val) tokens a run reads: every step's batch once, and whole val sequences plus the
    one token the last target needs (as val_batches reads them)."""
    d = cfg.data
    return tokens_before(cfg.train.steps, cfg), d.val_tokens // d.val_seq_len * d.val_seq_len + 1


def check_run_data(cfg: Config) -> None:
    """What the shards must hold for this run, checked before any model is built: enough train
    tokens for every step (unless data.allow_repeat), enough val tokens, and no token id beyond
    the model's vocabulary."""
    data_dir, train_files, val_files = _data_files(cfg)
    d, steps = cfg.data, cfg.train.steps
    needed, val_needed = tokens_needed(cfg)
    held = sum(shards.read_header(f) for f in train_files)
    if held < needed and not d.allow_repeat:
        raise DataError(f"{data_dir}: the train shards hold {held:,} tokens but {steps} steps "
                        f"need {needed:,}, {needed / max(held, 1):.1f} passes over the data; allow repeating them "
                        "with --set data.allow_repeat=true")
    val_held = sum(shards.read_header(f) for f in val_files)
    if val_held < val_needed:
        raise DataError(f"{data_dir}: the val shards hold {val_held:,} tokens, fewer than the {val_needed:,} that "
                        f"data.val_tokens {d.val_tokens:,} in sequences of data.val_seq_len {d.val_seq_len:,} needs")
    for f in [*train_files, *val_files]:
        shards.read_shard(f, vocab_size=cfg.model.vocab_size)


AUTO_COMPILE_ON_CPU = (f"compile: auto compiles only {COMPILED_REGIONS} on CPU, where a whole-model compile costs more "
                       "time than it saves in a short run (docs/benchmarks.md); --compile compiles the whole model")
COMPILE_PATHS = {"model": "torch.compile (dynamic=False)",
                 "regions": f"torch.compile of {COMPILED_REGIONS}",
                 None: "eager"}


def execution_path(trainer: "Trainer") -> dict:
    """What actually runs, so that two runs can be told apart from their logs: attention backend and
    window rule, head, dtype, compile, and the software and hardware underneath."""
    cfg, device = trainer.cfg, trainer.device
    rule = "stage windows" if cfg.stages.windows else f"{cfg.model.window_schedule} schedule"
    window = f"{cfg.model.window_granularity} windows ({rule})" if cfg.model.sliding_window else "no window"
    path = {"attention": f"{attention_backend(cfg.model, cfg.data.seq_len, device)}, {window}",
            "head": "fp8" if trainer.model.lm_head.fp8_scales else str(trainer.model.activation_dtype).removeprefix("torch."),
            "activations": str(trainer.model.activation_dtype).removeprefix("torch."),
            "compile": COMPILE_PATHS[compile_scope(cfg, device)],
            "torch": torch.__version__, "cuda": torch.version.cuda or "none",
            "device": device_description(device), "backend": backend_name(), "world_size": trainer.rt.world_size}
    if device.type == "cuda" and not fp8_supported(device) and cfg.model.fp8_head == "auto":
        path["head"] += " (no FP8 on this GPU)"
    return path


class Stopwatch:
    """Milliseconds of device work, counting only the spans between `start()` and a pause: the
    optimizer steps of a run, not its validations or checkpoints. A step's end is marked without
    waiting for the device (on CUDA an event recorded in the stream, elsewhere the host clock), so
    the host keeps queueing work; the device is synchronised only where time is read: `laps()`,
    `stop()` and so `paused()`, and `start()`, so that a span begins with an idle device."""

    def __init__(self, device: torch.device, elapsed_ms: float = 0.0):
        self.device, self.cuda = device, device.type == "cuda"
        self.total_ms = elapsed_ms  # of the spans already closed
        self._started = None
        self._marks: list[tuple[int, object]] = []
        self._laps: list[tuple[int, float]] = []

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _ms_between(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else 1000 * (end - start)

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._started = self._now()

    def mark(self, step: int) -> None:
        self._marks.append((step, self._now()))

    def laps(self) -> list[tuple[int, float]]:
        """(step, total ms at its end) for every step marked since the last call, in order."""
        if self.cuda and self._marks:
            self._marks[-1][1].synchronize()
        self._settle()
        laps, self._laps = self._laps, []
        return laps

    def stop(self) -> float:
        """Close the running span and return the total."""
        end = self._now()
        if self.cuda:
            end.synchronize()
        self._settle()
        self.total_ms += self._ms_between(self._started, end)
        self._started = None
        return self.total_ms

    @property
    def running(self) -> bool:
        return self._started is not None

    @contextmanager
    def paused(self):
        """A block left out of the total, such as a validation; `total_ms` is the total before it.
        A stopwatch not yet started stays stopped."""
        running = self.running
        if running:
            self.stop()
        yield
        if running:
            self.start()

    def _settle(self) -> None:
        # The marks' times are measured from their span's start, so they are turned into totals
        # before the span closes; the device has passed the last of them (the callers synchronise).
        self._laps += [(step, self.total_ms + self._ms_between(self._started, mark)) for step, mark in self._marks]
        self._marks.clear()


class Trainer:
    def __init__(self, cfg: Config, rt: Runtime, label: str = ""):
        self.cfg, self.rt, self.label = cfg, rt, label
        self.device = rt.device
        # Inductor's CPU scatter-adds (embedding gradients) accumulate with atomics in thread order,
        # so two runs of one seed drifted apart by ~1e-4 within a few steps; in deterministic mode
        # it falls back to the ordered eager kernels, for ~1% of step time (docs/benchmarks.md).
        # CUDA runs keep the faster nondeterministic kernels. Set either way: it is process-wide.
        torch.use_deterministic_algorithms(self.device.type == "cpu")
        # That mode also fills every new tensor with NaN, a check for reads of uninitialised memory
        # that determinism does not need and that cost about 1% of tiny's step on 2 cores
        torch.utils.deterministic.fill_uninitialized_memory = False
        torch.manual_seed(cfg.train.seed)
        self.data_dir, train_files, self.val_files = _data_files(cfg)
        for step in shape_steps(cfg):  # every stage's batch must divide over the ranks, checked before any work
            grad_accum(step_plan(step, cfg), cfg, rt.world_size)
        first = step_plan(0, cfg)
        self.accum = grad_accum(first, cfg, rt.world_size)
        self.model = GPT(cfg.model)
        # The FP8 gradient scale is fixed for the run, as in the record, at the first stage's batch.
        self.forward = prepare(self.model, cfg, self.device, "train", self.accum * cfg.data.micro_batch_seqs)
        broadcast_parameters(self.model)
        # fused: torch's fused AdamW, RecordAdam's compiled update; on CUDA, and wherever a run compiles
        fused = self.device.type == "cuda" or compile_scope(cfg, self.device) is not None
        self.optimizers = build_optimizers(self.model.param_groups(), cfg.optim, fused=fused)
        # NorMuon reduce-scatters its own gradients; the averager all-reduces the rest
        own = {p for opt in self.optimizers if getattr(opt, "reduces_gradients", False)
               for group in opt.param_groups for p in group["params"]}
        self.grads = GradientAverager([p for p in self.model.parameters() if p not in own], rt.world_size)
        self.loader = TrainLoader(train_files, seq_len=first.seq_len, micro_batch_seqs=cfg.data.micro_batch_seqs,
                                  batch_tokens=first.batch_tokens, max_doc_len=first.max_doc_len,
                                  rank=rt.rank, world_size=rt.world_size,
                                  bos_aligned=cfg.data.bos_aligned, shard_boundary=cfg.data.shard_boundary,
                                  device=self.device, seed=cfg.train.seed)
        self.step = 0
        self.train_time_ms = 0.0
        self.clock_compiles = 0  # graphs torch.compile compiled inside timed steps of this process
        self._windows: dict[tuple[str, int], torch.Tensor] = {}
        self._yarn_windows: list[int] | None = None  # what the model's YaRN state follows; None: unknown

    # -- state that checkpoints carry -------------------------------------------------------------
    def state(self) -> dict:
        return {"step": self.step, "train_time_ms": self.train_time_ms, "loader": self.loader.state_dict(),
                "label": self.label, "activation_dtype": str(self.model.activation_dtype).removeprefix("torch."),
                **{"orthogonalize_dtype": str(o.orthogonalize_dtype).removeprefix("torch.")
                   for o in self.optimizers if hasattr(o, "orthogonalize_dtype")}}

    def load_state(self, state: dict) -> None:
        self.step = state["step"]
        self.train_time_ms = state["train_time_ms"]
        self.loader.load_state_dict(state["loader"])

    def save(self, run_dir: Path) -> None:
        """A checkpoint of this step in `run_dir`, keeping the newest `train.keep`."""
        checkpoint.save(run_dir, self.model, self.optimizers, self.state(), self.cfg, self.rt, keep=self.cfg.train.keep)

    def _window_tensor(self, kind: str, tokens: int | None) -> torch.Tensor | None:
        """A window as a device tensor, not an int, so a compiled model does not recompile as it
        grows; one tensor per kind and value, copied once from pinned memory without blocking the
        host. Per kind, because Dynamo guards on which inputs alias: long and short windows that are
        one tensor while equal (tiny's first stage) would recompile the step they first differ."""
        if tokens is None:
            return None
        if (kind, tokens) not in self._windows:
            self._windows[kind, tokens] = self._on_device(tokens, torch.int32)
        return self._windows[kind, tokens]

    def _on_device(self, values, dtype: torch.dtype) -> torch.Tensor:
        """Host values as a device tensor, copied from pinned memory without blocking the host (from
        pageable memory, as torch.tensor(values, device=...) copies, a CUDA copy waits for the device)."""
        host = torch.tensor(values, dtype=dtype, pin_memory=self.device.type == "cuda")
        return host.to(self.device, non_blocking=True)

    def _windows_at(self, step: int) -> dict:
        """The forward's window arguments at `step` (step == train.steps: the final validation)."""
        long, short = window_at(step, self.cfg)
        return {"window_tokens": self._window_tensor("long", long), "short_window": self._window_tensor("short", short)}

    # -- one optimizer step ---------------------------------------------------------------------
    def train_step(self, step: int) -> torch.Tensor:
        """One optimizer step; returns this rank's mean loss as a device tensor, so that nothing
        here waits for the device (losses are fetched in batches, see StepLog)."""
        plan = step_plan(step, self.cfg)
        inputs_kw = {**self._windows_at(step), **self._loss_args(step, plan)}
        self._follow_yarn(step)
        accum = grad_accum(plan, self.cfg, self.rt.world_size)
        total = torch.zeros((), device=self.device)
        batch = self.loader.next_batch(seq_len=plan.seq_len, batch_tokens=plan.batch_tokens, max_doc_len=plan.max_doc_len)
        for i, (inputs, targets) in enumerate(batch):
            self.grads.sync = i == accum - 1
            loss = self.forward(inputs, targets, **inputs_kw)
            (loss / accum).backward()
            total += loss.detach()
        self.grads.wait()
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        apply_schedule(self.optimizers, step, self.cfg)
        tied = head_tied_at(step, self.cfg)
        if tied:
            add_embedding_grad(self.model.lm_head.weight, self.model.wte.weight)
        for opt in self.optimizers:
            opt.step()
        if tied:
            copy_head_to_embedding(self.model.lm_head.weight, self.model.wte.weight)
        if step == untie_step(self.cfg):
            head = self.model.lm_head.weight
            untie(next(o for o in self.optimizers if any(p is head for g in o.param_groups for p in g["params"])),
                  head, self.model.wte.weight)
        self.model.zero_grad(set_to_none=True)
        return total / accum

    def _loss_args(self, step: int, plan: StepPlan) -> dict:
        """The step's multi-token and prefix loss weights as device tensors (a compiled model does not
        recompile as they ramp); nothing for a plain next-token loss."""
        args = {}
        if self.cfg.stages.mtp_weights_start:
            args["future_weights"] = self._on_device(plan.mtp_weights, torch.float32)
        if graph_key(step, self.cfg)[2]:
            args["prefix_weight"] = self._on_device(plan.prefix_weight, torch.float32)
        return args

    def _follow_yarn(self, step: int) -> None:
        """Bring YaRN's state (a model buffer) to the long windows trained with up to `step`."""
        if self.cfg.model.yarn:
            windows = yarn_windows(step, self.cfg)
            if windows != self._yarn_windows:
                self.model.set_yarn(windows)
                self._yarn_windows = windows

    def validate(self, step: int) -> float:
        """The mean loss per token over the whole val set, every rank scoring its share of it."""
        self.model.eval()
        batches = val_batches(self.val_files, val_tokens=self.cfg.data.val_tokens, seq_len=self.cfg.data.val_seq_len,
                              rank=self.rt.rank, world_size=self.rt.world_size, device=self.device)
        sums = all_reduce_sum(loss_sums(self.forward, batches, self._windows_at(step), self.device))
        self.model.train()
        return (sums[0] / sums[1]).item()

    def warm_up_steps(self, steps: int, until: int | None = None) -> list[int]:
        """The steps a warm-up of `steps` per shape runs: that many from this step, and from the first
        step of every later stage with a new graph_key (sequence length, multi-token weights, prefix
        loss), so that no compile lands on the clock. More tokens per step are more micro-steps of
        the same shape; validation needs no warm-up: it is off the clock. `until` leaves out the
        stages that start at or after it (a benchmark of the first steps needs only their shapes)."""
        end = self.cfg.train.steps if until is None else min(until, self.cfg.train.steps)
        starts, keys = [], set()
        for start in [self.step, *(s for s in [0, *self.cfg.stages.ends] if s > self.step)]:
            key = graph_key(start, self.cfg)
            if key not in keys and start < end:
                keys.add(key)
                starts += range(start, min(start + steps, self.cfg.train.steps))
        return starts

    def warm_up(self, steps: int, until: int | None = None) -> tuple[int, float]:
        """Run the real steps of `warm_up_steps(steps, until)` to trigger compilation and allocator
        growth, then put model, optimizers and loader back as they were; returns (steps run, seconds)."""
        todo = self.warm_up_steps(steps, until)
        if not todo:
            return 0, 0.0
        snapshot = (copy.deepcopy(self.model.state_dict()), [copy.deepcopy(o.state_dict()) for o in self.optimizers],
                    self.loader.state_dict())
        watch = Stopwatch(self.device)
        watch.start()
        for step in todo:
            self.train_step(step)
        seconds = watch.stop() / 1000
        self.model.load_state_dict(snapshot[0])
        self._yarn_windows = None
        for opt, state in zip(self.optimizers, snapshot[1]):
            opt.load_state_dict(state)
        self.loader.load_state_dict(snapshot[2])
        return len(todo), seconds


class StepLog:
    """The per-step records of a run, and its progress bar when stderr is a terminal: losses stay on
    the device until `flush()`, which fetches them all at once (averaged across ranks in one
    all-reduce), checks them, and writes a metrics.jsonl record and a log.txt line per step."""

    def __init__(self, trainer: Trainer, log: RunLog, run_dir: Path):
        self.trainer, self.log, self.run_dir = trainer, log, run_dir
        cfg = trainer.cfg
        self.progress = None
        if trainer.rt.is_main and sys.stderr.isatty():
            from tqdm import tqdm
            self.progress = tqdm(total=cfg.train.steps, initial=trainer.step, unit="step", dynamic_ncols=True)
        self.steps = cfg.train.steps
        self.flops = trainer.model.flops_per_token(step_plan(cfg.train.steps - 1, cfg).seq_len)
        self.peak = peak_flops(trainer.device)
        self.pending: list[torch.Tensor] = []

    def add(self, loss: torch.Tensor) -> None:
        self.pending.append(loss)
        if self.progress is not None:
            self.progress.update(1)

    def flush(self, laps: list[tuple[int, float]]) -> None:
        """Write the steps added since the last flush, given their (step, train time) from `Stopwatch.laps`."""
        if not self.pending:
            return
        local = torch.stack(self.pending).float()
        losses = (all_reduce_sum(local) / self.trainer.rt.world_size).tolist()
        self.pending.clear()
        for (step, now_ms), loss in zip(laps, losses, strict=True):
            if not math.isfinite(loss):
                raise TrainingDiverged(f"training loss became {loss} at step {step}; the last good checkpoint (if any) "
                                       f"is kept in {self.run_dir / 'checkpoints'}")
            self._write(step, loss, now_ms)
        if self.progress is not None:
            self.progress.set_postfix(loss=f"{losses[-1]:.3f}")

    def _write(self, step: int, loss: float, now_ms: float) -> None:
        tokens = tokens_before(step, self.trainer.cfg)
        record = {"step": step, "tokens": tokens, "train_time_ms": round(now_ms, 3),
                  "train_loss": loss, "lr": schedule_at(step - 1, self.trainer.cfg)[0]}
        tokens_per_s = tokens / (now_ms / 1000) if now_ms > 0 else 0.0
        record["tokens_per_s"] = round(tokens_per_s, 1)
        utilisation = mfu(self.flops, tokens_per_s, self.peak, self.trainer.rt.world_size)
        if utilisation is not None:
            record["mfu"] = round(utilisation, 4)
        self.log.metrics(record)
        self.log.line(f"step:{step}/{self.steps} train_time:{now_ms:.0f}ms step_avg:{now_ms / step:.2f}ms")

    def validation(self, step: int, val_loss: float, train_time_ms: float) -> None:
        avg = train_time_ms / max(step, 1)
        self.log.line(f"step:{step}/{self.steps} val_loss:{val_loss:.4f} train_time:{train_time_ms:.0f}ms "
                      f"step_avg:{avg:.2f}ms", echo=self.progress is None and self.trainer.rt.is_main)
        self.log.metrics({"step": step, "tokens": tokens_before(step, self.trainer.cfg), "train_time_ms": round(train_time_ms, 3),
                          "val_loss": val_loss})
        if self.progress is not None:
            self.progress.set_postfix(val_loss=f"{val_loss:.4f}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()


@dataclass
class RunOptions:
    """How `speedrun train` was asked to run, beyond the config itself."""
    out: str | None = None
    resume: str | None = None  # a run or checkpoint directory, or "auto"
    overwrite: bool = False
    label: str = ""
    tensorboard: bool = False
    wandb: bool = False
    # config keys the command line asked for: on resume they are checked against the checkpoint's
    asked: set[str] = field(default_factory=set)


# What may differ from the checkpoint's config on resume: where the data lives, how long the run is
# (its schedules then follow the new length from the resume point), and how it is logged and run.
RESUMABLE = {"data.dir", "train.steps", "train.val_every", "train.save_every", "train.keep", "train.log_every",
             "train.compile", "train.device"}
STEP_SCALED = {"optim.muon_momentum_warmup_steps", "optim.warmup_steps"}  # what scale_steps changes besides


def _get(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def resumed_config(saved: Config, asked: Config, keys: set[str]) -> tuple[Config, list[str]]:
    """The checkpoint's config with the asked changes among `keys` applied, and a line per change;
    a change outside RESUMABLE is refused, naming it."""
    allowed, notes = set(RESUMABLE), []
    if "train.steps" in keys and asked.train.steps != saved.train.steps:
        notes.append(f"train.steps: {saved.train.steps} -> {asked.train.steps} (schedules follow the new length)")
        scale_steps(saved, asked.train.steps)  # as --steps does
        allowed |= STEP_SCALED  # a preset scaled to the new length may round them differently
    keys = keys | ({f"{sec}.{k}" for sec in SECTIONS for k in to_dict(asked)[sec]} if "*" in keys else set())
    changed = sorted(k for k in keys - {"*"} if _get(saved, k) != _get(asked, k))
    refused = [k for k in changed if k not in allowed]
    if refused:
        raise UsageError(f"--resume continues the checkpoint's config, and {', '.join(refused)} cannot change on "
                         f"resume (what can: {', '.join(sorted(RESUMABLE))})")
    notes += [f"{k}: {_get(saved, k)!r} -> {_get(asked, k)!r}" for k in changed]
    for k in changed:
        section, name = k.split(".")
        setattr(getattr(saved, section), name, _get(asked, k))
    validate(saved)
    return saved, notes


def run(cfg: Config, options: RunOptions) -> dict:
    rt = setup(cfg.train.device)
    try:
        # a --resume path is looked up before --out is made, so that a wrong one leaves nothing behind
        named = (None if options.resume in (None, "auto")
                 else checkpoint.find_resume(Path(options.resume), options.resume))
        run_dir = _run_dir(options.out, options.resume, options.overwrite, rt)
        trainer, resumed = resume(cfg, rt, run_dir, options, named)
        log = _open_log(trainer, run_dir, options, resumed)
        try:
            warm = _warm_up(trainer, log)
            val_loss = fit(trainer, log, run_dir)
        except BaseException as error:
            _record_stop(trainer, log, run_dir, error)
            raise
        return _finish(trainer, log, run_dir, val_loss, warm)
    finally:
        rundir.release()
        teardown()


def resume(cfg: Config, rt: Runtime, run_dir: Path, options: RunOptions,
           named: Path | None) -> tuple[Trainer, list[str]]:
    """The trainer: a fresh one, or with --resume one continued from its checkpoint (`named`, or with
    --resume auto the newest in run_dir), under that checkpoint's config with the asked changes
    RESUMABLE allows. Also what the log's header says about it: the checkpoint and each change,
    nothing for a fresh start."""
    found = checkpoint.find_resume(run_dir, "auto") if options.resume == "auto" else named
    notes: list[str] = []
    if found is not None:
        state = checkpoint.read_state(found)
        step = state["step"]
        cfg, notes = resumed_config(checkpoint.read_config(found), cfg, options.asked)
        # The dtypes the run trained in, whatever "auto" picks here. A checkpoint that does not say is
        # from before "auto" looked at the CPU: activations were bf16 on CUDA and float32 elsewhere,
        # and Muon/NorMuon orthogonalised in bf16 everywhere.
        if cfg.model.activation_dtype == "auto":
            cfg.model.activation_dtype = state.get("activation_dtype") or (
                "bfloat16" if rt.device.type == "cuda" else "float32")
        if cfg.optim.orthogonalize_dtype == "auto":
            cfg.optim.orthogonalize_dtype = state.get("orthogonalize_dtype", "bfloat16")
        if cfg.train.steps < step:
            raise UsageError(f"--steps {cfg.train.steps}: the checkpoint {found} is already at step {step}")
    check_run_data(cfg)
    trainer = Trainer(cfg, rt, options.label)
    if found is None:
        return trainer, []
    saved = checkpoint.load(found, trainer.model, trainer.optimizers, rt)
    trainer.load_state(saved)
    trainer.label = saved.get("label", options.label)
    if rt.is_main:
        checkpoint.truncate_metrics(run_dir / "metrics.jsonl", trainer.step)
    return trainer, [f"resumed from {found} at step {trainer.step}", *(f"changed on resume: {n}" for n in notes)]


def _open_log(trainer: Trainer, run_dir: Path, options: RunOptions, resumed: list[str]) -> RunLog:
    """The run's log with its header written (continued after `resumed`'s lines, if any), and the
    config the run goes on with as config.toml."""
    cfg, rt = trainer.cfg, trainer.rt
    log = RunLog(run_dir if rt.is_main else None, append=bool(resumed), tensorboard=options.tensorboard,
                 wandb=options.wandb, config=to_dict(cfg))
    if rt.is_main:
        (run_dir / "config.toml").write_text(to_toml(cfg))
        path = execution_path(trainer)
        log.header(rt.device, rt.world_size, [
            f"config: {trainer.label or 'custom'}  data: {trainer.data_dir}",
            f"parameters: {sum(p.numel() for p in trainer.model.parameters()):,}  grad_accum: {trainer.accum}  "
            f"tokens/step: {step_plan(0, cfg).batch_tokens:,}" + ("  (at step 0; see `speedrun schedule`)" if cfg.stages.ends else ""),
            "path: " + "  ".join(f"{k}: {v}" for k, v in path.items() if k not in ("torch", "cuda", "device", "world_size")),
            *([AUTO_COMPILE_ON_CPU] if cfg.train.compile == "auto" and compile_scope(cfg, rt.device) == "regions" else []),
            *resumed,
        ])
    return log


def _warm_up(trainer: Trainer, log: RunLog) -> float:
    cfg = trainer.cfg
    try:
        steps, warm = trainer.warm_up(cfg.train.warmup_steps_untimed)
    except torch.OutOfMemoryError:
        raise SpeedrunError(
            f"out of memory at start-up with config '{trainer.label or 'custom'}': each device holds "
            f"{cfg.data.micro_batch_seqs} sequence(s) of {cfg.data.seq_len} tokens per micro-step; lower it with "
            f"--set data.micro_batch_seqs=N or --set data.seq_len=N (grad accumulation keeps the global batch)") from None
    log.line(f"warm-up: {steps} untimed steps in {warm:.1f}s (compile included)", echo=False)
    return warm


def fit(trainer: Trainer, log: RunLog, run_dir: Path) -> float:
    """The steps from `trainer.step` to the last, every step's record, and the validations and
    checkpoints due on the way, which the train time leaves out; returns the last val loss."""
    t = trainer.cfg.train
    step_log = StepLog(trainer, log, run_dir)
    watch = Stopwatch(trainer.device, trainer.train_time_ms)
    first, val_loss = trainer.step, float("nan")
    for step in range(first, t.steps + 1):
        validating = step == t.steps or (t.val_every > 0 and step % t.val_every == 0)
        saving = t.save_every > 0 and step % t.save_every == 0 and first < step < t.steps  # the end always saves
        if validating or saving or step % t.log_every == 0:
            step_log.flush(watch.laps())
        if validating or saving:
            with watch.paused():
                trainer.train_time_ms = watch.total_ms
                if saving:
                    trainer.save(run_dir)
                if validating:
                    val_loss = trainer.validate(step)
                    step_log.validation(step, val_loss, trainer.train_time_ms)
        if step < t.steps:
            if not watch.running:  # started at the first step, so the time before it is none
                watch.start()
            graphs = graphs_compiled()
            step_log.add(trainer.train_step(step))
            trainer.clock_compiles += graphs_compiled() - graphs
            trainer.step = step + 1
            watch.mark(step + 1)
    step_log.close()
    return val_loss


def _record_stop(trainer: Trainer, log: RunLog, run_dir: Path, error: BaseException) -> None:
    """A run that ends early says why in log.txt and summary.json ("status": "failed" or
    "interrupted"), so that compare and plot show it as such and record refuses it."""
    status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
    reason = first_line(error)
    log.line(f"{status} at step {trainer.step}: {reason}")
    if trainer.rt.is_main:
        checkpoint.write_json(run_dir / "summary.json", {
            "config": trainer.label or "custom", "status": status, "error": reason, "step": trainer.step,
            "steps": trainer.cfg.train.steps, "train_time_ms": round(trainer.train_time_ms, 3),
            "world_size": trainer.rt.world_size})
    log.close()


def _finish(trainer: Trainer, log: RunLog, run_dir: Path, val_loss: float, warm: float) -> dict:
    cfg, rt = trainer.cfg, trainer.rt
    trainer.save(run_dir)
    summary = {"config": trainer.label or "custom", "status": "finished", "final_val_loss": val_loss,
               "train_time_ms": round(trainer.train_time_ms, 3), "steps": cfg.train.steps,
               "tokens": tokens_before(cfg.train.steps, cfg), "world_size": rt.world_size,
               "peak_memory_mib": round(peak_memory_mib(rt.device), 1), "warmup_s": round(warm, 2),
               "path": execution_path(trainer), "compiles_on_clock": trainer.clock_compiles}
    if rt.is_main:
        if trainer.clock_compiles:
            log.line(f"warning: torch.compile compiled {trainer.clock_compiles} graph(s) inside timed steps, so their "
                     "compile time is in train_time: the warm-up missed a shape or a guard", echo=True)
        summary["val_set"] = val_fingerprint(trainer.val_files, val_tokens=cfg.data.val_tokens, seq_len=cfg.data.val_seq_len)
        checkpoint.write_json(run_dir / "summary.json", summary)
        log.line(f"peak memory: {summary['peak_memory_mib']:.0f} MiB")
        _plot(run_dir)
        log.line(f"final val_loss:{val_loss:.4f} train_time:{trainer.train_time_ms / 1000:.1f}s steps:{cfg.train.steps} "
                 f"run dir: {run_dir}", echo=True)
    log.close()
    barrier()
    return summary


def _plot(run_dir: Path) -> None:
    """loss.png in the run directory; a run that trained is not failed for a figure it could not draw."""
    try:
        print(f"loss curve: {analysis.plot_run_dir(run_dir)}", flush=True)
    except SpeedrunError as e:
        print(f"speedrun train: warning: no loss.png ({first_line(e)})", file=sys.stderr, flush=True)


def register(sub) -> None:
    p = sub.add_parser("train", help="train a GPT with a preset or config file",
                       description="Train a GPT. With no arguments: preset 'tiny' on the built-in corpus on CPU, "
                                   "'gpt2-speedrun' on FineWeb when CUDA is present. Run under torchrun for several "
                                   "processes or nodes.")
    add_config_arguments(p)
    p.add_argument("--data", help="directory of .bin shards (default: the preset's data.dir; empty means the built-in corpus)")
    p.add_argument("--out", help="run directory (default runs/<timestamp>, or the resumed run's); one that already "
                                 "holds a run is refused unless --resume or --overwrite, and one another run is "
                                 "training in is refused")
    p.add_argument("--overwrite", action="store_true", help="delete the results already in --out before training")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help=COMPILE_HELP)
    p.add_argument("--seed", type=int)
    p.add_argument("--steps", type=int, help="number of optimizer steps; every schedule is scaled to it")
    p.add_argument("--val-every", type=int, help="validate every N steps (0: only at the end)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (a checkpoint is always written at the end)")
    p.add_argument("--keep", type=int, help="keep the last N checkpoints (0: all)")
    p.add_argument("--resume", metavar="DIR|auto", help="continue from a run or checkpoint directory with its config; "
                                                        "'auto': the latest checkpoint in --out, or a fresh start if "
                                                        "there is none. Only the data location, --steps, intervals, "
                                                        "--compile and --device may change; other changes are refused")
    p.add_argument("--tensorboard", action="store_true", help="also log metrics to RUN_DIR/tensorboard")
    p.add_argument("--wandb", action="store_true", help="also log metrics to Weights & Biases (offline without credentials)")
    p.set_defaults(func=_cmd_train)


def asked_keys(args: argparse.Namespace) -> set[str]:
    """The config keys the command line names. A --preset or --config names every key ("*")."""
    keys = {text.split("=", 1)[0].strip() for text in args.set}
    keys |= {key for flag, key in FLAG_KEYS.items() if getattr(args, flag) is not None}
    keys |= {key for flag, key in (("steps", "train.steps"), ("val_every", "train.val_every"))
             if getattr(args, flag) is not None}
    return keys | ({"*"} if args.preset or args.config else set())


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    if args.resume == "auto" and not args.out:
        raise UsageError("--resume auto needs --out DIR (the run directory to look in)")
    options = RunOptions(out=args.out, resume=args.resume, overwrite=args.overwrite,
                         label=args.preset or args.config or default_preset(), tensorboard=args.tensorboard,
                         wandb=args.wandb, asked=asked_keys(args))
    summary = run(cfg, options)
    return 0 if math.isfinite(summary["final_val_loss"]) else 1
