"""Every Trainer callback of the stages (utils.training.stage_callbacks puts them together): loss curves, a clean
stop on SIGTERM, checkpoint completion markers, the anomaly stop (utils.crash_safety says how it works) and the
throughput log (utils.throughput says what it counts and how)."""

import json
import logging
import math
import signal
import statistics
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from utils.checkpoint import COMPLETE_MARKER, batch_geometry, checkpoint_files, complete_checkpoints
from utils.crash_safety import CrashSafetyArguments, global_batch
from utils.disk import warn_if_low
from utils.plots import plot_runs
from utils.throughput import batch_token_counts, flops_per_token, human_count, human_duration, peak_flops

logger = logging.getLogger("mini_qwen")


class LossPlotCallback(TrainerCallback):
    """Draws the logged curves to <output_dir>/loss.png at every save and at the end (main process only)."""

    def __init__(self, keys=("loss", "grad_norm", "learning_rate")):
        self.keys = keys

    def _plot(self, args, state):
        if state.is_world_process_zero and state.log_history:
            plot_runs({args.output_dir: state.log_history}, f"{args.output_dir}/loss.png", self.keys,
                      title=args.run_name or "")

    def on_save(self, args, state, control, **kwargs):
        self._plot(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        self._plot(args, state)


def first_moment(optimizer) -> torch.Tensor | None:
    """One optimizer state tensor (AdamW's exp_avg, Muon's momentum), read locally. Under DeepSpeed the state lives
    on flat partitions, keyed by whichever optimizer the config names (Muon's matrices have no exp_avg), so the
    innermost optimizer's own state is read rather than one parameter's by name."""
    while hasattr(optimizer, "optimizer"):  # accelerate's wrapper, then DeepSpeed's ZeRO optimizer
        optimizer = optimizer.optimizer
    return next((value for state in optimizer.state.values() for value in state.values()
                 if torch.is_tensor(value) and value.ndim), None)


class PrecisionCallback(TrainerCallback):
    """Logs, once, after the first optimizer step, the dtypes the run really holds: the module's weights, the master
    weights the optimizer updates, and the optimizer's moments. Read then, not at launch: DeepSpeed casts the module
    to bf16 when it builds its engine inside train(), and optimizers create their moments at the first step."""

    def __init__(self):
        self.logged = False

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.logged or model is None or optimizer is None:
            return
        self.logged = True
        param = next(p for p in model.parameters() if p.requires_grad)
        if args.deepspeed_plugin is not None:
            from deepspeed.utils import safe_get_full_fp32_param

            master = safe_get_full_fp32_param(param)  # a collective: every rank calls it; it gathers one parameter
        else:
            master = param
        moment = first_moment(optimizer)
        def name(tensor):
            return str(tensor.dtype).replace("torch.", "") if tensor is not None else "none"
        if state.is_world_process_zero:
            logger.info("precision held: module weights %s, master weights %s, optimizer moments %s",
                        name(param), name(master), name(moment))


class SigtermCallback(TrainerCallback):
    """On SIGTERM (a scheduler's pre-emption, `kill`, a launcher passing it on), finish the current step, save a
    checkpoint, then stop.

    With several ranks the signal reaches each at a slightly different moment: one rank may see it at the end of
    step N while another has already gone on to step N + 1, and they would then wait for each other forever (one
    in the checkpoint's barrier, one in the gradient all-reduce). So the ranks agree at every step end, with a
    one-number all-reduce (microseconds next to a step), and all stop after the same step."""

    def __init__(self):
        self.received = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logger.warning("SIGTERM received: saving a checkpoint after this step, then stopping")
        self.received = True

    def _any_rank_received(self, args) -> bool:
        if args.world_size == 1 or not torch.distributed.is_initialized():
            return self.received
        flag = torch.tensor([int(self.received)], device=args.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_rank_received(args):
            self.received = True
            control.should_save = True
            control.should_training_stop = True
        return control


class CheckpointCompleteCallback(TrainerCallback):
    """Marks a checkpoint folder complete once the Trainer has written all of it (weights, optimizer, scheduler,
    RNG state, trainer_state.json). A crash while saving leaves no marker, so `auto` resume skips that folder.
    The marker records the batch geometry, which a resume checks (check_resumable), and every file's size and
    hash, which a resume verifies (utils.checkpoint.checkpoint_problem).

    Each rank writes its own files (rng_state_<rank>.pth, its ZeRO partition) and the Trainer does not wait for
    the others before this call: all ranks meet in a barrier first, so the list rank 0 makes holds every rank's
    files. The marker is written under another name and renamed, so it is never seen half-written."""

    def on_save(self, args, state, control, **kwargs):
        if args.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                marker = {"step": state.global_step, **batch_geometry(args), "files": checkpoint_files(folder)}
                partial = folder / f"{COMPLETE_MARKER}.partial"
                partial.write_text(json.dumps(marker, indent=1) + "\n")
                partial.replace(folder / COMPLETE_MARKER)
                warn_if_low(args.output_dir, sum(entry["bytes"] for entry in marker["files"].values()))


class AnomalyGuard(TrainerCallback):
    def __init__(self, crash_args: CrashSafetyArguments):
        self.factor = crash_args.anomaly_factor
        self.window = crash_args.anomaly_window
        self.min_history = crash_args.anomaly_min_history
        self.history: list[float] = []
        self.tripped: dict | None = None

    def _problem(self, loss: float) -> str | None:
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if self.factor and len(self.history) >= self.min_history:
            median = statistics.median(self.history[-self.window:])
            # A ratio rule needs a positive scale: a loss around 0 (GRPO's policy loss) has none.
            if median > 0 and loss > self.factor * median:
                return f"loss {loss:.4g} is over {self.factor} x the running median {median:.4g}"
        return None

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        loss = logs.get("loss")
        if loss is None or self.tripped:
            return control
        # The Trainer replaces a NaN loss in its logs by the running mean unless logging_nan_inf_filter is off;
        # the gradient norm is never filtered, so a NaN step shows there either way.
        grad_norm = logs.get("grad_norm")
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            problem = f"gradient norm is {grad_norm}"
        else:
            problem = self._problem(float(loss))
        if problem is None:
            self.history.append(float(loss))
            return control
        checkpoints = complete_checkpoints(args.output_dir)
        last_good_step = int(checkpoints[-1].name.split("-")[1]) if checkpoints else 0
        start, end = last_good_step * global_batch(args), state.global_step * global_batch(args)
        self.tripped = {
            "problem": problem, "step": state.global_step,
            "last_good_checkpoint": str(checkpoints[-1]) if checkpoints else None,
            "skip_samples": f"{start}:{end}",
        }
        control.should_training_stop = True
        control.should_save = False
        if state.is_world_process_zero:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.output_dir) / "anomaly.json").write_text(json.dumps(self.tripped, indent=2) + "\n")
            logger.error(
                "stopping at step %d: %s. Last good checkpoint: %s. Samples since it: %d-%d in training order. "
                "Resume without them: --resume_from_checkpoint auto --skip_samples %d:%d",
                state.global_step, problem, self.tripped["last_good_checkpoint"] or "none (start over)",
                start, end, start, end)
        return control


class ThroughputCallback(TrainerCallback, ExportableState):
    """See the module docstring. It must come before the reporting integrations in the Trainer's callback list
    (utils.training.before_training puts it first): they read `logs` in the same on_log call."""

    def __init__(self, peak_tflops: float | None = None):
        self.peak_tflops = peak_tflops
        self.tokens_seen = 0  # all ranks, up to the previous log
        self._generation = [0.0, 0]  # seconds in model.generate, positions generated, since the last log

    def state(self) -> dict:
        unlogged = int(self._window[0]) if getattr(self, "_window", None) is not None else 0
        return {"args": {"peak_tflops": self.peak_tflops}, "attributes": {"tokens_seen": self.tokens_seen + unlogged}}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        saved = state.stateful_callbacks.get(type(self).__name__, {})
        self.tokens_seen = saved.get("attributes", {}).get("tokens_seen", 0)  # a resumed run's checkpoint
        self.config = model.config
        self.parameters = sum(p.numel() for p in model.parameters())
        self.reference_forward = getattr(args, "precompute_ref_log_probs", True) is False  # DPOConfig only
        self.on_gpu = args.device.type == "cuda"
        self.peak = self.peak_tflops * 1e12 if self.peak_tflops else (
            peak_flops(torch.cuda.get_device_name(args.device)) if self.on_gpu else None)
        self.distributed = args.world_size > 1 and torch.distributed.is_initialized()
        # [tokens, sum of squared sequence lengths, positions the LM head projects]: this rank's since the step
        # began, all ranks' since the last log
        self._step = torch.zeros(3, dtype=torch.int64, device=args.device)
        self._window = torch.zeros(3, dtype=torch.int64, device=args.device)
        self._window_start, self._window_step = time.perf_counter(), state.global_step
        if self.on_gpu:
            torch.cuda.reset_peak_memory_stats(args.device)
        self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)
        # GRPO generates between training steps: its generation is timed apart, so that training throughput and MFU
        # are over training time and generation gets its own tokens/s (this rank's; generation is not all-reduced)
        self._model, original_generate = model, getattr(model, "generate", None)
        if original_generate is None:  # a reward model (sequence classifier) never generates
            return

        def timed_generate(*args, **kwargs):
            started = time.perf_counter()
            output = original_generate(*args, **kwargs)
            prompt = kwargs.get("input_ids", args[0] if args else None)
            sequences = getattr(output, "sequences", output)
            if torch.is_tensor(prompt) and torch.is_tensor(sequences):
                self._generation[1] += sequences.numel() - prompt.numel()
            self._generation[0] += time.perf_counter() - started
            return output

        model.generate = timed_generate

    def _count(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled() and kwargs.get("input_ids") is not None:
            tokens, squared_lengths = batch_token_counts(kwargs)
            self._step[0] += tokens
            self._step[1] += squared_lengths
            labels = kwargs.get("labels")
            # TRL's fused head projects only the positions with a label (see utils/throughput.py)
            self._step[2] += (labels != -100).sum() if kwargs.get("fused_lm_head") and labels is not None else tokens

    def on_step_end(self, args, state, control, **kwargs):
        if self.distributed:
            torch.distributed.all_reduce(self._step)
        self._window += self._step
        self._step.zero_()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" not in logs:  # the end-of-training summary, evaluation (also before training starts)
            return
        steps = state.global_step - self._window_step
        if steps <= 0:
            return
        seconds = time.perf_counter() - self._window_start
        generation_seconds, generated = self._generation
        training_seconds = max(seconds - generation_seconds, 1e-9)
        tokens, squared_lengths, head_positions = self._window.tolist()
        self.tokens_seen += tokens
        throughput = {"tokens_per_second": round(tokens / training_seconds, 1),
                      "tokens_per_second_per_device": round(tokens / training_seconds / args.world_size, 1),
                      # never negative, even at a step past max_steps
                      "eta_seconds": round(max(state.max_steps - state.global_step, 0) * seconds / steps),
                      "tokens_seen": self.tokens_seen}
        if generated:
            throughput["generation_tokens_per_second_per_device"] = round(generated / generation_seconds, 1)
            throughput["generation_time_fraction"] = round(generation_seconds / seconds, 3)
        if self.peak and tokens:
            flops = flops_per_token(self.config, self.parameters, squared_lengths / tokens, self.reference_forward,
                                    head_positions / tokens)
            throughput["mfu"] = round(throughput["tokens_per_second_per_device"] * flops / self.peak, 4)
        if self.on_gpu:
            peak_memory = torch.tensor([torch.cuda.max_memory_allocated(args.device)], device=args.device)
            if self.distributed:
                torch.distributed.all_reduce(peak_memory, op=torch.distributed.ReduceOp.MAX)
            throughput["peak_gpu_memory_gib"] = round(peak_memory.item() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats(args.device)
        logs.update(throughput)
        state.log_history[-1].update(throughput)  # the Trainer appended this log before calling on_log
        if state.is_world_process_zero:
            generation = (f", generation {human_count(throughput['generation_tokens_per_second_per_device'])} "
                          f"tokens/s per device ({throughput['generation_time_fraction']:.0%} of the time)"
                          if generated else "")
            logger.info("step %d/%d: %s tokens/s (%s per device)%s%s%s, %s tokens seen, ETA %s", state.global_step,
                        state.max_steps, human_count(throughput["tokens_per_second"]),
                        human_count(throughput["tokens_per_second_per_device"]), generation,
                        f", MFU {throughput['mfu']:.1%}" if "mfu" in throughput else "",
                        f", peak {throughput['peak_gpu_memory_gib']} GiB" if self.on_gpu else "",
                        human_count(self.tokens_seen), human_duration(throughput["eta_seconds"]))
        self._window.zero_()
        self._generation = [0.0, 0]
        self._window_start, self._window_step = time.perf_counter(), state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        self._hook.remove()
        if "generate" in vars(self._model):
            del self._model.generate  # the class's own again
