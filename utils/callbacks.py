"""Trainer callbacks every stage uses: loss curves, a clean stop on SIGTERM."""

import logging
import signal

import torch
from transformers import TrainerCallback

from utils.plot_loss import plot_runs

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
