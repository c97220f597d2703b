"""Every decoder and encoder family transformers ships, as tiny random checkpoints: whichever path serves a model
(packed or padded) equals a plain transformers forward of each item alone (fp32, 1e-4) and does not depend on the
batch, and an item as long as the model's positions allow scores too. Packing is used exactly where it is proven."""
from __future__ import annotations

import random

import pytest
import torch
import transformers as tf
from transformers import AutoModelForSequenceClassification

from rewardserve.server.modeling import RewardModel

VOCAB = 1000
POSITIONS = 64
WINDOW = 8  # sliding and local windows far shorter than the items, so that ignoring one shows

DECODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=POSITIONS)
COMMON = dict(vocab_size=VOCAB, num_labels=1, pad_token_id=0)


def families() -> dict[str, tuple[object, bool]]:
    """name -> (config, whether it is scored packed)."""
    return {
        "llama": (tf.LlamaConfig(num_key_value_heads=2, **DECODER, **COMMON), True),
        "mistral": (tf.MistralConfig(num_key_value_heads=2, sliding_window=WINDOW, **DECODER, **COMMON), False),
        "mistral-wide-window": (tf.MistralConfig(num_key_value_heads=2, sliding_window=4096, **DECODER, **COMMON),
                                True),
        "mixtral": (tf.MixtralConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                     sliding_window=None, **DECODER, **COMMON), True),
        "qwen2": (tf.Qwen2Config(num_key_value_heads=2, **DECODER, **COMMON), True),
        "qwen2-sliding": (tf.Qwen2Config(num_key_value_heads=2, use_sliding_window=True, sliding_window=WINDOW,
                                         max_window_layers=0, **DECODER, **COMMON), False),
        "qwen3": (tf.Qwen3Config(num_key_value_heads=2, head_dim=8, **DECODER, **COMMON), True),
        "gemma": (tf.GemmaConfig(num_key_value_heads=2, head_dim=8, **DECODER, **COMMON), True),
        "gemma2": (tf.Gemma2Config(num_key_value_heads=2, head_dim=8, sliding_window=WINDOW, **DECODER, **COMMON),
                   False),
        "phi": (tf.PhiConfig(**DECODER, **COMMON), True),
        "stablelm": (tf.StableLmConfig(num_key_value_heads=2, **DECODER, **COMMON), False),
        "gpt2": (tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=POSITIONS, **COMMON), True),
        "gptj": (tf.GPTJConfig(n_embd=32, n_layer=2, n_head=4, n_positions=POSITIONS, rotary_dim=4, **COMMON), True),
        "gpt_neox": (tf.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=POSITIONS, **COMMON), True),
        "gpt_neo": (tf.GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=4, window_size=WINDOW,
                                    attention_types=[[["global", "local"], 1]], max_position_embeddings=POSITIONS,
                                    **COMMON), False),
        "bloom": (tf.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **COMMON), False),
        "falcon": (tf.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   max_position_embeddings=POSITIONS, **COMMON), False),
        "falcon-alibi": (tf.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True,
                                         max_position_embeddings=POSITIONS, **COMMON), False),
        "opt": (tf.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                             word_embed_proj_dim=32, max_position_embeddings=POSITIONS, **COMMON), True),
        "mpt": (tf.MptConfig(d_model=32, n_layers=2, n_heads=4, max_seq_len=POSITIONS, **COMMON), False),
        "bert": (tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                               max_position_embeddings=POSITIONS, **COMMON), True),
        # RoBERTa counts positions from padding_idx + 1: a table of 66 rows holds 64 positions
        "roberta": (tf.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=POSITIONS + 2, vocab_size=VOCAB, num_labels=1,
                                     pad_token_id=1), False),
        "deberta-v2": (tf.DebertaV2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=64, max_position_embeddings=POSITIONS, **COMMON), False),
        "albert": (tf.AlbertConfig(hidden_size=32, embedding_size=16, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=POSITIONS, **COMMON), False),
        "distilbert": (tf.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                           max_position_embeddings=POSITIONS, **COMMON), False),
    }


FAMILIES = families()


def plain_scores(model, sequences: list[list[int]]) -> list[float]:
    """What a user computes with transformers alone: each item on its own, no padding, no mask."""
    with torch.no_grad():
        return [model(torch.tensor([s])).logits[0, 0].item() for s in sequences]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_scores_as_transformers_alone_and_batch_invariant(tmp_path, family):
    config, packs = FAMILIES[family]
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path)
    reference = AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float32).eval()
    served = RewardModel.load(str(tmp_path), max_length=1000)  # asked for more than the model has
    assert served.max_length == (1000 if family == "bloom" else POSITIONS)  # BLOOM (ALiBi) has no position table
    assert served.packs is packs, f"{family}: packs={served.packs}"

    rng = random.Random(0)
    longest = min(served.max_length, POSITIONS)
    sequences = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (3, 17, 40, 9, longest)]
    expected = plain_scores(reference, sequences)
    alone = [served.score_batch([s])[0] for s in sequences]
    together = served.score_batch(sequences)
    with_short_neighbours = served.score_batch([[5], sequences[2], [7, 8]])[1]
    assert alone == pytest.approx(expected, abs=1e-4)
    assert together == pytest.approx(expected, abs=1e-4)
    assert with_short_neighbours == pytest.approx(expected[2], abs=1e-4)
    with served.forward_path_as("padded"):  # what the calibration checks every packed path against
        assert served.score_batch(sequences) == pytest.approx(expected, abs=1e-4)
