"""The few-shot self-edit: the paper's JSON config for test-time training (SEAL §4.1).

    {"data_generation": {"use_basic_augmentations": true, "use_size_augmentations": false,
                         "use_chain_augmentations": false, "use_repeat_augmentations": false},
     "training": {"strategy": "train_using_output_tokens", "learning_rate": 0.0001,
                  "num_train_epochs": 3}}

Strict types: a boolean must be ``true``/``false`` (not 1 or "yes"), epochs an integer (not
2.0), every key present and no other key. Bounds on the numbers depend on the experiment and
are checked in ``models.fewshot.self_edit.validate_self_edit``.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt

Strategy = Literal["train_using_all_tokens", "train_using_output_tokens"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataGeneration(_Strict):
    use_basic_augmentations: StrictBool
    use_size_augmentations: StrictBool
    use_chain_augmentations: StrictBool
    use_repeat_augmentations: StrictBool


class Training(_Strict):
    strategy: Strategy
    learning_rate: StrictFloat | StrictInt
    num_train_epochs: StrictInt


class TTTConfig(_Strict):
    """A test-time training config, as the policy writes it."""

    data_generation: DataGeneration
    training: Training

    def canonical(self) -> str:
        """Compact JSON with sorted keys: equal configs give equal text (cache keys, tables)."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
