"""Muon for the hidden matrices, AdamW for everything else: `--use_muon true` on every stage.

Muon (torch.optim.Muon) orthogonalises each 2-D weight's momentum update with Newton-Schulz iterations, which is
meant for the hidden matrices: attention's q/k/v/o and the MLP's gate/up/down projections. The embedding (and the LM
head tied to it), the norms and the biases keep AdamW. The groups and their learning rates:
- Muon: every 2-D weight inside the decoder layers, at `muon_lr` (default 0.02, Keller Jordan's and nanochat's
  matrix rate) with `weight_decay`; each orthogonalised update is scaled by sqrt(max(1, rows / columns)), the
  original Muon's rule. DeepSpeed's Muon applies exactly this rule, so one `muon_lr` means the same step on one GPU,
  under DDP and under ZeRO-1/2 (tests/test_multiprocess.py compares the runs). Moonshot's alternative (0.2 x
  sqrt(max(rows, columns)), to reuse AdamW's rate) is not available in DeepSpeed, and its ratio to this rule differs
  by matrix shape, so no single DeepSpeed setting could reproduce it;
- AdamW: the embedding at `learning_rate` with `weight_decay`; norms and biases at `learning_rate` without weight
  decay (the Trainer's own rule), with the recipe's adam_beta1/2 and epsilon.
The schedule (warmup, cosine or WSD) scales both rates by the same factor: each group follows it from its own start.

Under DeepSpeed, ZeRO-1/2 hand the optimizer flat partitions, which Muon cannot orthogonalise: there Muon must be
DeepSpeed's own ("optimizer": {"type": "Muon"} in the DeepSpeed config, configs/ds_zero2_muon.json), which reads
the `use_muon` flag this module sets on each parameter. Refused there, each with its reason:
- ZeRO stage 0 (DeepSpeed's Muon then runs without orthogonalisation, silently: DeepSpeed issue 8441) and stage 3;
- gradient clipping: DeepSpeed clips after orthogonalising, so a max_grad_norm of 1.0 scaled the tiny model's
  steps down 28x (the logged grad_norm there is the norm of the updates, 28 against 1.4 for the gradients).
With --max_grad_norm 0, two ranks under DDP and under ZeRO-2 give the same losses to 1e-5 on CPU.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from utils.errors import ConfigError


@dataclass
class MuonArguments:
    use_muon: bool = field(default=False, metadata={
        "help": "Muon for the decoder's 2-D weights, AdamW for embeddings, norms and biases (utils/muon.py)"})
    muon_lr: float = field(default=0.02, metadata={
        "help": "--use_muon: the hidden matrices' learning rate (the schedule scales it as it scales learning_rate)"})
    muon_momentum: float = field(default=0.95, metadata={"help": "Muon's momentum"})


def is_hidden_matrix(name: str, param: torch.Tensor) -> bool:
    return param.ndim == 2 and ".layers." in f".{name}"


class _BothStates(Mapping):
    """The two optimizers' per-parameter states as one read-only mapping (a ChainMap would create empty entries:
    each state is a defaultdict)."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    def __getitem__(self, param):
        for optimizer in self.optimizers:
            if param in optimizer.state:
                return optimizer.state[param]
        raise KeyError(param)

    def __iter__(self):
        return (param for optimizer in self.optimizers for param in optimizer.state)

    def __len__(self):
        return sum(len(optimizer.state) for optimizer in self.optimizers)


class MuonWithAdamW(torch.optim.Optimizer):
    """One optimizer for the Trainer (its scheduler, clipping, checkpoints) over two: torch's Muon and AdamW, whose
    param_groups are this optimizer's own (the same dicts), so the scheduler's learning rate reaches both."""

    def __init__(self, model, lr: float, muon_lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 momentum: float = 0.95):
        hidden, embedding, no_decay = [], [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if is_hidden_matrix(name, param):
                hidden.append(param)
            elif param.ndim == 2:
                embedding.append(param)
            else:
                no_decay.append(param)
        self.muon = torch.optim.Muon([{"params": hidden, "optimizer": "muon"}], lr=muon_lr, weight_decay=weight_decay,
                                     momentum=momentum, adjust_lr_fn="original")
        self.adamw = torch.optim.AdamW(
            [{"params": embedding, "weight_decay": weight_decay, "optimizer": "adamw"},
             {"params": no_decay, "weight_decay": 0.0, "optimizer": "adamw"}], lr=lr, betas=betas, eps=eps)
        super().__init__(self._inner_groups(), {"lr": lr})  # the groups keep their own rates
        self.state = _BothStates(self.muon, self.adamw)

    def _inner_groups(self) -> list[dict]:
        return [group for group in (*self.muon.param_groups, *self.adamw.param_groups) if group["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.muon.step()
        self.adamw.step()
        return loss

    def state_dict(self):
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict):
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self.param_groups = self._inner_groups()  # loading replaced their group dicts: share the new ones


class MuonWithAdamWFactory:
    """transformers' optimizer factory protocol (Trainer.create_optimizer): made, then called with the model."""

    def __call__(self, model, **kwargs) -> MuonWithAdamW:
        return MuonWithAdamW(model, **kwargs)


def muon_optimizer(trainer, muon_args: MuonArguments) -> None:
    """Puts Muon in the trainer before it builds its optimizer (single process and DDP), or checks that DeepSpeed
    builds its own Muon, at a ZeRO stage where it works, with this run's Muon settings."""
    if not muon_args.use_muon:
        return
    args = trainer.args
    if trainer.optimizer_cls_and_kwargs is not None:
        raise ConfigError("--use_muon replaces the optimizer, and this run already has its own (--stochastic_rounding"
                          "'s AdamW): choose one")
    for name, param in trainer.model.named_parameters():
        param.use_muon = is_hidden_matrix(name, param)  # what DeepSpeed's Muon reads
    if trainer.is_deepspeed_enabled:
        plugin = trainer.accelerator.state.deepspeed_plugin
        optimizer = (plugin.deepspeed_config.get("optimizer") or {}).get("type", "")
        if optimizer.lower() != "muon":
            raise ConfigError("--use_muon under DeepSpeed needs DeepSpeed's own Muon (ZeRO partitions are flat, torch's "
                              "Muon cannot orthogonalise them): use a DeepSpeed config with \"optimizer\": {\"type\": "
                              "\"Muon\"}, e.g. configs/ds_zero2_muon.json")
        if plugin.zero_stage not in (1, 2):
            raise ConfigError(f"DeepSpeed's Muon at ZeRO stage {plugin.zero_stage}: "
                              + ("it would run without orthogonalisation, silently (DeepSpeed issue 8441)"
                                 if plugin.zero_stage == 0 else "not supported by DeepSpeed")
                              + "; use stage 1 or 2 (configs/ds_zero2_muon.json)")
        if args.max_grad_norm:
            raise ConfigError(f"--max_grad_norm {args.max_grad_norm} with DeepSpeed's Muon: DeepSpeed clips after it "
                              "has orthogonalised the matrices' gradients, so the clip would shrink every Muon step "
                              "(and AdamW's with it) by the norm of those updates, about sqrt(width) per matrix; use "
                              "--max_grad_norm 0 (an orthogonalised update has a fixed size anyway)")
        fill_deepspeed_muon(plugin.deepspeed_config, muon_args)
        return
    trainer.optimizer_cls_and_kwargs = (MuonWithAdamWFactory, {
        "lr": args.learning_rate, "muon_lr": muon_args.muon_lr, "weight_decay": args.weight_decay, "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon, "momentum": muon_args.muon_momentum})


def fill_deepspeed_muon(config: dict, muon_args: MuonArguments) -> None:
    """The DeepSpeed config's Muon settings from this run's flags: "auto" is filled, and a number that differs from
    the flag is refused (transformers fills "auto" only for the settings it knows, lr, betas, eps, weight_decay)."""
    params = config["optimizer"].setdefault("params", {})
    for key, flag, value in (("muon_lr", "muon_lr", muon_args.muon_lr),
                             ("momentum", "muon_momentum", muon_args.muon_momentum)):
        given = params.get(key, "auto")
        if given == "auto":
            params[key] = value
        elif float(given) != value:
            raise ConfigError(f"the DeepSpeed config sets Muon's {key} to {given} and this run's --{flag} is {value}: "
                              "set it to \"auto\" there, so that the flag decides")
