"""Trainer callbacks every stage uses: loss curves, a clean stop on SIGTERM."""

import logging
import signal

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
    """On SIGTERM (a scheduler's pre-emption, `kill`), finish the current step, save a checkpoint, then stop."""

    def __init__(self):
        self.received = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logger.warning("SIGTERM received: saving a checkpoint after this step, then stopping")
        self.received = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.received:
            control.should_save = True
            control.should_training_stop = True
        return control
