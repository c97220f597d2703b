"""Padding-free scoring gives the padded forward's scores (fp32, 1e-4), through either attention kernel."""
from __future__ import annotations

import pytest
import torch

from rewardserve.server import packing
from rewardserve.server.modeling import RewardModel, pad_right, sequence_scores

from ..conftest import build_checkpoint
from .test_modeling import random_sequences


def test_pack_lays_sequences_end_to_end_by_hand():
    batch = packing.pack([[5, 6, 7], [8], [9, 10]])
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 10]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert batch.documents.bounds == [0, 3, 4, 6] and batch.documents.ids.tolist() == [0, 0, 0, 1, 2, 2]
    assert batch.first_index.tolist() == [0, 3, 4] and batch.last_index.tolist() == [2, 3, 5]


def padded_and_packed(model: RewardModel, sequences):
    input_ids, attention_mask = pad_right(sequences, model.pad_token_id)
    with torch.inference_mode():
        padded = sequence_scores(model.network, input_ids, attention_mask)
        packed = packing.packed_scores(model.network, packing.pack(sequences))
    return padded, packed


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_packed_decoders_score_as_padded(tmp_path, smol_tokenizer, kind, padding_side):
    model = RewardModel.load(str(build_checkpoint(tmp_path / kind, kind, smol_tokenizer, padding_side=padding_side)))
    assert model.packs
    padded, packed = padded_and_packed(model, random_sequences(9, 1000, low=1, high=120))
    assert torch.allclose(padded, packed, atol=1e-4)


def test_a_packed_encoder_scores_as_padded_even_past_its_position_limit(tiny_bert):
    model = RewardModel.load(str(tiny_bert))
    assert model.packs and not model.is_decoder
    sequences = [[101] + s + [102] for s in random_sequences(8, 1000, low=40, high=120)]
    assert sum(map(len, sequences)) > model.network.config.max_position_embeddings  # one row longer than 256
    padded, packed = padded_and_packed(model, sequences)
    assert torch.allclose(padded, packed, atol=1e-4)


def test_the_flex_attention_kernel_agrees_with_the_per_document_one(tmp_path, smol_tokenizer, monkeypatch):
    """The GPU kernel (flex_attention with a document block mask), run eagerly on the CPU."""
    from torch.nn.attention.flex_attention import flex_attention

    model = RewardModel.load(str(build_checkpoint(tmp_path / "llama", "llama", smol_tokenizer)))
    sequences = random_sequences(6, 1000, low=1, high=90)
    _, per_document = padded_and_packed(model, sequences)
    monkeypatch.setattr(packing, "FLEX_DEVICES", {"cpu"})
    monkeypatch.setattr(packing, "_flex", flex_attention)
    with torch.inference_mode():
        flex = packing.packed_scores(model.network, packing.pack(sequences))
    assert packing._flex is flex_attention  # it ran, rather than falling back
    assert torch.allclose(per_document, flex, atol=1e-4)


def test_the_padded_path_still_runs_with_the_model_switched_back(tmp_path, smol_tokenizer):
    model = RewardModel.load(str(build_checkpoint(tmp_path / "llama", "llama", smol_tokenizer)))
    padded_and_packed(model, [[5, 6, 7], [8]])
    assert model.network.config._attn_implementation != packing.ATTENTION_NAME


@pytest.mark.parametrize("api", ["window_size", "is_causal"])
def test_the_varlen_glue_gives_the_per_document_scores(tmp_path, smol_tokenizer, monkeypatch, api):
    """varlen_attn runs on CUDA alone; here a reference kernel of its signature (both: torch 2.13's window and
    2.10's is_causal) stands in for it, so what we hand it (layout, cumulative lengths, causality) is checked."""
    import torch.nn.functional as F
    from torch.nn.attention import varlen

    calls = []

    def reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal, scale):
        assert torch.equal(cu_seq_q, cu_seq_k) and cu_seq_q.dtype == torch.int32
        assert max_q == max_k == int((cu_seq_q[1:] - cu_seq_q[:-1]).max())
        calls.append(causal)
        parts = [F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (query, key, value)),
                                                is_causal=causal, scale=scale).transpose(0, 1)
                 for s, e in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist())]
        return torch.cat(parts)  # (N, H, D)

    if api == "window_size":
        def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
            return reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size == (-1, 0), scale)
    else:
        def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, scale=None):
            return reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, scale)
    monkeypatch.setattr(varlen, "varlen_attn", fake)
    model = RewardModel.load(str(build_checkpoint(tmp_path / "llama", "llama", smol_tokenizer)))
    sequences = random_sequences(6, 1000, low=1, high=90)
    _, per_document = padded_and_packed(model, sequences)
    with torch.inference_mode():
        glued = packing.packed_scores(model.network, packing.pack(sequences, kernel="varlen"))
    assert calls and all(calls)  # it ran, causally, rather than falling back
    assert torch.allclose(per_document, glued, atol=1e-5)
