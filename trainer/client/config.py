"""Settings of `rewardserve score`: items sent to a running server with the reward client."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator

from ..settings import CommaList, CommandSettings


class ScoreConfig(CommandSettings):
    url: CommaList = ["http://127.0.0.1:8000"]
    """Reward server URL(s), http(s):// or grpc(s)://; several are used round-robin."""
    prompt: str | None = None
    """Prompt of the one item to score (with --response)."""
    response: str | None = None
    """Response of the one item to score."""
    text: str | None = None
    """Already formatted text to score as given."""
    file: str | None = None
    """JSON Lines file of items ({"prompt", "response"} / {"messages"} / {"text"} / {"input_ids"}) to score."""
    transform: Literal["raw", "whiten", "logsigmoid", "debias"] | None = None
    """Reward transform; the model's default when left out."""
    model: CommaList | None = None
    """The server's model(s) to score with (several comma-separated: each in `components`); default: its default."""
    combination: str | None = None
    """One of the server's combinations to score with."""
    api_key: SecretStr | None = None
    """API key of the server."""
    ca_file: str | None = None
    """PEM CA bundle to trust for https:// and grpcs:// (default: the system's)."""
    timeout: float = Field(60.0, gt=0)
    """Seconds to wait for one answer."""

    @model_validator(mode="after")
    def _one_source(self) -> "ScoreConfig":
        if self.model and self.combination:
            raise ValueError("give --model or --combination, not both")
        sources = [self.response is not None, self.text is not None, self.file is not None]
        if sum(sources) != 1:
            raise ValueError("give exactly one of --prompt/--response, --text or --file")
        return self
