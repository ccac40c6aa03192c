"""On a CPU, TRL's fused LM head projects only the labelled positions once the stages switch it to (utils.modeling
.score_only_labelled_positions_on_cpu), and gives the same log-probabilities and gradients as scoring them all."""

import torch
import trl.trainer.utils as trl_utils
from transformers import AutoModelForCausalLM

from conftest import TINY_CONFIG
from utils.modeling import load_model_config, score_only_labelled_positions_on_cpu


def fused_forward_backward(model, batch, projected_rows: list[int]):
    model.zero_grad(set_to_none=True)
    output = model(**batch, fused_lm_head=True)
    output.loss.backward()
    return output.log_probs.detach(), output.loss.detach(), {
        name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_labelled_positions_only_same_log_probs_and_gradients(monkeypatch):
    # TRL's own switch, even where a stage in this process has already replaced it; restored after the test
    monkeypatch.setattr(trl_utils, "_use_triton", getattr(trl_utils._use_triton, "original", trl_utils._use_triton))
    projected_rows = []
    original_apply = trl_utils._ChunkedLogProbFunction.apply

    def recording_apply(hidden, *args):
        projected_rows.append(hidden.shape[0])
        return original_apply(hidden, *args)

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", recording_apply)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(load_model_config(TINY_CONFIG), attn_implementation="eager")
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    input_ids = torch.randint(0, 151_643, (2, 24))
    labels = input_ids.clone()
    labels[:, :15] = -100  # a prompt: no loss on it
    labels[1, 20:] = -100  # and padding at the end of the second row
    batch = {"input_ids": input_ids, "attention_mask": (labels != -100) | (torch.arange(24) < 15), "labels": labels}

    every_position = fused_forward_backward(model, batch, projected_rows)
    score_only_labelled_positions_on_cpu()
    labelled_only = fused_forward_backward(model, batch, projected_rows)

    assert projected_rows == [2 * 23, int((labels[:, 1:] != -100).sum())]  # 46 rows, then the 14 with labels
    assert torch.allclose(every_position[0], labelled_only[0], atol=1e-5)
    assert torch.allclose(every_position[1], labelled_only[1], atol=1e-6)
    for name, gradient in every_position[2].items():
        assert torch.allclose(gradient, labelled_only[2][name], atol=1e-6), name
    score_only_labelled_positions_on_cpu()  # a second call does not wrap it again
    assert trl_utils._use_triton(torch.device("cpu")) and not trl_utils._use_triton.original(torch.device("cpu"))
