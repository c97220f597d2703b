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


def _reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal, scale, calls):
    """What varlen_attn computes, by SDPA per document; checks what the glue hands it."""
    import torch.nn.functional as F

    assert torch.equal(cu_seq_q, cu_seq_k) and cu_seq_q.dtype == torch.int32
    assert max_q == max_k == int((cu_seq_q[1:] - cu_seq_q[:-1]).max())
    calls.append(causal)
    parts = [F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (query, key, value)),
                                            is_causal=causal, scale=scale).transpose(0, 1)
             for s, e in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist())]
    return torch.cat(parts)  # (N, H, D)


def varlen_fakes(calls):
    """Reference kernels with the exact signatures of torch's releases (no **kwargs: a wrong argument raises):
    2.10's is_causal without scale, 2.11's is_causal with scale, and 2.13's window with scale."""
    def torch_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, is_causal=False):
        return _reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, None, calls)

    def torch_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, is_causal=False,
                   scale=None):
        return _reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, scale, calls)

    def torch_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                   window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
        return _reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size == (-1, 0), scale,
                                 calls)

    return {"2.10": torch_2_10, "2.11": torch_2_11, "2.13": torch_2_13}


@pytest.fixture
def fake_varlen(monkeypatch):
    """Installs one release's stand-in for varlen_attn (clearing what the glue read of the last one)."""
    from torch.nn.attention import varlen

    calls = []

    def install(release: str):
        monkeypatch.setattr(varlen, "varlen_attn", varlen_fakes(calls)[release])
        monkeypatch.setattr(packing, "_varlen", None)
        packing.varlen_api.cache_clear()
        return calls

    yield install
    packing.varlen_api.cache_clear()


@pytest.mark.parametrize("release", ["2.10", "2.11", "2.13"])
def test_the_varlen_glue_gives_the_per_document_scores(tmp_path, smol_tokenizer, fake_varlen, release):
    """varlen_attn runs on CUDA alone; here a reference kernel of each release's exact signature stands in for it,
    so what we hand it (layout, cumulative lengths, causality) is checked."""
    calls = fake_varlen(release)
    model = RewardModel.load(str(build_checkpoint(tmp_path / "llama", "llama", smol_tokenizer)))
    sequences = random_sequences(6, 1000, low=1, high=90)
    _, per_document = padded_and_packed(model, sequences)
    batch = packing.pack(sequences, kernel="varlen")
    with torch.inference_mode():
        glued = packing.packed_scores(model.network, batch)
    assert calls and all(calls) and batch.documents.ran == {"varlen"}  # it ran, causally, rather than falling back
    assert torch.allclose(per_document, glued, atol=1e-5)


@pytest.mark.parametrize("release", ["2.10", "2.11", "2.13"])
def test_varlen_applies_a_models_own_attention_scale_on_every_release(fake_varlen, release):
    """A model whose scale is not 1/sqrt(D): 2.10's kernel takes no scale, so the query is scaled instead."""
    import torch.nn.functional as F

    fake_varlen(release)
    documents = packing.pack([[5] * 7, [6] * 3, [7] * 11], kernel="varlen").documents
    query, key, value = torch.randn(3, 1, 4, 21, 8).unbind(0)
    output, _ = packing.packed_attention(torch.nn.Module(), query, key, value, None, scaling=0.3,
                                         rewardserve_documents=documents)
    expected = torch.cat([F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                                                         is_causal=True, scale=0.3)
                          for s, e in documents.spans()], dim=2).transpose(1, 2)
    assert documents.ran == {"varlen"} and torch.allclose(output, expected, atol=1e-5)


def test_varlen_reads_its_signature_once_and_its_lengths_from_the_batch(tmp_path, smol_tokenizer, monkeypatch,
                                                                        fake_varlen):
    """No inspect.signature per layer, and the cumulative lengths travel with the batch (built on the host, pinned
    and copied with it on a GPU), not built and copied with a blocking .to() inside the forward."""
    import inspect

    reads = []
    real_signature = inspect.signature
    calls = fake_varlen("2.13")
    monkeypatch.setattr(packing.inspect, "signature", lambda f: reads.append(f) or real_signature(f))
    model = RewardModel.load(str(build_checkpoint(tmp_path / "llama", "llama", smol_tokenizer)))
    batch = packing.pack(random_sequences(5, 1000, low=1, high=60), kernel="varlen")
    assert batch.documents.cu_seqlens.tolist() == batch.documents.bounds
    with torch.inference_mode():
        packing.packed_scores(model.network, batch)
        packing.packed_scores(model.network, batch)
    layers = model.network.config.num_hidden_layers
    assert len(calls) == 2 * layers and len(reads) == 1
    assert batch.documents.built["varlen"][0] is batch.documents.cu_seqlens


def _full_blocks(mask) -> torch.Tensor:
    counts, indices = mask.full_kv_num_blocks[0, 0], mask.full_kv_indices[0, 0]
    full = torch.zeros(indices.shape, dtype=torch.bool)
    for row in range(indices.shape[0]):
        full[row, indices[row, :counts[row]].long()] = True
    return full


@pytest.mark.parametrize("shares", [False, True])
def test_the_block_mask_is_built_from_the_segments_as_create_block_mask_would(shares):
    """Built at the block level from the segment ranges (no N x N, nothing compiled): every block pair that
    create_block_mask computes is computed, its full blocks are full (exactly its set without shared prefixes, a
    subset with them: a pair marked partial is evaluated by the mask function, so still exact), and flex_attention
    gives the same output through either mask."""
    import random

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    rng = random.Random(3)
    for trial in range(12):
        sequences = [[rng.randrange(5, 50) for _ in range(rng.randrange(1, 70))] for _ in range(rng.randrange(1, 9))]
        if shares:
            prompt = [rng.randrange(5, 50) for _ in range(40)]
            sequences += [prompt + [rng.randrange(5, 50) for _ in range(rng.randrange(0, 30))] for _ in range(4)]
        documents = packing.pack(sequences, min_shared_prefix=32 if shares else None).documents
        ids, prefix_ids = documents.ids, documents.prefix_ids
        for causal in ([True] if shares else [True, False]):
            def visible(_b, _h, q, k):
                same = (ids[q] == ids[k]) & (q >= k) if causal else ids[q] == ids[k]
                return same if prefix_ids is None else same | (prefix_ids[q] == ids[k])

            for block in (8, 16, 128):
                ours = packing.document_block_mask(ids, causal, prefix_ids, block)
                theirs = create_block_mask(visible, None, None, len(ids), len(ids), device="cpu", BLOCK_SIZE=block)
                assert (ours.to_dense() >= theirs.to_dense()).all()
                full, reference_full = _full_blocks(ours), _full_blocks(theirs)
                assert torch.equal(full, reference_full) if not shares else not (full & ~reference_full).any()
                q, k, v = torch.randn(3, 1, 2, len(ids), 8).unbind(0)
                assert torch.allclose(flex_attention(q, k, v, block_mask=ours),
                                      flex_attention(q, k, v, block_mask=theirs), atol=1e-5), (trial, block)


def test_the_block_mask_at_131k_tokens_takes_megabytes_not_gigabytes():
    """create_block_mask uncompiled materialises N x N (17 GB of booleans at 131,072 tokens; 2.7 GB measured at
    16.5k); built from the segments it is (N/128)^2 block entries. Measured in a fresh process (peak RSS)."""
    import subprocess
    import sys

    script = """
import resource, random, torch
from rewardserve.server import packing
rng = random.Random(0)
lengths = []
while sum(lengths) < 131072:
    lengths.append(min(rng.randrange(32, 2048), 131072 - sum(lengths)))
documents = packing.pack([[5] * n for n in lengths]).documents
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
mask = packing.document_block_mask(documents.ids, True)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, tuple(mask.kv_indices.shape))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rise_mib, shape = done.stdout.split(maxsplit=1)
    assert float(rise_mib) < 256 and shape.strip() == "(1, 1, 1024, 1024)"


