"""A plain-torch stand-in for the `flash_attn` package, so that tests on a CPU run transformers' REAL
flash_attention_2 dispatch (`modeling_flash_attention_utils._flash_attention_forward`: its packed-sequence detection,
its unpadding by attention_mask, its cu_seq_lens path) with only the CUDA kernels replaced by reference ones.

    with flash_attn_standin() as calls:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="flash_attention_2")
        model(...)
        assert calls["flash_attn_varlen_func"]  # the varlen kernel ran, not a silent fallback

Kernels follow flash-attn 2's conventions: (tokens, heads, head_dim) layout, grouped-query attention (fewer kv heads),
causal masks aligned to the bottom right when query and key lengths differ (flash-attn >= 2.1). They compute in
float32 and return the query's dtype: transformers leaves fp32 queries in fp32 when the weights are fp32
(`integrations.flash_attention.get_target_dtype`), so fp32 models compare with sdpa at fp32 tolerances.

What is patched, and undone on exit (a MonkeyPatch context, so tests sharing the process see nothing of it):
- sys.modules gets `flash_attn` and `flash_attn.bert_padding` (what `_lazy_imports` imports for FA2);
- `modeling_flash_attention_utils.is_flash_attn_2_available`: the real one reads the installed distribution's
  metadata and wants CUDA; `_lazy_imports` asks it before importing `flash_attn`;
- FLASH_ATTENTION_COMPATIBILITY_MATRIX[2] (read by `PreTrainedModel._flash_attn_can_dispatch` when a model is made
  with flash_attention_2): available, and the CPU a supported device (else "model not initialized on GPU");
- the module's cache of loaded kernels (`_loaded_implementation`, `_flash_fn`, ...), so the stand-in is loaded on
  entry and no model made afterwards gets it by accident.
"""

import contextlib
import importlib.machinery
import sys
import types
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

_calls = Counter()


def _attend(q, k, v, causal, softmax_scale, dropout_p):
    """One sequence: q (Lq, H, D), k and v (Lk, Hkv, D) -> (Lq, H, D)."""
    length_q, heads, head_dim = q.shape
    length_k = k.shape[0]
    groups = heads // k.shape[1]  # GQA: each kv head serves `groups` query heads, as flash-attn does
    k, v = k.repeat_interleave(groups, dim=1).float(), v.repeat_interleave(groups, dim=1).float()
    scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    if causal:  # bottom-right aligned: query i sees keys up to i + (Lk - Lq)
        allowed = torch.ones(length_q, length_k, dtype=torch.bool, device=q.device).tril(length_k - length_q)
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = F.dropout(scores.softmax(dim=-1), p=dropout_p) if dropout_p else scores.softmax(dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)


def _unsupported(window_size, softcap, alibi_slopes):
    # Qwen2.5 uses none of them (use_sliding_window is false): refuse rather than silently ignore.
    if tuple(window_size) != (-1, -1) or softcap or alibi_slopes is not None:
        raise NotImplementedError("flash_attn stand-in: window_size, softcap and alibi_slopes are not implemented")


# The signatures are flash-attn 2.8's: transformers inspects them to decide which keyword arguments to pass.
def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (batch, Lq, H, D), k and v (batch, Lk, Hkv, D): every row one whole sequence."""
    _calls["flash_attn_func"] += 1
    _unsupported(window_size, softcap, alibi_slopes)
    return torch.stack([_attend(q[b], k[b], v[b], causal, softmax_scale, dropout_p) for b in range(q.shape[0])])


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """q (total_q, H, D), k and v (total_k, Hkv, D): sequence i is rows cu_seqlens[i]:cu_seqlens[i + 1]."""
    _calls["flash_attn_varlen_func"] += 1
    _unsupported(window_size, softcap, alibi_slopes)
    if block_table is not None:
        raise NotImplementedError("flash_attn stand-in: paged attention (block_table) is not implemented")
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    assert len(bounds_q) == len(bounds_k) and bounds_q[-1] == q.shape[0] and bounds_k[-1] == k.shape[0]
    assert max(b - a for a, b in zip(bounds_q, bounds_q[1:])) <= int(max_seqlen_q)
    assert max(b - a for a, b in zip(bounds_k, bounds_k[1:])) <= int(max_seqlen_k)
    out = torch.empty_like(q)
    for (q0, q1), (k0, k1) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:])):
        out[q0:q1] = _attend(q[q0:q1], k[k0:k1], v[k0:k1], causal, softmax_scale, dropout_p)
    return out


def flash_attn_with_kvcache(*args, **kwargs):
    raise NotImplementedError("flash_attn stand-in: flash_attn_with_kvcache (paged decoding) is not implemented")


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    """flash_attn.bert_padding.unpad_input (2.7+): the tokens the mask keeps, flattened, and where they came from."""
    _calls["unpad_input"] += 1
    mask = attention_mask + unused_mask if unused_mask is not None else attention_mask
    lengths = mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(mask.flatten()).flatten()
    cu_seqlens = F.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])[indices]
    return flat, indices, cu_seqlens, int(lengths.max()), attention_mask.sum(dim=-1, dtype=torch.int32)


def pad_input(hidden_states, indices, batch, seqlen):
    """flash_attn.bert_padding.pad_input: scatter the kept tokens back, zeros at the padding."""
    _calls["pad_input"] += 1
    out = hidden_states.new_zeros(batch * seqlen, *hidden_states.shape[1:])
    out[indices] = hidden_states
    return out.view(batch, seqlen, *hidden_states.shape[1:])


def _module(name, **attributes):
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # importlib.util.find_spec needs one
    module.__dict__.update(attributes)
    return module


@contextlib.contextmanager
def flash_attn_standin():
    """Installs the stand-in (see the module docstring); yields a Counter of kernel calls, reset on entry."""
    import transformers.modeling_flash_attention_utils as fa_utils

    bert_padding = _module("flash_attn.bert_padding", pad_input=pad_input, unpad_input=unpad_input)
    flash_attn = _module("flash_attn", __version__="2.8.3", flash_attn_func=flash_attn_func,
                         flash_attn_varlen_func=flash_attn_varlen_func,
                         flash_attn_with_kvcache=flash_attn_with_kvcache, bert_padding=bert_padding)
    available = lambda *args, **kwargs: True  # noqa: E731
    _calls.clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "flash_attn", flash_attn)
        patch.setitem(sys.modules, "flash_attn.bert_padding", bert_padding)
        patch.setattr(fa_utils, "is_flash_attn_2_available", available)
        patch.setitem(fa_utils.FLASH_ATTENTION_COMPATIBILITY_MATRIX, 2, {
            **fa_utils.FLASH_ATTENTION_COMPATIBILITY_MATRIX[2], "general_availability_check": available,
            "supported_devices": ((available, "cpu"),)})
        for cached in ("_loaded_implementation", "_flash_fn", "_flash_varlen_fn", "_flash_with_kvcache_fn",
                       "_pad_fn", "_unpad_fn", "_process_flash_kwargs_fn", "_process_with_kvcache_kwargs_fn"):
            patch.setattr(fa_utils, cached, None)
        yield _calls
