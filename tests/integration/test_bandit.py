"""PPO's fixed point, checked in closed form on a one-token bandit, through the real server and the real trainer.

The KL-regularised objective E[r(y)] - beta KL(pi || pi_ref) is maximised by pi*(y) ∝ pi_ref(y) exp(r(y) / beta).
Here the response is one token out of four (the policy puts all but ~1e-9 of its mass on them, with a known
reference distribution), and a reward model served by `rewardserve serve` gives each of them a known score. PPO
with a fixed beta, and every reward transform that would change the objective off (server: raw scores; trainer: no
whitening, no clip, no missing-EOS penalty), must end within 0.02 nats of pi*, for a small and a large beta.
The KL counts the tokens outside the four as a fifth outcome, so mass that leaks there counts against PPO.
The critic is a separate copy of the trunk, so the value loss does not move the policy's logits (a shared trunk
is PPO's default, and its value loss is a second objective on the same weights).
"""
from __future__ import annotations

import json
import subprocess

import pytest
import torch

from rewardserve.trainer.client import RewardClient
from rewardserve.trainer.rl.ppo import scoring_items
from rewardserve.trainer.prompts import encode_prompt

from ..conftest import CLI, ServerProcess, build_checkpoint, tiny_config

PROMPT = "Pick a letter."
CANDIDATES = ["A", "B", "C", "D"]
REFERENCE_LOGITS = [0.8, 0.0, -0.6, 0.3]  # pi_ref over the candidates: softmax of these
LOGIT_OFFSET = 30.0  # every other token sits 30 nats below: ~5e-9 of the mass in all
REWARDS = [0.0, 0.6, 1.2, -0.6]  # the reward model's raw score of each candidate answer


def candidate_ids(tokenizer) -> list[int]:
    ids = [tokenizer.encode(text, add_special_tokens=False) for text in CANDIDATES]
    assert all(len(i) == 1 for i in ids), ids
    return [i[0] for i in ids]


def build_bandit_policy(out, tokenizer):
    """A tiny Llama whose next token after PROMPT is one of the candidates, with REFERENCE_LOGITS: the output rows
    of the candidates are the final hidden state h scaled to give those logits (+30), every other row is zero."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer), tokenizer.pad_token_id))
    ids = torch.tensor([encode_prompt(tokenizer, PROMPT, 256)])
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state[0, -1]  # (H,): what the output layer reads
        rows = model.lm_head.weight
        rows.zero_()
        for token, logit in zip(candidate_ids(tokenizer), REFERENCE_LOGITS):
            rows[token] = (LOGIT_OFFSET + logit) * hidden / hidden.dot(hidden)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_bandit_reward_model(out, tokenizer):
    """A tiny Llama reward model whose raw score of PROMPT answered by each candidate is REWARDS: the head solves
    w . h_i = r_i for the final hidden states h_i at the scoring position, the sequences tokenized as the server
    tokenizes them (chat template, EOS appended)."""
    from rewardserve.server.schemas import ScoreItem
    from rewardserve.server.tokenization import ItemEncoder

    build_checkpoint(out, "llama", tokenizer, seed=3)
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    encoder = ItemEncoder(tokenizer, max_length=256, append_eos=True)
    with torch.no_grad():
        hidden = torch.stack([model.model(input_ids=torch.tensor([encoder.encode(ScoreItem(
            prompt=PROMPT, response=text)).input_ids])).last_hidden_state[0, -1] for text in CANDIDATES])
        head = torch.linalg.lstsq(hidden.double(), torch.tensor(REWARDS).double()[:, None]).solution[:, 0]
        model.score.weight.copy_(head.float()[None, :])
    model.save_pretrained(out)
    return out


def distribution(policy_dir, tokenizer) -> torch.Tensor:
    """The policy's next-token probabilities after PROMPT (float64): the four candidates, then every other token
    lumped as a fifth outcome."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([encode_prompt(tokenizer, PROMPT, 256)])).logits[0, -1].double()
    probabilities = logits.softmax(-1)
    inside = probabilities[candidate_ids(tokenizer)]
    return torch.cat([inside, (1 - inside.sum()).reshape(1)])


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p * (p / q).log()).sum())


@pytest.fixture(scope="module")
def bandit(tmp_path_factory, smol_tokenizer):
    """The policy, and a reward server whose raw scores of the four responses are known (read once from it)."""
    root = tmp_path_factory.mktemp("bandit")
    policy = build_bandit_policy(root / "policy", smol_tokenizer)
    server = ServerProcess(build_bandit_reward_model(root / "rm", smol_tokenizer), "--transform", "raw")
    items = scoring_items([PROMPT] * len(CANDIDATES), CANDIDATES)  # what the trainer sends
    rewards = torch.tensor(RewardClient(server.http_url).score(items).rewards, dtype=torch.float64)
    assert rewards.tolist() == pytest.approx(REWARDS, abs=1e-4)
    yield policy, server, rewards
    server.stop()


ESTIMATOR_FLAGS = {
    "gae": ["--critic", "separate"],
    "rloo": ["--advantage-estimator", "rloo", "--samples-per-prompt", "4"],
    # GRPO without the division by the group's std (Dr. GRPO): the score minus the group mean, an unbiased baseline
    "dr-grpo": ["--advantage-estimator", "grpo", "--samples-per-prompt", "4", "--no-grpo-scale-by-std"],
}


def optimum(reference: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """pi*(y) ∝ pi_ref(y) exp(r(y) / beta), over the four candidates and the lumped rest. The rest is given reward
    0: any reward below ~15 beta leaves its share of pi* under 1e-3 of what PPO must reach."""
    weights = reference * (torch.cat([rewards, torch.zeros(1, dtype=rewards.dtype)]) / beta).exp()
    return weights / weights.sum()


@pytest.mark.slow
@pytest.mark.parametrize("beta, estimator", [(0.3, "gae"), (1.0, "gae"), (1.0, "rloo"), (1.0, "dr-grpo")])
def test_ppo_ends_at_the_kl_regularised_optimum(bandit, smol_tokenizer, tmp_path, beta, estimator):
    policy, server, rewards = bandit
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT}) + "\n")
    reference = distribution(policy, smol_tokenizer)
    assert reference[-1] < 1e-8 and torch.allclose(reference[:-1] / reference[:-1].sum(),
                                                   torch.tensor(REFERENCE_LOGITS).double().softmax(-1))
    target = optimum(reference, rewards, beta)
    run = subprocess.run([*CLI, "ppo", "--reward-url", server.http_url, "--policy", str(policy), "--prompts",
                          str(prompts), "--out", str(tmp_path / "run"), "--max-new-tokens", "1", "--beta", str(beta),
                          "--no-whiten-rewards", "--reward-clip", "none", "--missing-eos-penalty", "none",
                          "--steps", "80", "--batch-size", "64", "--mini-batch-size", "64", "--lr", "1e-3",
                          "--device", "cpu", "--save-every", "1000",
                          *ESTIMATOR_FLAGS[estimator]],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    trained = distribution(tmp_path / "run" / "policy", smol_tokenizer)
    shown = lambda p: "[" + ", ".join(f"{v:.4f}" for v in p.tolist()) + "]"  # noqa: E731
    print(f"{estimator}, beta {beta}: r {rewards.tolist()}; pi_ref {shown(reference)}, pi* {shown(target)},"
          f" pi_theta {shown(trained)} (A, B, C, D, every other token); KL(pi_theta||pi*) {kl(trained, target):.4f},"
          f" KL(pi_ref||pi*) {kl(reference, target):.4f}")
    assert kl(trained, target) <= 0.02
