"""The conventions every command's settings share (pydantic-settings): each field is a flag and a
REWARDSERVE_* environment variable, its docstring the --help text; lists are comma-separated in both.
Each job keeps its own settings beside its code (rl/config.py, rm/config.py, ...)."""
from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator, SecretStr
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _split_commas(value):
    """`a,b` -> [a, b], so lists read the same from a flag and from an environment variable (not JSON)."""
    if isinstance(value, str):
        value = [value]
    return [part.strip() for item in value for part in str(item).split(",") if part.strip()]


CommaList = Annotated[list[str], NoDecode, BeforeValidator(_split_commas)]


def _none_word(value):
    """`none` (as the help says) or `null` (JSON's word) both mean: off."""
    return None if isinstance(value, str) and value.strip().lower() in ("none", "null") else value


OffOrFloat = Annotated[float | None, BeforeValidator(_none_word)]


class CommandSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="REWARDSERVE_", use_attribute_docstrings=True, cli_kebab_case=True, cli_implicit_flags=True,
        extra="ignore",
    )

    def printable(self) -> dict:
        """The settings as printed at start, secrets shown only as set or not."""
        shown = self.model_dump(mode="json")
        return shown | {k: "<set>" for k, v in self if isinstance(v, SecretStr)}


def check_report_to(report_to: list[str]) -> None:
    if set(report_to) - {"wandb"}:
        raise ValueError(f"--report-to {','.join(report_to)}: only wandb is known (JSON Lines and TensorBoard are"
                         " always written)")
