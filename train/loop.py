"""The training loop: accelerate, AdamW, warmup + constant/cosine, accumulation, clipping, EMA,
validation, checkpoints, metrics. Reads only the cache; writes only under run.output_dir."""
from __future__ import annotations

import contextlib
import itertools
import sys
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed

from shared.run_files import LORA_WEIGHTS, TrainingInfo
from shared.quiet import silence_progress_bars
from shared.render_tools import render_fields

from . import checkpoint as ckpt
from .activations import ActivationOffload
from .adapters import adapter_label
from .config import TrainConfig
from .batch import TrainBatch
from .build import build_model, flex_mask_wanted
from .data import (CacheStream, StreamPosition, open_cache, open_validation_cache, train_loader, usable_workers,
                   vae_facts, validation_batches)
from .mix import MixedPosition, MixedStream, check_alike, loss_weight, parse_sources
from .fsdp import autocast_forward, cast_inputs_on_recompute, keep_lora_dtypes, micro_batch_sync
from .launch import (LogWindow, StopRequest, TrainingInterrupted, check_launch, lr_factor, make_accelerator,
                     total_steps)
from .model import (EMA, base_identity, check_guidance, check_family_options, describe_base, load_lora_state_dict,
                    model_family, run_conventions, text_mode_change)
from .optim import InBackwardOptimizer, make_optimizer, step_groups
from .records import append_record, truncate_run_records
from .samples import TrainingSamples
from .references import check_reference_cache
from .step import (EmptyPrompt, StepSettings, ValidationNoise, summarize_validation, training_loss,
                   validation_sums)
from .trackers import start_trackers


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.run.output_dir)
        self.family = model_family(cfg.model)
        check_family_options(cfg, self.family)   # before anything is built or started
        self._start_runtime()
        self.lora = cfg.lora.rank > 0
        # Refuse a wrong cache or launch before building anything expensive.
        vae = self._open_caches()
        check_launch(cfg, self.accelerator.num_processes, self._fsdp)
        flex_mask = flex_mask_wanted(cfg, self.device, self.train_reader.text_mode)
        model, self.offloader = build_model(cfg, self.family, self.device, self.train_reader, fsdp=self._fsdp,
                                            flex_mask=flex_mask)
        self._check_base(model)
        self.settings = StepSettings.from_config(
            cfg.flow, self.family, vae, flex_mask=flex_mask,
            guidance=cfg.model.guidance if model.config.guidance_embeds else None)
        self.max_steps = total_steps(cfg, self.train_reader.num_rows, self.accelerator.num_processes)
        self._prepare(model)
        self._make_data_slots()
        self.step = 0
        self.empty = None
        if cfg.flow.guidance_dropout > 0:
            self.empty = EmptyPrompt(self.train_reader.empty_prompt(), self.family.text, self.device)
        self._val_batches = None
        # The fixed validation noise, drawn on the first pass and reused (the same values).
        self.val_noise = ValidationNoise(cfg.data.val_noise_cache_mb << 20)
        self.samples = TrainingSamples(self)   # run.sample_every 0: nothing loaded
        # On a CPU the "host" copies are host copies, as block swap's: the same logic, for tests.
        self.activation_offload = (ActivationOffload(devices=(self.device.type,)) if cfg.run.offload_activations
                                   else contextlib.nullcontext)

    def _start_runtime(self) -> None:
        """Determinism, the accelerator and its device, the global seed, the attention kernels."""
        run = self.cfg.run
        if not run.progress:
            silence_progress_bars()
        if run.deterministic:
            torch.use_deterministic_algorithms(True)
        self.accelerator = make_accelerator(run, self.out)
        self.device = self.accelerator.device
        # The global generators, the same on every rank: a LoRA adapter's init and stochastic rounding
        # draw from them (the step's own draws come from self.generators). Checkpoints save and restore them.
        set_seed(run.seed)
        if self.device.type == "cuda" and not run.cudnn_sdpa:
            torch.backends.cuda.enable_cudnn_sdp(False)

    def _open_caches(self) -> dict:
        """The training cache and the held-out one, checked against the config; returns the VAE's facts."""
        data = self.cfg.data
        self.sources = parse_sources(data.train_cache)   # one cache, or several mixed (mix.py)
        self.train_readers = [open_cache(s.cache, data.expected_text_mode, "training cache",
                                         latent_logvar=self.cfg.flow.latent == "sample",
                                         storage_options=data.storage_options, mask=self.cfg.flow.masked_loss)
                              for s in self.sources]
        check_alike(self.train_readers, self.sources)
        self.train_reader = self.train_readers[0]
        self.val_reader = None
        if data.val_cache:
            self.val_reader = open_validation_cache(data.val_cache, self.train_reader, data.storage_options)
        check_reference_cache(self.train_reader, self.family, self.cfg)
        return vae_facts(self.train_reader, f"training cache {self.sources[0].cache}")

    def _make_data_slots(self) -> None:
        """DataLoader workers, the stream position, and one noise generator per data slot."""
        cfg, acc = self.cfg, self.accelerator
        self.num_workers = min(usable_workers(r, cfg.data.num_workers, acc.num_processes) for r in self.train_readers)
        if self.num_workers < cfg.data.num_workers:
            acc.print(f"the training cache has too few row groups for data.num_workers {cfg.data.num_workers} "
                      f"per process: using {self.num_workers}")
        self.position = (StreamPosition(self.num_workers, acc.num_processes) if len(self.sources) == 1 else
                         MixedPosition(self.num_workers, acc.num_processes, len(self.sources)))
        # One noise generator per data slot (rank x DataLoader worker, data.py): a batch's draws follow the
        # slot it came from, so N processes draw what one process with N workers and N accumulation steps does.
        workers = max(1, self.num_workers)
        self.generators = [torch.Generator(device=self.device).manual_seed(
            cfg.run.seed * 1_000_003 + acc.process_index * workers + w) for w in range(workers)]

    @property
    def _fsdp(self) -> bool:
        from accelerate.utils import DistributedType
        return self.accelerator.distributed_type == DistributedType.FSDP

    def _check_base(self, model) -> None:
        """Say which base was loaded; refuse or warn about what does not fit it (model.guidance, the text mode)."""
        cfg = self.cfg
        self.base = base_identity(cfg.model, cfg.run.seed)
        self.accelerator.print(describe_base(self.base))
        check_guidance(cfg.model, model)
        change = text_mode_change(cfg.model, self.family, self.train_reader.text_mode, str(cfg.data.train_cache))
        if change:
            self.warn(change)

    def warn(self, message: str) -> None:
        if self.accelerator.is_main_process:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def _prepare(self, model) -> None:
        """The optimizer and LR schedule, accelerate's wrapping, and what checkpoints hold."""
        cfg, acc = self.cfg, self.accelerator
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        if cfg.optim.in_backward:
            optimizer = InBackwardOptimizer(params, lambda ps: make_optimizer(cfg.optim, ps, self.device),
                                            step_groups(named))
        else:
            optimizer = make_optimizer(cfg.optim, params, self.device)
        s = cfg.schedule
        # Not passed to prepare(): accelerate would step it once per process.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda k: lr_factor(k, s.warmup_steps, self.max_steps, s.kind, s.min_lr_ratio))
        # Under FSDP accelerate saves the model before the hooks run and the load hook sees no model:
        # its sharded checkpoint keeps the whole model, the frozen base's shards included.
        if self.lora and not self._fsdp:
            ckpt.register_lora_hooks(acc, load_lora_state_dict)
        # place() put the model where it trains (some blocks in host memory): accelerate must not move it.
        placement = None if self._fsdp else [False, True]
        if self._fsdp and self.lora:
            keep_lora_dtypes(acc)
        if cfg.optim.in_backward:   # its steps happen in the backward: nothing for accelerate to wrap
            self.model, self.optimizer = acc.prepare(model, device_placement=placement[:1]), optimizer
        else:
            self.model, self.optimizer = acc.prepare(model, optimizer, device_placement=placement)
        if self._fsdp and self.lora:
            autocast_forward(acc, self.model)
        cast_inputs_on_recompute(acc, self.family.blocks(acc.unwrap_model(self.model)), cfg.run.grad_checkpointing)
        acc.register_for_checkpointing(self.scheduler)
        self.ema = None
        if cfg.ema.decay > 0:   # from the parameters as they train: FSDP replaced them with sharded ones
            unwrapped = acc.unwrap_model(self.model)
            self.ema = EMA([(n, p) for n, p in unwrapped.named_parameters() if p.requires_grad], cfg.ema.decay)
            if not self._fsdp:   # under FSDP each rank saves its shards (_sharded_states)
                acc.register_for_checkpointing(self.ema)
        if cfg.optim.in_backward:
            acc.register_for_checkpointing(optimizer)
        # After prepare(): FSDP replaces the parameters with sharded ones.
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    # -- pieces -----------------------------------------------------------------------------
    def resume(self) -> None:
        path = ckpt.resolve_resume(self.cfg.run.resume, self.out)
        if path is None:
            if self.cfg.run.resume == "auto":
                self.accelerator.print("no checkpoint to resume from; starting at step 0")
            return
        self.step, rank_state = ckpt.load_checkpoint(self.accelerator, path, self.generators, self._sharded_states())
        self.position.load_state_dict(rank_state["data"])
        self.accelerator.print(f"resumed from {path} at step {self.step}")
        if self.accelerator.is_main_process:   # drop metrics the interrupted run logged after the checkpoint
            self._truncate_metrics(self.step)

    def _truncate_metrics(self, step: int) -> None:
        truncate_run_records(self.out, step)

    def log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            append_record(self.out, record)   # its timings apart, in timings.jsonl
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def validate(self) -> dict | None:
        if self.val_reader is None:
            return None
        acc = self.accelerator
        batches = self._validation_set()
        # Every rank must run the same number of forwards (FSDP gathers weights in each).
        most = int(acc.gather(torch.tensor([len(batches)], device=self.device)).max())
        sums = validation_sums(self.model, batches, self.settings, self.device, noise=self.val_noise)
        for _ in range(most - len(batches)):
            validation_sums(self.model, batches[:1] or self._any_batch(), self.settings, self.device,
                            noise=self.val_noise)
        return summarize_validation(acc.reduce(sums, reduction="sum"))

    def _validation_set(self) -> list:
        if self._val_batches is None:  # the held-out set is small: read it once, keep it on the host
            acc = self.accelerator
            self._val_batches = list(validation_batches(self.val_reader, self.cfg.data.val_batch_size,
                                                        acc.process_index, acc.num_processes,
                                                        self.cfg.data.val_max_samples))
        return self._val_batches

    def _start_outputs(self, batches):
        """Read what training needs first, then write config.json and open the logs: a run that fails
        before step 1 (a damaged cache, a refused data position, an unreadable held-out set) leaves
        no output behind. Returns the batches, the first one included."""
        first = next(batches)
        if self.val_reader is not None:
            self._validation_set()
        if self.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.atomic_write_json(self.out / "config.json", self.cfg.to_dict())
        start_trackers(self.accelerator, self.cfg, self.out / "logs")
        return itertools.chain([first], batches)

    def _any_batch(self) -> list:
        return list(validation_batches(self.val_reader, 1, 0, 1, 1))

    def settle(self) -> None:
        """Copies to host memory in flight are done: the weights read from here on are current."""
        if self.offloader is not None:
            self.offloader.synchronize()

    def save_final(self) -> Path | None:
        self.settle()
        return ckpt.save_final(self.accelerator, self.model, self.out, self.training_info(), self.lora, self.ema)

    def training_info(self) -> dict:
        """flux_prep.json: how the model trained so far must be sampled (final/ and each checkpoint hold it)."""
        m, cfg = self.train_reader.manifest, self.cfg
        text = self.family.text.settings(m)
        guidance_embeds = bool(self.accelerator.unwrap_model(self.model).config.guidance_embeds)
        conv = run_conventions(cfg, self.family, guidance_embeds)
        return TrainingInfo(
            family=self.family.name, text_mode=text["mode"], text_max_length=text["max_length"],
            shift_schedule=conv["shift_schedule"], default_steps=conv["default_steps"],
            guidance_dropout=cfg.flow.guidance_dropout, guidance_dropout_mode=cfg.flow.guidance_dropout_mode,
            latent=cfg.flow.latent, guidance_embeds=guidance_embeds,
            # what the sampler should default to: the guidance value trained with, the image size
            guidance=cfg.model.guidance if guidance_embeds else None,
            resolution=m.get("image", {}).get("resolution"),
            base_model=cfg.model.name, init=cfg.model.init, base=self.base,
            timestep_sampler=cfg.flow.sampler, steps_trained=self.step,
            lora={"rank": cfg.lora.rank, "alpha": cfg.lora.alpha or cfg.lora.rank, "adapter": ".",
                  "weights": LORA_WEIGHTS, "kind": adapter_label(cfg.lora)} if self.lora else None,
            train_cache=str(cfg.data.train_cache), ema_decay=cfg.ema.decay,
            **render_fields(text["mode"]),   # a trimmed-T5 model renders in flux-sample only
        ).to_dict()

    def save_checkpoint(self) -> Path:
        self.settle()
        return ckpt.save_checkpoint(self.accelerator, self.out, self.step, {"data": self.position.state_dict()},
                                    self.generators, self.cfg.run.keep_checkpoints, self._sharded_states(),
                                    info=self.training_info())

    def _sharded_states(self) -> dict:
        """What checkpoints hold as each rank's shards (torch.distributed.checkpoint): the EMA under FSDP."""
        return {"ema": self.ema.named_weights()} if self._fsdp and self.ema is not None else {}

    # -- the loop ---------------------------------------------------------------------------
    def train(self, stop_after_step: int | None = None, on_batch=None) -> dict:
        """Run to max_steps. `stop_after_step` ends early without final outputs, as a kill would;
        `on_batch(batch)` sees each batch consumed (tests record the keys). Ctrl-C stops at the end of
        the step under way with a checkpoint, raising TrainingInterrupted (StopRequest)."""
        with StopRequest(self.accelerator.is_main_process) as stop:
            return self._train(stop, stop_after_step, on_batch)

    def _train(self, stop: StopRequest, stop_after_step: int | None, on_batch) -> dict:
        run = self.cfg.run
        on_batch, seen = self._key_recorder(on_batch)
        self.resume()
        batches = self._start_outputs(self._batches())
        bar = self._progress_bar()
        summary: dict = {}
        if self.step == 0 and self.val_reader is not None and run.val_every:
            summary = self._log_validation()
        window = LogWindow(self.device)
        self.model.train()
        while self.step < self.max_steps:
            if stop.requested(self.accelerator):
                _close(bar)
                interrupted = self._interrupted()
                self.accelerator.end_training()   # the trackers' last records flushed
                raise interrupted
            grad_norm = self.train_step(batches, window, on_batch)
            if bar is not None:
                bar.update(1)
            if self.step % run.log_every == 0 or self.step == self.max_steps:
                summary.update(self._log_window(window, grad_norm, bar))
            if run.val_every and self.step % run.val_every == 0 and self.step != self.max_steps:
                summary.update(self._log_validation())
            if run.checkpoint_every and self.step % run.checkpoint_every == 0:
                self.save_checkpoint()
            self.samples.after_step(self.step)
            if stop_after_step is not None and self.step >= stop_after_step:
                _close(bar)
                return summary
        _close(bar)
        return self._finish(summary, seen)

    def _interrupted(self) -> TrainingInterrupted:
        """Between steps, on Ctrl-C: a checkpoint of this step unless one exists (or no step was taken)."""
        found = ckpt.checkpoint_dirs(self.out)
        if self.step == 0 or (found and found[-1].name == f"step-{self.step}"):
            return TrainingInterrupted(self.step, self.max_steps, found[-1] if found else None, saved=False)
        return TrainingInterrupted(self.step, self.max_steps, self.save_checkpoint(), saved=True)

    def train_step(self, batches, window: LogWindow, on_batch=None):
        """One optimizer step: run.grad_accum micro-batches, then clipping, the optimizer, the LR
        schedule and the EMA. Returns the gradient norm before clipping (None without clipping)."""
        cfg, accum = self.cfg, self.cfg.run.grad_accum
        for k in range(accum):
            batch = self._next_batch(batches, window, on_batch)
            loss = self.forward_backward_step(batch, last=k == accum - 1)
            window.loss_sum += loss.detach()
            window.micro += 1
        grad_norm = None
        if cfg.optim.grad_clip > 0:
            grad_norm = self.accelerator.clip_grad_norm_(self.params, cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema is not None and self.step % cfg.ema.every == 0:
            self.ema.update()
        return grad_norm

    def forward_backward_step(self, batch: TrainBatch, last: bool) -> torch.Tensor:
        """One micro-batch's loss and backward; gradients are synchronized on the `last` one only."""
        acc = self.accelerator
        with micro_batch_sync(acc, self.model, last):
            generator = self.generators[int(batch.pos[0])]   # the batch's DataLoader worker
            with self.activation_offload():
                loss = training_loss(self.model, batch, self.settings, generator, self.empty)
            if len(self.sources) > 1:
                loss = loss * loss_weight(batch, self.sources)
            acc.backward(loss / self.cfg.run.grad_accum)
        return loss

    def _next_batch(self, batches, window: LogWindow, on_batch) -> TrainBatch:
        """The next batch on the device, counted in the stream position and the log window."""
        t0 = time.perf_counter()
        batch = next(batches)
        window.wait += time.perf_counter() - t0
        self.position.consumed(batch)
        if on_batch is not None:
            on_batch(batch)
        window.images += len(batch.key)
        window.distinct += len(set(batch.key))
        return batch.to(self.device)

    def _batches(self):
        """The training stream from the current position, its shards' footers read before step 1
        (a damaged shard stops the run here)."""
        cfg, acc = self.cfg, self.accelerator
        position = self.position.state_dict() if self.position.workers else None
        streams = [CacheStream(s.cache, batch_size=cfg.data.batch_size, seed=cfg.run.seed,
                               rank=acc.process_index, world_size=acc.num_processes,
                               shuffle_buffer=cfg.data.shuffle_buffer, expected_text_mode=cfg.data.expected_text_mode,
                               position=position, latent_logvar=cfg.flow.latent == "sample",
                               storage_options=cfg.data.storage_options, mask=cfg.flow.masked_loss)
                   for s in self.sources]
        for s in streams:
            s.row_groups()
        stream = streams[0] if len(streams) == 1 else MixedStream(streams, [s.weight for s in self.sources], position)
        loader = train_loader(stream, self.num_workers, pin_memory=self.device.type == "cuda",
                              prefetch_factor=cfg.data.prefetch_factor)
        return iter(loader)

    def _key_recorder(self, on_batch):
        """With run.record_keys, `on_batch` also appends each batch's keys to the list returned."""
        seen: list[str] = []
        if not self.cfg.run.record_keys:
            return on_batch, seen

        def record(batch):
            seen.extend(batch.key)
            if on_batch is not None:
                on_batch(batch)
        return record, seen

    def _progress_bar(self):
        if not (self.cfg.run.progress and self.accelerator.is_main_process):
            return None
        from tqdm.auto import tqdm
        return tqdm(total=self.max_steps, initial=self.step, desc="train", dynamic_ncols=True)

    def _log_window(self, window: LogWindow, grad_norm, bar) -> dict:
        """Write the metrics record of the steps since the last one, and start a new window."""
        acc = self.accelerator
        mean_loss = (acc.reduce(window.loss_sum, reduction="mean") / window.micro).item()   # the one host sync
        elapsed = time.perf_counter() - window.start
        record = {"step": self.step, "loss": mean_loss, "lr": float(self.scheduler.get_last_lr()[0]),
                  "images_per_s": window.images * acc.num_processes / elapsed,
                  "data_wait": window.wait / elapsed, "epoch": self.position.epoch,
                  "samples": self.position.samples * acc.num_processes, **self._batch_fill(window)}
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        self.log(record)
        if bar is not None:
            bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{record['images_per_s']:.1f}")
        window.reset()
        return record

    def _batch_fill(self, window: LogWindow) -> dict:
        """The effective batch: samples per optimizer step (data.batch_size x run.grad_accum x processes),
        and how many of them were distinct (fewer where a bucket's last batch of an epoch repeats its own:
        many small buckets)."""
        steps = window.micro / self.cfg.run.grad_accum
        n = self.accelerator.num_processes
        return {"samples_per_step": window.images * n / steps, "distinct_per_step": window.distinct * n / steps}

    def _finish(self, summary: dict, seen: list[str]) -> dict:
        """The last validation, the recorded keys, final/, and the trackers closed."""
        summary.update(self._log_validation())
        if self.cfg.run.record_keys:
            self._record(seen)
        final = self.save_final() if self.cfg.run.save_final else None
        self.accelerator.end_training()
        summary["final"] = str(final) if final else None
        return summary

    def _record(self, seen: list[str]) -> None:
        """This rank's consumed keys and a hash of its weights (ranks must agree on the weights)."""
        import hashlib
        from torch.distributed.tensor import DTensor
        self.settle()
        h = hashlib.sha256()
        for name, t in sorted(self.accelerator.unwrap_model(self.model).state_dict().items()):
            if isinstance(t, DTensor):   # FSDP: this rank's shard; all ranks gather each whole tensor in turn
                t = t.full_tensor()
            h.update(name.encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
        folder = self.out / "seen"
        folder.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_json(folder / f"rank{self.accelerator.process_index}.json",
                               {"keys": seen, "weights_sha256": h.hexdigest(), "step": self.step})

    def _log_validation(self) -> dict:
        self.model.eval()
        result = self.validate()
        self.model.train()
        if result is None:
            return {}
        self.log({"step": self.step, **result})
        self.accelerator.print(f"step {self.step}: validation loss {result['val/loss']:.5f}")
        return result


def _close(bar) -> None:
    if bar is not None:
        bar.close()


def train(cfg: TrainConfig, stop_after_step: int | None = None, on_batch=None) -> dict:
    return Trainer(cfg).train(stop_after_step=stop_after_step, on_batch=on_batch)
