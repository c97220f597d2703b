"""Padding-free scoring: a batch's sequences laid end to end in one row, each attending only to itself.

A padded batch of rows x longest row spends its forward on padding (over workload W in 16k-token batches, 7% to 24%
of it depending on how well the rows were sorted). Packed, the forward reads exactly the real tokens:

    sequences [a a a] [b] [c c]  ->  input_ids (1, 6) = a a a b c c, position_ids = 0 1 2 0 0 1,
                                     document bounds [0, 3, 4, 6]

Attention is restricted to each document by an attention function registered with transformers
(`AttentionInterface`) under the name `rewardserve_packed`, switched on for the packed forward alone:
- on CUDA, flex_attention with a document block mask (compiled; blocks outside the diagonal are skipped);
- elsewhere, or if flex_attention fails to build or run (one warning, then this path), one SDPA call per document.
Both give the padded forward's scores (tests compare them within 1e-4 in fp32).

Scores are read at each document's last token (decoders) or from its first token through the pooler (BERT-style
encoders), as the padded path reads them.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

ATTENTION_NAME = "rewardserve_packed"


@dataclass
class Documents:
    """Where each sequence lies in the packed row; travels to the attention function as a forward kwarg."""

    bounds: list[int]  # B + 1 offsets, on the host: the CPU kernel slices with them without asking the device
    block_masks: dict  # causal flag -> flex_attention BlockMask, built on first use (CUDA only)
    ids: torch.Tensor | None = None  # (N,) document index of each token, on the device (for the block mask)

    def spans(self) -> list[tuple[int, int]]:
        return list(zip(self.bounds[:-1], self.bounds[1:]))


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (1, N)
    position_ids: torch.Tensor  # (1, N): 0.. within each sequence
    documents: Documents
    first_index: torch.Tensor  # (B,) each sequence's first token in the row
    last_index: torch.Tensor  # (B,) each sequence's last token in the row


def pack(sequences: list[list[int]], pin_memory: bool = False) -> PackedBatch:
    """Lays the sequences end to end (host tensors; pinned when they are bound for a GPU)."""
    lengths = torch.tensor([len(s) for s in sequences])
    ends = lengths.cumsum(0)
    starts = ends - lengths
    total = int(ends[-1])
    input_ids = torch.tensor([t for s in sequences for t in s], dtype=torch.long)[None]  # (1, N)
    position_ids = (torch.arange(total) - starts.repeat_interleave(lengths))[None]  # (1, N)
    ids = torch.arange(len(sequences)).repeat_interleave(lengths)  # (N,)
    if pin_memory:
        input_ids, position_ids, ids = input_ids.pin_memory(), position_ids.pin_memory(), ids.pin_memory()
    documents = Documents([0] + ends.tolist(), {}, ids)
    return PackedBatch(input_ids, position_ids, documents, starts, ends - 1)


def to_device(batch: PackedBatch, device: torch.device) -> PackedBatch:
    non_blocking = device.type == "cuda"
    move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
    documents = Documents(batch.documents.bounds, {}, move(batch.documents.ids))
    return PackedBatch(move(batch.input_ids), move(batch.position_ids), documents, move(batch.first_index),
                       move(batch.last_index))


# -- the attention function -------------------------------------------------------------------------------------------
FLEX_DEVICES = {"cuda"}  # where flex_attention's block-sparse kernels pay (elsewhere it runs a dense reference)
_flex = None  # the compiled flex_attention, or False once it failed


def packed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask, scaling: float | None = None, dropout: float = 0.0,
                     rewardserve_documents: Documents | None = None, **_kwargs):
    """query (1, H, N, D), key and value (1, H_kv, N, D) -> (1, N, H, D); each document attends to itself alone."""
    if rewardserve_documents is None:
        raise RuntimeError("the packed attention needs the document bounds (rewardserve_documents)")
    causal = getattr(module, "is_causal", True)
    if key.shape[1] != query.shape[1]:  # grouped-query attention: each KV head serves several query heads
        repeats = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)
    if query.device.type in FLEX_DEVICES and _flex is not False and dropout == 0:
        output = _flex_attention(query, key, value, rewardserve_documents, causal, scaling)
        if output is not None:
            return output.transpose(1, 2).contiguous(), None
    parts = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=causal,
                                            dropout_p=dropout, scale=scaling) for s, e in rewardserve_documents.spans()]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def _flex_attention(query, key, value, documents: Documents, causal: bool, scaling):
    global _flex
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        if _flex is None:
            _flex = torch.compile(flex_attention, dynamic=True)
        mask = documents.block_masks.get(causal)
        if mask is None:
            mask = documents.block_masks[causal] = document_block_mask(documents.ids, causal, create_block_mask)
        return _flex(query, key, value, block_mask=mask, scale=scaling)
    except Exception as error:  # never die of an optimisation nobody could try here
        log.warning("flex_attention failed (%s: %s); packed attention runs one SDPA call per document from now on",
                    type(error).__name__, error)
        _flex = False
        return None


def document_block_mask(ids: torch.Tensor, causal: bool, create_block_mask):
    """A flex_attention block mask: token q sees token k of the same document (and, if causal, only k <= q)."""
    def same_document(_b, _h, q, k):
        return (ids[q] == ids[k]) & (q >= k) if causal else ids[q] == ids[k]

    return create_block_mask(same_document, None, None, ids.shape[0], ids.shape[0], device=ids.device)


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, packed_attention)


@contextlib.contextmanager
def packed_attention_on(model: nn.Module):
    """Switches the model to the packed attention for one forward (every layer reads the name at call time)."""
    register()
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous


# -- which architectures pack ----------------------------------------------------------------------------------------
# Model types whose attention is plain (causal for decoders, full for encoders) with positions from `position_ids`,
# and whose layers hand the forward's kwargs to the attention function: the packed attention above is exactly theirs.
# Each is proven by tests/server/test_architectures.py (a packed batch equals transformers' forward of each item
# alone). Everything else (ALiBi: BLOOM, MPT, Falcon-RW; local attention: GPT-Neo; layers that keep their own
# attention code: Falcon, StableLM, ALBERT) is scored padded, with transformers' own masks.
PACKABLE = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "phi", "gpt2", "gptj", "gpt_neox",
                      "opt", "bert"})


def plain_attention_blocker(config, length: int) -> str | None:
    """Why sequences of up to `length` tokens do not see plain causal (or full) attention in this architecture, or
    None when they do. A sliding window only matters past its width: a token attends to the `sliding_window` last
    tokens, itself included, so a window of at least `length` is full attention."""
    model_type = getattr(config, "model_type", "?")
    if model_type not in PACKABLE:
        return f"{model_type} is not among the architectures proven to pack ({', '.join(sorted(PACKABLE))})"
    if getattr(config, "attn_logit_softcapping", None):
        return f"{model_type} caps its attention logits (attn_logit_softcapping)"
    window = getattr(config, "sliding_window", None)
    layer_types = set(getattr(config, "layer_types", None) or [])
    windowed = window is not None and (not layer_types or layer_types != {"full_attention"})
    if windowed and window < length:
        return f"{model_type} attends through a sliding window of {window} tokens, shorter than {length}"
    return None


def supports_packing(model: nn.Module, max_length: int) -> bool:
    """Whether sequences of up to `max_length` tokens can be scored packed: the architecture's attention is plain
    (`plain_attention_blocker`), and the head is a decoder's linear `score` or a BERT-style pooler and linear
    classifier. Anything else is scored padded."""
    if plain_attention_blocker(model.config, max_length) is not None:
        return False
    if isinstance(getattr(model, "score", None), nn.Linear):
        return True
    return isinstance(getattr(model, "classifier", None), nn.Linear) and \
        getattr(model.base_model, "pooler", None) is not None


# -- scores ---------------------------------------------------------------------------------------------------------
def packed_scores(model: nn.Module, batch: PackedBatch) -> torch.Tensor:
    """One fp32 score per sequence (B,), equal to the padded forward's."""
    decoder = isinstance(getattr(model, "score", None), nn.Linear)
    extra = {}
    if not decoder:
        # BERT-style encoders otherwise slice a buffer of max_position_embeddings zeros, shorter than a packed row
        # (GPT-2 takes token_type_ids too, but embeds them: it must not get any)
        extra["token_type_ids"] = torch.zeros_like(batch.input_ids)
    with packed_attention_on(model):
        hidden = model.base_model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                                  rewardserve_documents=batch.documents, **extra).last_hidden_state[0]  # (N, H)
    if decoder:
        return model.score(hidden[batch.last_index].float()).squeeze(-1)  # (B,)
    pooled = model.base_model.pooler(hidden[batch.first_index][:, None, :])  # (B, H): the pooler reads position 0
    return model.classifier(pooled).squeeze(-1).float()  # the head's fp32 hook casts its input
