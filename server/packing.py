"""Padding-free scoring: a batch's sequences laid end to end in one row, each attending only to itself.

A padded batch of rows x longest row spends its forward on padding (over workload W in 16k-token batches, 7% to 24%
of it depending on how well the rows were sorted). Packed, the forward reads exactly the real tokens:

    sequences [a a a] [b] [c c]  ->  input_ids (1, 6) = a a a b c c, position_ids = 0 1 2 0 0 1,
                                     document bounds [0, 3, 4, 6]

Attention is restricted to each document by an attention function registered with transformers
(`AttentionInterface`) under the name `rewardserve_packed`, switched on for the packed forward alone:
- on CUDA, flex_attention with a document block mask (compiled; blocks outside the diagonal are skipped), or
  varlen_attn over the cumulative lengths (no mask), whichever the start-up calibration found faster;
- elsewhere, or if those fail to build or run (one warning, then this path), one SDPA call per document.
Both give the padded forward's scores (tests compare them within 1e-4 in fp32).

Scores are read at each document's last token (decoders) or from its first token through the pooler (BERT-style
encoders), as the padded path reads them.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

ATTENTION_NAME = "rewardserve_packed"


@dataclass
class Documents:
    """Where each segment lies in the packed row, and which segment's keys it reads besides its own (the prompt it
    shares with others); travels to the attention function as a forward kwarg."""

    bounds: list[int]  # S + 1 offsets, on the host: the CPU kernel slices with them without asking the device
    built: dict  # what a kernel builds once per batch: flex's block mask by causal flag, varlen's lengths
    ids: torch.Tensor | None = None  # (N,) segment index of each token, on the device (for the block mask)
    prefixes: list[int] | None = None  # per segment, on the host: the segment it also attends to, or -1 (None: none)
    prefix_ids: torch.Tensor | None = None  # (N,) each token's segment's prefix, on the device (for the block mask)
    kernel: str = "auto"  # auto, flex, varlen or sdpa (below): which attention kernel runs
    cu_seqlens: torch.Tensor | None = None  # (S + 1,) int32 `bounds`, built on the host with the batch (varlen's)
    ran: set[str] = field(default_factory=set)  # the kernels that executed in this forward (counted per layer)

    @property
    def longest(self) -> int:
        return max(e - s for s, e in self.spans())

    def expected_kernel(self, device: torch.device) -> str:
        """The kernel this batch should run on `device`: the one asked for, or flex where varlen cannot serve it
        (shared prefixes), or sdpa where neither exists."""
        kernel = self.kernel
        if kernel == "auto":
            kernel = "flex" if device.type in FLEX_DEVICES else "sdpa"
        if kernel == "varlen" and self.prefixes is not None:
            kernel = "flex"
        if kernel == "flex" and device.type not in FLEX_DEVICES:
            kernel = "sdpa"
        return kernel

    def spans(self) -> list[tuple[int, int]]:
        return list(zip(self.bounds[:-1], self.bounds[1:]))

    def prefix_spans(self) -> list[tuple[int, int] | None]:
        spans = self.spans()
        return [None if p < 0 else spans[p] for p in (self.prefixes or [-1] * len(spans))]


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (1, N)
    position_ids: torch.Tensor  # (1, N): 0.. within each sequence; a suffix's go on from its prefix's
    documents: Documents
    first_index: torch.Tensor  # (B,) each sequence's first token in the row
    last_index: torch.Tensor  # (B,) each sequence's last token in the row
    prefix_start: torch.Tensor  # (B,) where the prefix a sequence shares begins (its own start when it shares none)
    prefix_length: torch.Tensor  # (B,) that prefix's length (0: none)
    own_start: torch.Tensor  # (B,) where the sequence's own tokens, after the prefix, begin
    lengths: torch.Tensor  # (B,) each sequence's tokens, its prefix's included

    @property
    def computed_tokens(self) -> int:
        return self.input_ids.shape[1]

    def token_index(self, offsets: torch.Tensor) -> torch.Tensor:
        """Where token `offsets[b, k]` of sequence b lies in the row: (B, K) -> (B, K). Training reads its
        per-token outputs (a policy's log-probs, values) through this."""
        return _token_index(self.prefix_start[:, None], self.prefix_length[:, None], self.own_start[:, None], offsets)

    def flat_token_index(self, owners: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Where token `offsets[s]` of sequence `owners[s]` lies in the row: (S,), (S,) -> (S,). A process reward
        model reads each step's end through this, any number of them per sequence."""
        return _token_index(self.prefix_start[owners], self.prefix_length[owners], self.own_start[owners], offsets)


def _token_index(prefix_start, prefix_length, own_start, offsets):
    return torch.where(offsets < prefix_length, prefix_start + offsets, own_start + offsets - prefix_length)


def shared_prefix_groups(sequences: list[tuple[int, ...]], min_shared: int) -> list[tuple[int, list[int]]]:
    """Distinct sequences cut into groups that are each computed over one shared prefix: (prefix length, member
    indices), every index in one group; a group of one shares nothing (length 0).

    Sorted, sequences that share a prefix are neighbours, and a run of neighbours shares the shortest common prefix
    of its adjacent pairs. A run is kept whole, or cut where that shortest prefix lies, whichever saves more tokens
    (its parts cut the same way): so a system prompt common to the whole batch does not swallow the longer prompt
    that each group of responses shares."""
    order = sorted(range(len(sequences)), key=lambda i: sequences[i])
    common = [_common_prefix(sequences[a], sequences[b]) for a, b in zip(order, order[1:])]
    best: dict[tuple[int, int], tuple[int, list]] = {}  # run [a, b) of `order` -> (tokens saved, its groups)
    stack = [(0, len(order), False)]  # post-order without recursion: a run's parts are decided before it
    while stack:
        a, b, parts_done = stack.pop()
        if b - a == 1:
            best[a, b] = (0, [(0, [order[a]])])
            continue
        shortest = min(common[a:b - 1])
        cuts = [a] + [k + 1 for k in range(a, b - 1) if common[k] == shortest] + [b]
        parts = list(zip(cuts[:-1], cuts[1:]))
        if not parts_done:  # the shortest prefix lies somewhere in the run, so there are two parts or more
            stack.append((a, b, True))
            stack.extend((x, y, False) for x, y in parts)
            continue
        whole = (b - a - 1) * shortest if shortest >= min_shared else 0
        below = sum(best[part][0] for part in parts)
        if whole > 0 and whole >= below:
            best[a, b] = (whole, [(shortest, order[a:b])])
        else:
            best[a, b] = (below, [group for part in parts for group in best[part][1]])
    return best[0, len(order)][1] if order else []


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def pack(sequences: list[list[int]], pin_memory: bool = False, min_shared_prefix: int | None = None,
         kernel: str = "auto") -> PackedBatch:
    """Lays the sequences end to end (host tensors; pinned when they are bound for a GPU). With
    `min_shared_prefix`, identical sequences are computed once, and sequences that begin with the same
    `min_shared_prefix` tokens or more are laid out as that prefix once, then each one's own suffix: the suffix
    attends to the prefix and to itself, its positions go on from the prefix's, and its score is read at its own
    last token (a sequence that is the whole prefix, at the prefix's). With causal attention the prefix's states do
    not depend on what follows it, so this is exactly the unshared forward; encoders must never share."""
    if min_shared_prefix:
        distinct: dict[tuple[int, ...], int] = {}
        which = [distinct.setdefault(tuple(s), len(distinct)) for s in sequences]
        uniques = list(distinct)
        groups = shared_prefix_groups(uniques, min_shared_prefix)
    else:
        which, uniques = list(range(len(sequences))), sequences
        groups = [(0, [i]) for i in range(len(sequences))]
    tokens, first_positions, prefixes = [], [], []
    placed = [None] * len(uniques)  # per unique: (prefix segment, prefix length, own segment, last token's offset)
    for shared, members in groups:
        if shared == 0:
            (member,) = members
            placed[member] = (len(tokens), 0, len(tokens), len(uniques[member]) - 1)
            tokens.append(uniques[member])
            first_positions.append(0)
            prefixes.append(-1)
            continue
        prefix_segment = len(tokens)
        tokens.append(uniques[members[0]][:shared])
        first_positions.append(0)
        prefixes.append(-1)
        for member in members:
            own = uniques[member][shared:]
            if not own:  # the prefix is this whole sequence
                placed[member] = (prefix_segment, shared, prefix_segment + 1, shared - 1)
                continue
            placed[member] = (prefix_segment, shared, len(tokens), shared + len(own) - 1)
            tokens.append(own)
            first_positions.append(shared)
            prefixes.append(prefix_segment)
    lengths = [len(t) for t in tokens]
    bounds = [0, *itertools.accumulate(lengths)]  # in Python: a trainer packs each minibatch without a tensor read
    repeats, starts = torch.tensor(lengths), torch.tensor(bounds)  # starts (S + 1,): the last is the row's end
    cu_seqlens = starts.to(torch.int32)
    input_ids = torch.tensor([t for segment in tokens for t in segment], dtype=torch.long)[None]  # (1, N)
    position_ids = torch.arange(bounds[-1]) - (starts[:-1] - torch.tensor(first_positions)).repeat_interleave(repeats)
    position_ids = position_ids[None]
    ids = torch.arange(len(tokens)).repeat_interleave(repeats)  # (N,)
    shares = any(p >= 0 for p in prefixes)
    prefix_ids = torch.tensor(prefixes).repeat_interleave(repeats) if shares else None
    if pin_memory:
        input_ids, position_ids, ids = input_ids.pin_memory(), position_ids.pin_memory(), ids.pin_memory()
        prefix_ids = prefix_ids.pin_memory() if shares else None
        cu_seqlens = cu_seqlens.pin_memory()
    documents = Documents(bounds, {}, ids, prefixes if shares else None, prefix_ids, kernel, cu_seqlens)
    prefix_segment, prefix_length, own_segment, last = torch.tensor([placed[w] for w in which]).unbind(-1)
    # a whole-prefix sequence's own part is empty: it "begins" at the next segment's start (or the row's end)
    prefix_start, own_start = starts[prefix_segment], starts[own_segment]
    last_index = _token_index(prefix_start, prefix_length, own_start, last)
    return PackedBatch(input_ids, position_ids, documents, prefix_start, last_index, prefix_start, prefix_length,
                       own_start, last + 1)


def to_device(batch: PackedBatch, device: torch.device) -> PackedBatch:
    non_blocking = device.type == "cuda"
    move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
    host = batch.documents
    documents = Documents(host.bounds, {}, move(host.ids), host.prefixes,
                          None if host.prefix_ids is None else move(host.prefix_ids), host.kernel,
                          None if host.cu_seqlens is None else move(host.cu_seqlens))
    return PackedBatch(move(batch.input_ids), move(batch.position_ids), documents, move(batch.first_index),
                       move(batch.last_index), move(batch.prefix_start), move(batch.prefix_length),
                       move(batch.own_start), move(batch.lengths))


# -- the attention function -------------------------------------------------------------------------------------------
# The kernels a packed forward can run (`Documents.kernel`): `flex` (flex_attention with a document block mask,
# compiled; CUDA), `varlen` (torch.nn.attention.varlen.varlen_attn over cumulative lengths, no mask at all; CUDA,
# torch 2.10 or later, half precision; a batch with shared prefixes runs flex), `sdpa` (one SDPA call per segment:
# anywhere, exact), and `auto` (flex on CUDA, sdpa elsewhere). Which is fastest on a card is measured at start
# (server/calibration.py). Every forward records the kernels that really ran (`Documents.ran`), so that what is
# reported is what executed, never what was asked for.
FLEX_DEVICES = {"cuda"}  # where flex_attention's block-sparse kernels pay (elsewhere it runs a dense reference)
FLEX_BLOCK = 128  # flex_attention's block size: the mask says which (query block, key block) pairs to compute
FLEX_COMPILE_BACKEND = "inductor"  # the tests compile through dynamo's eager backend: the same guards, no codegen
_flex = None  # the compiled flex_attention, or False once it failed
_varlen = None  # False once varlen_attn failed
_strict = False  # calibration: a kernel that fails raises instead of falling back, so the failure is seen


def varlen_available(device: torch.device) -> bool:
    """Whether varlen_attn can be tried on this device: CUDA, and a torch that has it (2.10 or later)."""
    if device.type != "cuda" or _varlen is False:
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def flex_disabled() -> bool:
    """Whether flex_attention failed earlier in this process (every packed flex forward then runs SDPA)."""
    return _flex is False


@contextlib.contextmanager
def strict_kernels():
    """Within it, a kernel that fails raises (calibration tells a candidate that broke from one that ran)."""
    global _strict
    previous, _strict = _strict, True
    try:
        yield
    finally:
        _strict = previous


def packed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask, scaling: float | None = None, dropout: float = 0.0,
                     rewardserve_documents: Documents | None = None, **_kwargs):
    """query (1, H, N, D), key and value (1, H_kv, N, D) -> (1, N, H, D); each document attends to itself alone."""
    documents = rewardserve_documents
    if documents is None:
        raise RuntimeError("the packed attention needs the document bounds (rewardserve_documents)")
    causal = getattr(module, "is_causal", True)
    if key.shape[1] != query.shape[1]:  # grouped-query attention: each KV head serves several query heads
        repeats = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)
    kernel = documents.expected_kernel(query.device)
    if kernel == "varlen" and dropout == 0 and _varlen is not False:
        output = _varlen_attention(query, key, value, documents, causal, scaling)
        if output is not None:
            documents.ran.add("varlen")
            return output, None
        kernel = "flex"
    if kernel == "flex" and _flex is not False and dropout == 0:
        output = _flex_attention(query, key, value, documents, causal, scaling)
        if output is not None:
            documents.ran.add("flex")
            return output.transpose(1, 2).contiguous(), None
    documents.ran.add("sdpa")
    return _sdpa_per_document(query, key, value, documents, causal, scaling, dropout), None


def _sdpa_per_document(query, key, value, documents: Documents, causal: bool, scaling, dropout):
    """One SDPA call per segment: exact anywhere, the reference the other kernels are checked against."""
    parts = []
    for (s, e), prefix in zip(documents.spans(), documents.prefix_spans()):
        if prefix is None:
            parts.append(F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                                                        is_causal=causal, dropout_p=dropout, scale=scaling))
            continue
        # a suffix: its queries see every key of its prefix, then its own causally (lower-right aligned)
        p, own = prefix[1] - prefix[0], e - s
        keys = torch.cat([key[:, :, prefix[0]:prefix[1]], key[:, :, s:e]], dim=2)
        values = torch.cat([value[:, :, prefix[0]:prefix[1]], value[:, :, s:e]], dim=2)
        visible = torch.ones(own, p + own, dtype=torch.bool, device=query.device).tril(p)
        parts.append(F.scaled_dot_product_attention(query[:, :, s:e], keys, values, attn_mask=visible,
                                                    dropout_p=dropout, scale=scaling))
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous()


@functools.cache
def varlen_api() -> tuple[bool, bool]:
    """What this torch's varlen_attn takes, read once (not per layer): (a causal window rather than is_causal,
    a `scale` argument). torch 2.10 has is_causal and no scale; later releases a window, (-1, 0) being causal,
    and scale."""
    from torch.nn.attention.varlen import varlen_attn

    parameters = inspect.signature(varlen_attn).parameters
    return "window_size" in parameters, "scale" in parameters


def _varlen_attention(query, key, value, documents: Documents, causal: bool, scaling):
    """varlen_attn over the documents' cumulative lengths: (1, N, H, D), or None (with one warning) if it fails."""
    global _varlen
    try:
        from torch.nn.attention.varlen import varlen_attn

        if "varlen" not in documents.built:  # once per batch, not per layer; copied with the batch (no sync here)
            bounds = documents.cu_seqlens
            if bounds is None or bounds.device != query.device:
                bounds = torch.tensor(documents.bounds, dtype=torch.int32).to(query.device, non_blocking=True)
            documents.built["varlen"] = (bounds, documents.longest)
        bounds, longest = documents.built["varlen"]
        windowed, takes_scale = varlen_api()
        mode = {"window_size": (-1, 0) if causal else (-1, -1)} if windowed else {"is_causal": causal}
        q = query[0].transpose(0, 1)  # (N, H, D)
        if takes_scale:
            mode["scale"] = scaling
        elif scaling is not None and abs(scaling * query.shape[-1] ** 0.5 - 1) > 1e-6:
            q = q * (scaling * query.shape[-1] ** 0.5)  # its fixed 1/sqrt(D), made the model's own scale
        output = varlen_attn(q, key[0].transpose(0, 1), value[0].transpose(0, 1), bounds, bounds, longest, longest,
                             **mode)  # (N, H, D)
        return output[None]
    except torch.OutOfMemoryError:
        raise  # the batcher splits the batch; a kernel is never given up for want of memory
    except Exception as error:
        if _strict:
            raise
        _give_up("varlen_attn", error, "flex_attention or SDPA")
        _varlen = False
        return None


def compiled_flex():
    """flex_attention compiled once with dynamic shapes, so that batches of every length share its graphs."""
    global _flex
    if not _flex:
        from torch.nn.attention.flex_attention import flex_attention

        _flex = torch.compile(flex_attention, dynamic=True, backend=FLEX_COMPILE_BACKEND)
    return _flex


def _flex_attention(query, key, value, documents: Documents, causal: bool, scaling):
    global _flex
    try:
        mask = documents.built.get(causal)
        if mask is None:
            mask = documents.built[causal] = document_block_mask(documents.ids, causal, documents.prefix_ids)
        return compiled_flex()(query, key, value, block_mask=mask, scale=scaling)
    except torch.OutOfMemoryError:
        raise  # the batcher splits the batch; a kernel is never given up for want of memory
    except Exception as error:  # never die of an optimisation nobody could try here
        if _strict:  # raised here, in the except clause: no frame holding the tensors is kept alive by a cycle
            raise
        _give_up("flex_attention", error, "one SDPA call per document")
        _flex = False
        return None


def _give_up(kernel: str, error: Exception, instead: str) -> None:
    """A kernel failed outside calibration: one warning; the caller never tries that kernel again, and the forwards
    that follow record the kernel that runs instead (the fallback shows in /info and the metrics)."""
    log.warning("%s failed (%s: %s); packed attention runs %s from now on", kernel, type(error).__name__, error,
                instead)


def document_block_mask(ids: torch.Tensor, causal: bool, prefix_ids: torch.Tensor | None = None,
                        block: int = FLEX_BLOCK):
    """flex_attention's block mask for a packed row, built from the segment ids at the block level: memory and work
    grow with (N / block)^2, never N^2, and nothing is compiled.

    Token q sees token k of its own segment (causally: k <= q), and every token of the prefix its segment shares
    (which lies before it in the row). Segments are laid in order, so the segments a block touches form a range
    [first, last]; a (query block, key block) pair is computed where those ranges can meet, and is full (computed
    without evaluating the mask) where both blocks lie whole inside one segment (causally: strictly below the
    diagonal) or the query block lies inside suffixes of one prefix and the key block inside that prefix. A pair
    marked partial is exact too: the kernel evaluates the mask function on it."""
    from torch.nn.attention.flex_attention import BlockMask

    n, device = ids.shape[0], ids.device
    blocks = -(-n // block)
    starts = torch.arange(blocks, device=device) * block
    first, last = ids[starts], ids[torch.clamp(starts + block, max=n) - 1]  # (nb,) segment range of each block
    whole = torch.ones(blocks, dtype=torch.bool, device=device)
    whole[-1] = n % block == 0  # a last block shorter than `block` is never full
    inside_one = (first == last) & whole  # (nb,)
    row, column = torch.arange(blocks, device=device)[:, None], torch.arange(blocks, device=device)[None]
    meets = (first[:, None] <= last[None]) & (first[None] <= last[:, None])  # (nb, nb): segment ranges overlap
    below = column < row if causal else torch.ones_like(meets)
    some = meets & (column <= row) if causal else meets
    full = inside_one[:, None] & inside_one[None] & (first[:, None] == first[None]) & below
    if prefix_ids is not None:
        padded = torch.full((blocks * block,), -1, dtype=prefix_ids.dtype, device=device)
        padded[:n] = prefix_ids
        per_block = padded.view(blocks, block)
        highest = per_block.max(-1).values  # (nb,) the largest prefix a token of the block reads (-1: none)
        lowest = torch.where(per_block < 0, highest[:, None], per_block).min(-1).values
        reads = highest >= 0
        some |= reads[:, None] & (lowest[:, None] <= last[None]) & (first[None] <= highest[:, None])
        one_prefix = reads & (lowest == highest) & (per_block >= 0).all(-1) & whole
        full |= one_prefix[:, None] & inside_one[None] & (first[None] == highest[:, None])
    partial = some & ~full

    def as_indices(chosen: torch.Tensor):  # (nb, nb) bool -> counts (1, 1, nb) and column indices (1, 1, nb, nb)
        counts = chosen.sum(-1, dtype=torch.int32)
        order = torch.argsort(chosen.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return counts[None, None], order[None, None]

    def same_document(_b, _h, q, k):
        return (ids[q] == ids[k]) & (q >= k) if causal else ids[q] == ids[k]

    def same_document_or_prefix(b, h, q, k):
        return same_document(b, h, q, k) | (prefix_ids[q] == ids[k])

    visible = same_document if prefix_ids is None else same_document_or_prefix
    return BlockMask.from_kv_blocks(*as_indices(partial), *as_indices(full), BLOCK_SIZE=block, mask_mod=visible,
                                    seq_lengths=(n, n))


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
    return plain_attention_blocker(model.config, max_length) is None and packable_head(model)


def packable_head(model: nn.Module) -> bool:
    """A decoder's linear `score` on the last token, or a BERT-style pooler and linear classifier on the first."""
    if isinstance(getattr(model, "score", None), nn.Linear):
        return True
    return isinstance(getattr(model, "classifier", None), nn.Linear) and \
        getattr(model.base_model, "pooler", None) is not None


# -- scores ---------------------------------------------------------------------------------------------------------
def packed_scores(model: nn.Module, batch: PackedBatch) -> torch.Tensor:
    """One fp32 score per sequence (B,) of a one-output reward model, equal to the padded forward's."""
    return packed_outputs(model, batch)[:, 0]


def packed_outputs(model: nn.Module, batch: PackedBatch) -> torch.Tensor:
    """The head's fp32 outputs per sequence (B, K), equal to the padded forward's."""
    decoder = isinstance(getattr(model, "score", None), nn.Linear)
    hidden = packed_hidden_states(model, batch, decoder)  # (N, H)
    if decoder:
        return model.score(hidden[batch.last_index].float())  # (B, K)
    pooled = model.base_model.pooler(hidden[batch.first_index][:, None, :])  # (B, H): the pooler reads position 0
    return model.classifier(pooled).float()  # (B, K); the head's fp32 hook casts its input


def packed_hidden_states(model: nn.Module, batch: PackedBatch, decoder: bool = True) -> torch.Tensor:
    """The trunk's last hidden states over the packed row (N, H), each segment having seen its own tokens and its
    prefix's alone."""
    extra = {}
    if not decoder:
        # BERT-style encoders otherwise slice a buffer of max_position_embeddings zeros, shorter than a packed row
        # (GPT-2 takes token_type_ids too, but embeds them: it must not get any)
        extra["token_type_ids"] = torch.zeros_like(batch.input_ids)
    with packed_attention_on(model):
        return model.base_model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                                rewardserve_documents=batch.documents, **extra).last_hidden_state[0]
