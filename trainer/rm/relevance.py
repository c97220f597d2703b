"""A relevance judge: a sentence encoder scores how closely each response answers its question.

all-MiniLM-L6-v2 (the embedded `minilm`) was trained contrastively on about a billion pairs, question–answer pairs
among them (Stack Exchange, MS MARCO, Yahoo Answers, ...), to place a text near the texts that answer it. The cosine
of the mean-pooled embeddings of a question and a response is its judgement of how directly the response answers
the question. It is a pointwise judge: each response is scored alone, so the order in which two are shown cannot
matter, and a pair's label is the difference of their two scores.

Why the demo labels with it rather than with SmolLM2-135M asked "A or B": that judge's verdict is almost all
position (about 2 logits towards whichever answer is shown first) and its order-free part does not follow the
content (README, "The demo's labeller"). The relevance judge sees one thing, whether the response is about the
question, and sees it reliably; it does not see harm (a refusal is less "about" the question than compliance), so
it labels only what it can judge.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rewardserve.server.embedded import resolve_model_path


class RelevanceJudge:
    def __init__(self, spec: str, device, batch_size: int = 32, max_length: int = 256):
        from transformers import AutoModel, AutoTokenizer

        path = resolve_model_path(spec)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.encoder = AutoModel.from_pretrained(path).to(device).eval()
        self.device, self.batch_size, self.max_length = device, batch_size, max_length

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """Mean-pooled, unit-length embeddings (N, hidden): the pooling the encoder was trained with."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.encoder(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.encoder.config.hidden_size)

    def scores(self, questions: list[str], responses: list[str]) -> torch.Tensor:
        """Cosine of each question with its response, in [-1, 1] (N,); an empty response scores -1."""
        cosine = (self.embed(questions) * self.embed(responses)).sum(-1)
        empty = torch.tensor([not r.strip() for r in responses], dtype=torch.bool)
        return cosine.masked_fill(empty, -1.0)
