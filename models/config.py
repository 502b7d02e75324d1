"""What a model is, as the config names it: the ``[model]`` section (the models library's own contract).

``fl.config`` embeds it in the experiment schema; ``models.build`` builds from it. It lives beside the models
so that the libraries never import the application (``tests/test_layers.py``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ModelConfig(BaseModel):
    # allow_inf_nan=False: as every config section (a NaN or inf fails here, before Ray starts)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    family: str = Field("vit", description="vit, bert, gpt2 (fedprobe list), a plugin family, or "
                                           "'package.module:factory' returning a plain nn.Module called as model(x)")
    size: Literal["tiny", "small"] = "tiny"
    attention: str = Field("standard", description="attention kernel (fedprobe list)")
    attention_params: dict[str, Any] = Field(default_factory=dict)
    adapter: Literal["full", "ntk", "lora", "prefix"] = "full"
    adapter_params: dict[str, Any] = Field(default_factory=dict)
    pretrained: str = Field("", description="local folder for from_pretrained, or a named checkpoint "
                                            "(fedprobe list: pretrained, e.g. 'minilm'); empty means random init")
    params: dict[str, Any] = Field(default_factory=dict, description="transformers config overrides, or the "
                                                                     "factory's keyword arguments")

    def label(self) -> str:
        """How runs name the model: ``bert-tiny``, or ``bert from minilm`` when loaded from a checkpoint (its size
        is the checkpoint's, not ``size``)."""
        return f"{self.family} from {self.pretrained}" if self.pretrained else f"{self.family}-{self.size}"
