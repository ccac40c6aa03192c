"""Throughput at every logging step of every stage: tokens/s, MFU, ETA, peak GPU memory, tokens seen.

ThroughputCallback adds to the `logs` of each training log (so the console, trainer_state.json's log_history and
every `report_to` integration get them), over the logging window since the previous log, not the run's mean:

- `tokens_per_second`: real tokens of all ranks per second; `tokens_per_second_per_device`: that / world size;
- `mfu`: model FLOP/s per device / the device's peak (absent on CPU, unless `peak_tflops` gives a peak);
- `eta_seconds`: steps left x this window's seconds per step (the console line says it as "1h02m");
- `peak_gpu_memory_gib`: the most memory allocated on any rank since the previous log (GPU only; the peak is reset
  after each read);
- `tokens_seen`: real tokens of all ranks since the start of the run, kept in checkpoints across a resume;
- GRPO, which generates between its training steps: `tokens_per_second` and MFU are over the training time only
  (the window less the time in `model.generate`), `generation_tokens_per_second_per_device` the positions generated
  per second of generation on this rank, `generation_time_fraction` the window's share spent generating. Training
  FLOPs only: generation FLOPs are not in the MFU.

Counting tokens. The Trainer's own counter (`include_num_input_tokens_seen`, transformers 5.24
`Trainer._track_num_input_tokens`) is not used. Its "non_padding" mode sums `attention_mask` whenever the batch has
one: right for DPO's and unpacked SFT's 2D masks, wrong for the 4D block-diagonal mask that PT `packing: document`
and SFT `packing` / `padding_free` get on sdpa or eager attention (utils/packing.py), where it counts T x T
attention entries per row (TRL's own `num_tokens` log has that flaw: 95,020 for 1,139 real tokens on the demo SFT
with `padding_free`). That mode cannot even be chosen here: HfArgumentParser types the `str | bool` field as a
bool, so TrlParser refuses the word in a recipe and on the command line alike, and "all" (what `true` means)
counts padding. And the Trainer gathers the count to the host after every micro-batch, a GPU sync. Instead a
forward pre-hook on the model counts each training forward (training mode with gradients: evaluation and DPO's
reference forward are left out) on the device, without a sync, by one rule for every stage's batches:
- a 2D `attention_mask` (PT `packing: none`, SFT unpacked, DPO's chosen + rejected rows): its ones;
- else `position_ids` (packed rows, documents told apart by positions restarting at 0; any 4D mask is built from
  them): every position (TRL's `pad_to_multiple_of`, off by default, would add its few pad positions);
- else (PT `concat` blocks, no padding): every input token.
The ranks add their counts with one all-reduce of two numbers per optimizer step (as SigtermCallback does), so a
checkpoint, which can be written at any step, holds the exact total.

MFU = tokens/s per device x FLOPs per token / peak FLOP/s, with FLOPs per token = 6·N + 12·L·H·S (forward and
backward): N = every parameter, embeddings included (the 1B and tiny models tie the embedding to the output head,
which makes it one matmul of the head), L layers, H hidden size, S the attention length. The head's share, 6·V·H,
counts only the positions it projects: every position in PT (the loss needs them all), only the labelled ones
where TRL's fused head runs (SFT, DPO and GRPO call the model with `fused_lm_head=True`: the prompt and padding
positions are never projected), counted by the same hook. Attention is included: S
is each token's sequence (document, in packed rows) length, averaged over the window's tokens (sum n^2 / sum n),
and causal masking is not subtracted. A DPO step that runs the reference model (`precompute_ref_log_probs:
false`) adds its forward, 2·N + 4·L·H·S. Activation checkpointing's recomputation is not counted (MFU, not
hardware FLOPs utilisation), and 6·N overstates LoRA, whose frozen weights get no weight gradient. Padding costs
compute but is not counted: this is the useful work's utilisation. Peak: bf16 dense TFLOP/s by GPU name
(PEAK_TFLOPS; fp16 for the T4 and V100, which have no bf16), or `peak_tflops` for a GPU the table lacks.
"""

from dataclasses import dataclass, field


# bf16 dense peak TFLOP/s per GPU, by a part of its name (the longest part found in the name wins: "H100 PCIe"
# before "H100"). The T4 and V100 have no bf16: their fp16 peak, which bf16 falls back to (utils/modeling.py).
PEAK_TFLOPS = {"H100": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H800": 989.0, "H200": 989.0, "A100": 312.0,
               "A800": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0, "3090": 71.0, "V100": 125.0, "T4": 65.0}


@dataclass
class ThroughputArguments:
    peak_tflops: float | None = field(default=None, metadata={
        "help": "peak TFLOP/s of one device for the logged MFU; default: the bf16 dense peak of a known GPU "
                "(utils/throughput.py PEAK_TFLOPS), none (no MFU) for other GPUs and on CPU"})


def peak_flops(device_name: str) -> float | None:
    known = [key for key in PEAK_TFLOPS if key in device_name]
    return PEAK_TFLOPS[max(known, key=len)] * 1e12 if known else None


def flops_per_token(config, parameters: int, seq_len: float, reference_forward: bool = False,
                    head_fraction: float = 1.0) -> float:
    """Training FLOPs per token (see the module docstring): the backward costs twice the forward. `head_fraction`:
    the share of positions the LM head projects (TRL's fused head in SFT, DPO and GRPO projects only the labelled
    ones; PT's loss projects every position)."""
    head = config.vocab_size * config.hidden_size
    forward = 2 * (parameters - head) + 2 * head * head_fraction + 4 * config.num_hidden_layers * config.hidden_size * seq_len
    return (4 if reference_forward else 3) * forward


def batch_token_counts(inputs: dict):
    """(real tokens, sum of squared sequence lengths) of one model input, as tensors or ints (no host sync)."""
    input_ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        lengths = mask.sum(-1)
        return lengths.sum(), (lengths * lengths).sum()
    positions = inputs.get("position_ids")
    if positions is not None:
        # A document of n tokens holds positions 0..n-1, whose (position + 1) add up to n(n + 1) / 2.
        return positions.numel(), 2 * (positions + 1).sum() - positions.numel()
    rows, length = input_ids.shape
    return input_ids.numel(), rows * length * length


def human_duration(seconds: float) -> str:
    """1h02m, 12m05s, 45s; 2d03h beyond a day."""
    seconds = int(seconds)
    days, hours, minutes = seconds // 86400, seconds // 3600 % 24, seconds // 60 % 60
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds % 60:02d}s" if minutes else f"{seconds}s"


def human_count(value: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}"


