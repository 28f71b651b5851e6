"""`pixeldit train`: the training loop shared by every strategy.

One step = one global batch: the rank's share is split into micro-batches; the
per-sample draws (t, ε, label drop) come from (seed, step, sample index), so
neither accumulation nor world size changes them. One all-reduce per step
carries the loss sum, the non-finite flag and the stop flag (SIGTERM, or a first
Ctrl-C), so all ranks skip, save and stop together.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from .. import storage
from ..errors import TrainingDiverged, WeightsError
from ..host import exempt_setup_from_collection, prepare_host
from ..diffusion import RectifiedFlow, repa_loss, velocity_loss
from ..models import build_model, training_flops
from ..parallel import TrainModule, build_strategy
from ..parallel.checkpoint import join, latest_checkpoint, load_rank_state, read_meta, save_checkpoint
from ..parallel.ema import ShardedEMA
from ..parallel.torch_internals import cpu_has_native_bf16
from .monitor import Monitor, MonitorSpec
from .preview import preview_spec, write_preview
from .schedule import StagedSchedule
from .trackers import build_trackers, tracker_names

log = logging.getLogger("pixeldit.train")


@dataclass
class TrainState:
    step: int = 0          # global batches consumed (also the seed index of the draws)
    updates: int = 0       # optimizer steps taken (skipped steps excluded): the schedule's clock
    skipped: int = 0
    consecutive_skips: int = 0
    # losses of the steps this process ran (bounded: a 1.6M-step run must not grow a list forever)
    history: collections.deque = field(default_factory=lambda: collections.deque(maxlen=100_000))


def setup_distributed(cfg) -> tuple[int, int, torch.device]:
    from ..distributed import join_process_group

    cuda = torch.cuda.is_available()
    rank, world, local_rank, _ = join_process_group(cuda, cfg.distributed.backend, cfg.distributed.timeout_s)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    prepare_host(device)
    return rank, world, device


def ensure_synthetic_data(cfg, run_dir: str, rank: int) -> str:
    """The demo's data: coloured shapes written under the run directory on first use."""
    from ..data_pipelines.manifest import MANIFEST
    from ..data_pipelines.writer import synthetic_items, write_shards

    root = os.path.join(run_dir, "data")
    if rank == 0 and not os.path.exists(os.path.join(root, MANIFEST)):
        arch = cfg.model.arch()
        items, classes = synthetic_items(min(arch.num_classes, 10), 200, cfg.data.image_size, cfg.train.seed)
        write_shards(items, classes, root, shard_samples=250, seed=cfg.train.seed, source="synthetic")
    if dist.is_initialized():
        dist.barrier()
    return root


def load_initial_weights(model, path: str):
    """Fine-tuning start: weights only, from our export (its EMA weights) or the authors' .ckpt."""
    if path.endswith(".safetensors"):
        from .export import load_exported
        state = load_exported(path, "ema").state_dict()
    else:
        from ..models import load_authors_checkpoint
        imported = load_authors_checkpoint(path)
        state = imported["ema"] or imported["model"]
    # compared before loading: load_state_dict reports other shapes as a RuntimeError per tensor
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [f"{k} {tuple(state[k].shape)} in the file, {tuple(v.shape)} here" for k, v in own.items()
                if k in state and state[k].shape != v.shape]
    if missing or unexpected or reshaped:
        raise WeightsError(f"train.init_from={path}: does not match the model of this config ({len(reshaped)} "
                           f"tensors of another shape, e.g. {reshaped[:2]}; missing {missing[:3]}; unexpected "
                           f"{unexpected[:3]}); set model.* to the architecture these weights were trained with")
    model.load_state_dict(state)


def _stand_in(batch: dict) -> dict:
    """One sample to push through a forward / backward whose loss is not counted: the batch's first
    (real pixels and targets keep every gradient finite), or zeros when the batch came empty."""
    if len(batch["key"]):
        return {k: v[:1] for k, v in batch.items()}
    return {k: v.new_zeros((1, *v.shape[1:])) if isinstance(v, torch.Tensor) else [""] for k, v in batch.items()}


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


class Trainer:
    def __init__(self, cfg, run_dir: str | None = None):
        self.cfg = cfg
        self.run_dir = run_dir or cfg.train.run_dir
        self.rank, self.world, self.device = setup_distributed(cfg)
        if not dist.is_initialized():
            # DCP warns on every save and load that it runs without a process group: in a
            # single-process run that is the intent, and the warning would repeat at every checkpoint
            warnings.filterwarnings("ignore", category=UserWarning,
                                    message="torch.distributed is disabled, unavailable or uninitialized")
        self.layout = cfg.train.layout(self.world)  # refuses a batch the ranks cannot share before any work
        if self.device.type == "cpu" and cfg.distributed.precision == "bf16" and not cpu_has_native_bf16():
            log.warning("bf16 on a CPU without avx512_bf16/AMX runs emulated matmuls, ~40x slower than fp32 "
                        "(docs/benchmarks.md); use distributed.precision=fp32 here")
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank and strategy
        os.makedirs(self.run_dir, exist_ok=True)
        if cfg.data.source == "synthetic":
            cfg.data.source = ensure_synthetic_data(cfg, self.run_dir, self.rank)

        from ..data_pipelines.loader import build_loader
        from .loader_settings import loader_settings
        self.loader = build_loader(loader_settings(cfg, self.layout.per_rank), self.rank, self.world,
                                   str(self.device), run_dir=self.run_dir)
        arch = self.arch = cfg.model.arch()
        self.strategy, self.ema = self._build_engine()
        self.flow = RectifiedFlow.from_config(cfg.diffusion, arch.num_classes)
        self.schedule = StagedSchedule.from_config(cfg.schedule)
        self.state = TrainState()
        self.checkpoint_root = self._checkpoint_root()
        self.stop_requested = False
        self.stop_signal: str | None = None  # the signal this process received, if any
        self.already_complete = False      # the run's checkpoint is already at train.steps
        self.stopped_by: str | None = None   # why fit() stopped before train.steps (set on every rank)
        self.last_preview = None
        self.last_eval: dict | None = None
        self.evaluator = None
        if cfg.eval.every_steps:
            from .eval_loop import InLoopEvaluator, eval_spec
            self.evaluator = InLoopEvaluator(eval_spec(cfg), arch, self.device, self.rank, self.world)
        self.monitor = Monitor(MonitorSpec(
            total_steps=cfg.train.steps, log_every=cfg.logging.every_steps, peak_tflops=cfg.logging.peak_tflops,
            flops_per_image=training_flops(arch, cfg.data.image_size, cfg.data.image_size),
            config_yaml=cfg.to_yaml()), self.run_dir, self.rank, self.world, self.device,
            open_trackers=lambda: build_trackers(cfg, self.run_dir))

    def _build_engine(self):
        """The model (and REPA's projector) under the configured strategy, and the EMA of its masters."""
        cfg = self.cfg
        model = build_model(cfg.model.name, **cfg.model.overrides())
        self.repa = cfg.repa.kind()
        projector = self.repa.build_projector(self.arch.hidden_size, cfg.repa.encoder_dim)
        # counted before a strategy shards them (ZeRO-3 and FSDP leave each rank a part)
        self.parameter_count = sum(p.numel() for p in model.parameters())
        self.projector_parameter_count = sum(p.numel() for p in projector.parameters()) if projector else 0
        self.repa.start(cfg.repa, cfg.data.image_size, self.arch.patch_size, self.device,
                        cfg.distributed.precision == "bf16")
        if cfg.train.init_from:
            load_initial_weights(model, cfg.train.init_from)
        strategy = build_strategy(TrainModule(model, projector, cfg.repa.block), cfg.parallel_spec(self.world),
                                  self.device)
        ema = ShardedEMA(strategy.checkpoint.fragments(), cfg.ema.decay, cfg.ema.warmup,
                         replicated=strategy.checkpoint.replicated)
        return strategy, ema

    # ------------------------------------------------------------ resume

    def _checkpoint_root(self) -> str:
        """checkpoint.dir (a folder or an fsspec URL), else <run_dir>/checkpoints."""
        c = self.cfg.checkpoint
        root = (c.dir or os.path.join(self.run_dir, "checkpoints")).rstrip("/")
        storage.register_root(root, {"endpoint_url": c.endpoint_url} if c.endpoint_url else {})
        return root

    def resume(self, path: str | None = None) -> bool:
        """Load `path`, else the run's newest complete checkpoint; False for a fresh run.

        The saved config is compared with this one before any state is loaded (resume_check.py).
        A run already at train.steps loads and says so: fit's loop then runs no step.
        """
        from ..parallel.checkpoint import latest_complete
        from .resume_check import check_resume_config, data_fingerprint

        if path is not None:
            meta = read_meta(path)
        else:
            found = latest_complete(self.checkpoint_root)
            if found is None:
                return False
            path, meta = found
        # the data is compared by content, so shards moved elsewhere (or a moved demo run) still resume
        check_resume_config(meta["config"], self.cfg, path, meta.get("data_fingerprint"),
                            data_fingerprint(self.loader.spec.manifest))
        # ddp / fsdp reshard by themselves; ZeRO converts to DeepSpeed's universal format when the world changed
        self.strategy.checkpoint.load(join(path, "engine"), saved_world=meta["world"])
        self.ema.load(join(path, "ema"), self.rank)
        rank_state = load_rank_state(path, self.rank if self.rank < meta["world"] else 0)
        self.loader.load_state_dict(rank_state["loader"])
        _set_rng_state(rank_state["rng"])
        s = meta["state"]
        self.state = TrainState(step=s["step"], updates=s["updates"], skipped=s["skipped"],
                                consecutive_skips=s["consecutive_skips"])
        self.ema.updates = meta["ema_updates"]
        steps = self.cfg.train.steps
        self.already_complete = self.state.step >= steps
        if self.rank == 0:
            log.info("resumed from %s at step %d (epoch %d)", path, self.state.step, self.loader.epoch)
            if self.already_complete:
                log.info("%s is already complete at step %d (train.steps=%d): nothing to train; to train "
                         "further, run the same command with --set train.steps=N, N > %d", self.run_dir,
                         self.state.step, steps, self.state.step)
        return True

    def save(self, stop: bool = False) -> str:
        """`stop`: the save of a requested stop, marked in meta.json so that `pixeldit launch` can tell
        a stopped run (exit 0) from a failed one without racing the ranks' save."""
        from .resume_check import data_fingerprint

        s = self.state
        meta = {"step": s.step, "world": self.world, "strategy": self.strategy.name,
                "state": {"step": s.step, "updates": s.updates, "skipped": s.skipped,
                          "consecutive_skips": s.consecutive_skips},
                "ema_updates": self.ema.updates, "epoch": self.loader.epoch,
                "model": {"name": self.cfg.model.name, **self.cfg.model.overrides()},
                "config": self.cfg.to_dict(), "data_fingerprint": data_fingerprint(self.loader.spec.manifest),
                "stop_save": stop}
        rank_state = {"loader": self.loader.state_dict(), "rng": _rng_state()}
        return save_checkpoint(self.checkpoint_root, s.step, self.rank, engine=self.strategy.checkpoint, ema=self.ema,
                               rank_state=rank_state, meta=meta, keep_last=self.cfg.checkpoint.keep_last)

    # ------------------------------------------------------------ one step

    def _micro_batches(self, batch: dict):
        """Exactly `layout.accumulation` (micro-batch, real samples) pairs on every rank.

        FSDP and ZeRO run collectives in every forward and backward, so a rank whose batch came
        short (corrupt samples skipped by the loader) must still run as many as the others: its
        last micro-batches are short, and one with no sample left runs a zero-weight stand-in.
        """
        m = self.layout.micro_batch
        for i in range(self.layout.accumulation):
            micro = {k: v[i * m:(i + 1) * m] for k, v in batch.items()}
            real = len(micro["key"])
            yield (micro if real else _stand_in(batch)), real

    def train_step(self, batch: dict) -> dict:
        from ..data_pipelines.loader import to_model_input

        cfg, s = self.cfg, self.state
        stage = self.schedule.at(s.updates, self.loader.epoch)
        self.strategy.begin_step(stage.lr, stage.clip)
        micros = list(self._micro_batches(batch))
        # DeepSpeed divides by its accumulation count itself; the others average micro-batch means here
        divisor = 1 if self.strategy.averages_micro_batches else len(micros)
        # a micro-batch's loss is its samples' sum over the nominal size: a short one (skipped samples)
        # weighs what it holds, a stand-in nothing (its losses are sliced off, its gradients are zeros);
        # for a full one this is its mean, bit for bit
        nominal = self.layout.micro_batch
        # the sums stay on the device: reading one back after each micro-batch would stall a GPU's
        # queue until that backward finished; the step reads them back once, after the all-reduce
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        repa_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, (micro, real) in enumerate(micros):
            x, y = to_model_input(micro, self.device)
            aligned = self.repa.targets(micro, x, self.device)
            draws = self.flow.draw(cfg.train.seed, s.step, micro["index"].tolist(), tuple(x.shape[1:]), self.device)
            x_t, t, y_in, target = self.flow.training_inputs(x, y, draws)
            with self.strategy.accumulating(last=i == len(micros) - 1):
                v, projected = self.strategy.forward(x_t, t, y_in)
                per_sample = velocity_loss(v, target, "none")[:real]
                total = per_sample
                if aligned is not None:
                    per_repa = repa_loss(projected, aligned)[:real]
                    total = per_sample + cfg.repa.weight * per_repa
                    repa_sum += per_repa.detach().double().sum()
                if i == len(micros) - 1:
                    # the last step's EMA update ran beside this step so far; the masters change from
                    # here on (DeepSpeed steps inside the last backward, the others in finish_step)
                    self.ema.settle()
                self.strategy.backward(total.sum() / nominal / divisor)
            loss_sum += per_sample.detach().double().sum()
        nonfinite = ~(torch.isfinite(loss_sum) & torch.isfinite(repa_sum))
        host = torch.tensor([float(len(batch["key"])), 1.0 if self.stop_requested else 0.0], dtype=torch.float64,
                            device=self.device)
        # on the device: an NCCL process group has no CPU backend
        flags = torch.cat([torch.stack([loss_sum, nonfinite.double(), repa_sum]), host])
        if dist.is_initialized():
            dist.all_reduce(flags)
        loss_total, nonfinite_ranks, repa_total, samples, stopping = flags.tolist()  # the one read-back
        loss = loss_total / max(samples, 1.0)
        loss_repa = repa_total / max(samples, 1.0) if self.repa.has_loss else None
        nonfinite, stop = nonfinite_ranks > 0, stopping > 0
        grad_norm, stepped = self.strategy.finish_step(skip=nonfinite)
        if stepped:
            self.ema.update()
            s.updates += 1
            s.consecutive_skips = 0
        else:
            s.skipped += 1
            s.consecutive_skips += 1
        s.step += 1
        return {"loss": loss, "loss_repa": loss_repa, "grad_norm": grad_norm, "lr": stage.lr, "clip": stage.clip, "stage": stage.index,
                "stepped": stepped, "stop": stop, "samples": int(samples)}

    # ------------------------------------------------------------ the loop

    def _on_stop_signal(self, signum, frame):
        """SIGTERM or a first Ctrl-C: stop at the next step boundary, every rank together, after a save.
        A Ctrl-C once a stop is pending aborts at once (the CLI reports it, exit 130)."""
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.stop_requested:
            raise KeyboardInterrupt
        if self.stop_requested:
            return  # a repeated SIGTERM (SLURM, a launcher forwarding it) changes nothing
        self.stop_requested, self.stop_signal = True, name
        if self.rank == 0:
            again = "; Ctrl-C again aborts without saving" if signum == signal.SIGINT else ""
            # from a thread: this handler may have interrupted a log record half-written around the progress
            # bar; the thread waits for the logging lock instead of writing into the middle of that record
            threading.Thread(target=log.warning, daemon=True,
                             args=("%s: saving after step %d, then exiting%s",
                                   "Ctrl-C" if signum == signal.SIGINT else name, self.state.step + 1, again)).start()

    def banner(self, resumed: bool) -> list[str]:
        """What this run is, in a few lines at its start: the first thing to check in a job's log."""
        cfg, arch = self.cfg, self.arch
        projector = (f" + REPA projector {self.projector_parameter_count / 1e6:.2f}M"
                     if self.projector_parameter_count else "")
        manifest = self.loader.spec.manifest
        processes = f"{self.world} process{'es' if self.world > 1 else ''}"
        start = f"resumed from step {self.state.step:,}" if resumed else "new run"
        root = self.checkpoint_root
        checkpoints = root if "://" in root else os.path.abspath(root)
        trackers = ", ".join(tracker_names(cfg)) or "none"
        return [
            f"PixelDiT training: {start}, {cfg.train.steps:,} steps",
            f"model       {cfg.model.name} (D={arch.hidden_size}, patch {arch.patch_size}): "
            f"{self.parameter_count / 1e6:.2f}M parameters{projector}",
            f"data        {cfg.data.source}: {manifest.num_samples:,} samples in {len(manifest.shards)} shards, "
            f"{cfg.data.image_size}px, {cfg.data.decoder} decoder",
            f"world       {processes} on {self.device.type}, strategy {self.strategy.name}, "
            f"{cfg.distributed.precision}",
            f"batch       {self.layout.describe()}",
            f"run dir     {os.path.abspath(self.run_dir)} (trackers: {trackers})",
            f"checkpoints {checkpoints} every {cfg.checkpoint.every_steps:,} steps",
        ]

    def fit(self, resume_from: str | None = None) -> TrainState:
        """Train to train.steps, resuming from `resume_from` or else the run's latest checkpoint."""
        previous = {}
        batches = self._batches()
        try:
            resumed = self.resume(resume_from)
            if self.already_complete:
                return self.state  # resume() said so; no banner, no epoch started
            self.monitor.start(self.state.step, self.banner(resumed))
            # only now: a stop asked for while the checkpoint loads would train a step and write a full
            # checkpoint of nothing new; until here Ctrl-C is Python's KeyboardInterrupt (abort, exit 130)
            # and SIGTERM ends the process, as during the set-up before fit()
            previous = {sig: signal.signal(sig, self._on_stop_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
            with exempt_setup_from_collection():
                while self.state.step < self.cfg.train.steps:
                    batch, t0 = next(batches)
                    t_data = time.perf_counter() - t0
                    metrics = self._step_naming_the_rank(batch)
                    metrics["data_time"], metrics["step_time"] = t_data, time.perf_counter() - t0
                    if self._after_step(metrics):
                        break
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.monitor.close()
            batches.close()  # the epoch's threads end before the loader closes their decode processes
            self.loader.close()  # a later fit() starts them again
        return self.state

    def _batches(self):
        """(batch, when the wait for it began), epoch after epoch."""
        data = iter(self.loader)
        try:
            while True:
                t0 = time.perf_counter()
                try:
                    batch = next(data)
                except StopIteration:
                    data = iter(self.loader)
                    batch = next(data)
                yield batch, t0
        finally:
            data.close()

    def _step_naming_the_rank(self, batch: dict) -> dict:
        try:
            return self.train_step(batch)
        except Exception as e:
            if self.world > 1:
                # gloo / NCCL errors name neither this rank nor the step; a note adds both to the
                # traceback and keeps the error's type and message
                e.add_note(f"rank {self.rank} of {self.world}: step {self.state.step + 1} failed; if a "
                           f"peer died or stopped answering, see distributed.timeout_s="
                           f"{self.cfg.distributed.timeout_s}")
            raise

    def _after_step(self, metrics: dict) -> bool:
        """Log, guard, then checkpoint, preview and evaluate on their cadence; True when the run stops here."""
        cfg, step = self.cfg, self.state.step
        self.state.history.append(metrics["loss"])
        self.monitor.step(self.state, metrics, self.loader, self.ema)
        if self.state.consecutive_skips >= cfg.logging.max_skipped_steps:
            raise TrainingDiverged(
                f"{self.state.consecutive_skips} consecutive steps had a non-finite loss or gradient norm "
                f"(last at step {step}); stopping with the last checkpoint intact: "
                f"{latest_checkpoint(self.checkpoint_root)}; lower the learning rate or the clip "
                f"(schedule.stages), or use distributed.precision=fp32, then run again to resume from it")
        if metrics["stop"]:
            self.save(stop=True)
            self.stopped_by = self.stop_signal or "a stop signal on another rank"
            if self.rank == 0:
                log.warning("stop requested (%s): saved step %d and exiting; the same command resumes "
                            "from it", self.stopped_by, step)
            return True
        last = step == cfg.train.steps
        if step % cfg.checkpoint.every_steps == 0 or last:
            self.save()
        every = cfg.logging.sample_every_steps
        if (every and step % every == 0) or last:
            self.last_preview = write_preview(preview_spec(cfg, self.run_dir, self.arch, self.device, self.rank),
                                              self.ema, step, self.monitor)
        if self.evaluator is not None and step % cfg.eval.every_steps == 0:
            self.last_eval = self.evaluator.run(self.ema, step, self.monitor)
        return False


def train(cfg, run_dir: str | None = None) -> TrainState:
    trainer = Trainer(cfg, run_dir)
    return trainer.fit()
