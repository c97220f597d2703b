"""Items that share a prefix are computed over it once, and score exactly as each item alone (fp32, 1e-5)."""
from __future__ import annotations

import pytest
import torch

from rewardserve.server import packing
from rewardserve.server.modeling import RewardModel

from ..conftest import build_checkpoint


def groups(sequences, min_shared):
    """The groups, each (prefix length, sorted members), sorted: the order they are laid out in plays no part."""
    return sorted((shared, sorted(members))
                  for shared, members in packing.shared_prefix_groups([tuple(s) for s in sequences], min_shared))


def test_groups_by_hand():
    header, p, q = [1, 2, 3], [10, 11, 12, 13, 14], [20, 21, 22, 23]
    sequences = [header + p + [5], header + q + [6, 7], header + p + [8, 9], header + q + [4], [99, 98]]
    # each prompt's responses share header + prompt; the header alone (3 tokens) is not worth joining the groups
    assert groups(sequences, 3) == [(0, [4]), (7, [1, 3]), (8, [0, 2])]
    assert groups(sequences, 9) == [(0, [0]), (0, [1]), (0, [2]), (0, [3]), (0, [4])]  # under the minimum
    # a sequence that is the whole prefix joins its group; it has no suffix of its own
    assert groups([header + p, header + p + [5], header + p + [6]], 4) == [(8, [0, 1, 2])]
    # a common header is shared when nothing longer is: three items, one prefix of 3
    assert groups([header + [5], header + [6], header + [7, 8]], 2) == [(3, [0, 1, 2])]


def test_pack_lays_the_prefix_once_then_each_suffix_by_hand():
    batch = packing.pack([[1, 2, 3, 4], [1, 2, 3, 5, 6], [9], [1, 2, 3, 4]], min_shared_prefix=2)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 9]]  # the duplicate is computed once
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 3, 4, 0]]  # suffixes go on from the prefix's positions
    assert batch.documents.bounds == [0, 3, 4, 6, 7] and batch.documents.prefixes == [-1, 0, 0, -1]
    assert batch.documents.prefix_ids.tolist() == [-1, -1, -1, 0, 0, 0, -1]
    assert batch.last_index.tolist() == [3, 5, 6, 3] and batch.computed_tokens == 7
    unshared = packing.pack([[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 3, 4]])  # off: every sequence, as it is
    assert unshared.computed_tokens == 13 and unshared.documents.prefixes is None


def alone(model: RewardModel, sequences) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model.network(input_ids=torch.tensor([s])).logits[:, 0].float() for s in sequences])


def grouped_sequences(seed: int = 0) -> list[list[int]]:
    """Two prompts of 40 and 25 tokens behind a 6-token header, with responses; a response repeated; the first
    prompt as an item of its own; an unrelated item; a short item sharing only the header and a little more."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(5, 900, (n,), generator=g).tolist()  # noqa: E731
    header, first, second = draw(6), draw(40), draw(25)
    sequences = [header + first + draw(n) for n in (3, 9, 1, 14)] + [header + second + draw(n) for n in (5, 2)]
    return sequences + [sequences[1], header + first, draw(30), header + second[:3]]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])  # rotary positions, and GPT-2's learned ones
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_shared_scores_equal_each_item_alone(tmp_path, smol_tokenizer, kind, padding_side):
    model = RewardModel.load(str(build_checkpoint(tmp_path / kind, kind, smol_tokenizer, padding_side=padding_side)),
                             min_shared_prefix=4)
    assert model.min_shared_prefix == 4
    sequences = grouped_sequences()
    pending = model.launch(sequences)
    assert torch.allclose(torch.tensor(model.collect(pending)), alone(model, sequences), atol=1e-5)
    # 46 + 4 suffixes (27), 31 + 2 suffixes (7), the 30-token item and the 9-token one: 150 of the 420 sent
    assert pending.computed_tokens == 150 and sum(map(len, sequences)) == 420


def test_the_flex_attention_kernel_takes_the_prefix_structure(tmp_path, smol_tokenizer, monkeypatch):
    """The GPU kernel (flex_attention with a block mask that lets each suffix see its prefix), run eagerly here."""
    from torch.nn.attention.flex_attention import flex_attention

    model = RewardModel.load(str(build_checkpoint(tmp_path / "llama", "llama", smol_tokenizer)), min_shared_prefix=4)
    sequences = grouped_sequences(1)
    monkeypatch.setattr(packing, "FLEX_DEVICES", {"cpu"})
    monkeypatch.setattr(packing, "_flex", flex_attention)
    with torch.inference_mode():
        flex = packing.packed_scores(model.network, packing.pack(sequences, min_shared_prefix=4))
    assert packing._flex is flex_attention  # it ran, rather than falling back
    assert torch.allclose(flex, alone(model, sequences), atol=1e-5)


def test_encoders_and_padded_models_never_share(tiny_bert, tmp_path, smol_tokenizer):
    encoder = RewardModel.load(str(tiny_bert), min_shared_prefix=4)
    assert encoder.min_shared_prefix is None and "encoder" in encoder.shared_prefix_note()
    off = RewardModel.load(str(build_checkpoint(tmp_path / "llama", "llama", smol_tokenizer)), min_shared_prefix=0)
    assert off.min_shared_prefix is None and off.shared_prefix_note() == "off: --min-shared-prefix 0"
