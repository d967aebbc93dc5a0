"""The models of a federated run: the peft model the clients train (proxy, emulator or FM, as the
method says) and the FM's peft model that the global adapter is plugged into for evaluation
(built by :func:`fedpft_dist.federation.build.build_models`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..alignment.distill import ffn_parameter_names
from ..models.adapters import set_adapter
from ..runtime.shard import full_value


@dataclass
class Models:
    client: nn.Module               # peft model the clients train (proxy or FM)
    evaluate: nn.Module             # peft model on the FM, for plug-in evaluation
    proxy_dir: Optional[Path]       # proxy methods: the proxy the clients start from
    compressed_layers: list[int]
    client_params: int              # transformer + head parameters a client holds
    fm_params: int
    client_nonembedding_params: int = 0
    client_bytes_per_rank: int = 0  # parameter bytes of the client model one rank holds (1/G when sharded)
    fm_bytes_per_rank: int = 0      # parameter bytes of the evaluated FM one rank holds (a share when sharded)
    to_fm: Callable[[dict], dict] = lambda adapter: adapter  # client adapter -> FM module names
    # The adapter dict whose values ``evaluate`` holds (None: unknown). Global adapters are replaced,
    # never changed in place, so the same dict means the same values.
    plugged: Optional[dict] = field(default=None, repr=False)

    def plug(self, adapter: dict) -> None:
        """Put the global ``adapter`` (client module names) into the FM of plug-in evaluation, unless
        the FM holds it already."""
        if adapter is not self.plugged:
            set_adapter(self.evaluate, self.to_fm(adapter))
            self.plugged = adapter

    def clients_trained(self) -> None:
        """The clients trained: when they train the FM itself, its adapter is the last client's now."""
        if self.client is self.evaluate:
            self.plugged = None

    @property
    def client_backbone(self) -> nn.Module:
        """The client model without its peft wrapper and task head (what alignment rewrites)."""
        return self.client.get_base_model().base_model

    def proxy_ffn(self, keep: bool) -> dict[str, torch.Tensor]:
        """The compressed layers' FFN tensors of the client model, whole, in fp32 on the CPU (what a
        round checkpoint keeps of an aligned proxy). Gathered tensor by tensor from the client group
        when the model is sharded (a collective: every rank calls it); ranks that do not ``keep`` drop
        each tensor once gathered, so no rank holds them all but the one that writes them."""
        own = dict(self.client_backbone.named_parameters())
        out = {}
        for name in ffn_parameter_names(self.client_backbone, self.compressed_layers):
            value = full_value(own[name]).detach()
            if keep:
                out[name] = value.to("cpu", torch.float32, copy=True)
        return out

    @property
    def fm_backbone(self) -> nn.Module:
        """The FM of plug-in evaluation without its task head, its LoRA layers in place."""
        return self.evaluate.get_base_model().base_model

    @property
    def client_prefix(self) -> str:
        """The name under which the client's task model holds its backbone."""
        return self.client.get_base_model().base_model_prefix
