"""Causal-LM loss over the labeled positions only, shared by training and evaluation.

The fast path runs the decoder, keeps the hidden states whose next token has a label, and projects
only those through the LM head: prompt and pad tokens never pay for the (tokens x vocabulary)
matmul. That is only right where the model's forward computes logits = lm_head(last hidden state)
and nothing more; architectures that soft-cap or scale their logits in `forward` (Gemma-2/3
final_logit_softcapping, Cohere logit_scale, Granite logits_scaling, ...) get their own forward.
Every training method goes through the fast path where the architecture allows it: LoRA, DoRA and
PiSSA adapters and trainable token rows live inside the decoder and head modules, QLoRA keeps the LM
head in full precision, full and freeze are the plain model (tests/components/models/test_loss.py).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

IGNORE = -100
NO_GRAD_LOSS_CHUNK = 2048  # positions projected to the vocabulary at a time when no gradient is needed

# model_type values whose transformers *ForCausalLM.forward computes exactly
# logits = lm_head(decoder(...).last_hidden_state) (checked against transformers 5.24's modeling files;
# tests/components/models/test_loss.py checks each entry against the model's own forward).
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "olmo2", "smollm3"})
# Config attributes that make a forward transform its logits, with the value at which it does not.
_LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0, "output_multiplier": 1.0}

log = logging.getLogger(__name__)
_fallbacks_logged: set[str] = set()


def _log_fallback_once(causal) -> None:
    name = f"{type(causal).__module__}.{type(causal).__name__} ({causal.config.model_type})"
    if name not in _fallbacks_logged:
        _fallbacks_logged.add(name)
        log.info("labeled-positions loss: %s is not known to compute logits as lm_head(last hidden state); "
                 "using its own forward (logits for every position, slower)", name)


def plain_head_logits(causal) -> bool:
    """Whether `causal` (a transformers causal LM, not PEFT-wrapped) is known to compute its logits as
    lm_head(last hidden state): a listed model type, transformers' own class (not remote code), and
    no logit soft-capping or scaling in its config."""
    config = causal.config
    if config.model_type not in PLAIN_HEAD_MODEL_TYPES:
        return False
    if not type(causal).__module__.startswith("transformers.models."):
        return False
    return all(getattr(config, name, neutral) == neutral for name, neutral in _LOGIT_TRANSFORMS.items())


def _inside_ddp_forward(ddp, loss_of):
    """`loss_of(ddp.module)` computed as the DDP wrapper's forward: DDP prepares its gradient reduction in
    forward and, finding unused parameters, walks the graph from forward's output, so a loss computed
    beside the wrapper (the decoder and head called directly) would leave the ranks' gradients unsynced."""
    inner = ddp.module
    inner.forward = lambda: loss_of(inner)  # an instance attribute shadows the class's forward for this call
    try:
        return ddp()
    finally:
        del inner.forward


def labeled_positions_loss(model, batch: dict[str, torch.Tensor], reduction: str = "sum") -> tuple[torch.Tensor, int]:
    """Causal-LM cross-entropy over the positions whose next token has a label (not -100).

    `batch` holds input_ids and labels, optionally position_ids (packed rows: positions restart per
    example) and attention_mask. Returns (loss, number of labeled tokens); `reduction` is passed to
    cross-entropy ("sum", "mean" or "none"). Works on a plain causal LM or a PEFT-wrapped one, either
    also under DistributedDataParallel.
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return _inside_ddp_forward(model, lambda inner: labeled_positions_loss(inner, batch, reduction))
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    inputs = {
        "input_ids": batch["input_ids"],
        "position_ids": batch.get("position_ids"),
        "attention_mask": batch.get("attention_mask"),
        # With no cache and no attention mask, transformers derives a block-diagonal mask from
        # restarting position ids, which keeps packed examples apart.
        "use_cache": False,
    }
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    n = int(keep.sum())
    targets = targets[keep]
    if not plain_head_logits(causal):
        _log_fallback_once(causal)
        logits = causal(**inputs).logits
        if n == 0:
            return logits.sum() * 0.0, 0
        return F.cross_entropy(logits[:, :-1][keep].float(), targets, reduction=reduction), n

    hidden = causal.base_model(**inputs).last_hidden_state
    if n == 0:
        return hidden.sum() * 0.0, 0
    head = causal.get_output_embeddings()
    hidden = hidden[:, :-1][keep]
    if torch.is_grad_enabled() or n <= NO_GRAD_LOSS_CHUNK or reduction not in ("sum", "mean"):
        return F.cross_entropy(head(hidden).float(), targets, reduction=reduction), n
    # Without autograd nothing needs the logits afterwards: project a chunk at a time, so a batch of
    # full-length rows never holds (tokens x vocabulary) floats twice (logits and log-softmax) at once.
    total = sum(
        F.cross_entropy(head(hidden[i : i + NO_GRAD_LOSS_CHUNK]).float(), targets[i : i + NO_GRAD_LOSS_CHUNK], reduction="sum")
        for i in range(0, n, NO_GRAD_LOSS_CHUNK)
    )
    return (total / n if reduction == "mean" else total), n
