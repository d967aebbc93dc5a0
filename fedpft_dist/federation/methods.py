"""Federated methods by name: what the clients hold, which distillation builds it, what the server
does after aggregation (FedPFT: re-aligns it), and how a client adapter maps onto the FM.

Adding a method is one :func:`register` call (and its test); the engine only reads these fields.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ..alignment.stages import distilled_proxy, ensure_proxy, source_fingerprint
from ..config import Config
from ..errors import ConfigError
from ..fingerprint import distilled_fingerprint
from ..models.emulator import adapter_to_fm
from ..run_layout import RunLayout
from ..runtime import Runtime
from .run_models import Models
from .server_step import ServerStep, neuron_alignment

# What a method's clients hold instead of the FM: built (and distilled) once per run, reused after.
ClientModelStage = Callable[[Config, Runtime, RunLayout], Path]
# The fingerprint (fedpft_dist.fingerprint) that model has when it is built from the config: known
# before it is built, so resume can check a checkpoint before anything runs.
ClientFingerprint = Callable[[Config, RunLayout], dict]
# The method's step after each aggregation for a run, given its models and tokenizer; None when the
# config turns it off.
ServerStepFactory = Callable[[Config, Runtime, Models, Any], Optional[ServerStep]]


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    # None: the clients hold the FM itself. Otherwise the stage that gives the directory of the
    # model the clients hold (a proxy or an emulator); it runs on every rank.
    client_model: Optional[ClientModelStage]
    # What the server does after aggregation besides the server optimizer (federation.server_step);
    # FedPFT: neuron-level alignment of the proxy every fed.align_every rounds.
    server_step: Optional[ServerStepFactory] = None
    # Clients put attention LoRA on the compressed layers too (a proxy's compressed layers keep the
    # FM's attention); an emulator's middle layers stay frozen, as in Offsite-Tuning, where only the
    # bottom and top layers (the adapters) are tuned and plugged into the FM.
    tune_compressed: bool = True
    # Client adapter (module names of the client model) -> the FM's module names, given the client
    # model's layer_map (FM layer of each client layer) and the name of its layer list.
    to_fm: Optional[Callable[[dict, list[int], str], dict]] = None
    client_fingerprint: Optional[ClientFingerprint] = None
    # Whether the config has the clients train the layers they hold whole (those not compressed) in full,
    # without LoRA; FedOT with fed.fedot_tuning=full, as Offsite-Tuning's adapter.
    full_tuning: Callable[[Config], bool] = lambda cfg: False
    # Plug-in evaluation also scores the global adapter on the client model itself (the emulator): the
    # plug-in gap, metrics keys emulator_*.
    evaluates_client: bool = False

    @property
    def uses_proxy(self) -> bool:
        return self.client_model is not None

    @property
    def aligns(self) -> bool:
        """Whether the method re-aligns the clients' model during training."""
        return self.server_step is neuron_alignment


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError("fed.method", f"{name!r} is not available (methods: {', '.join(METHODS)})")
    return METHODS[name]


def _distilled_emulator(cfg: Config, rt: Runtime, layout: RunLayout) -> Path:
    return distilled_proxy(cfg, rt, layout, emulator=True)


def _distilled(cfg: Config, layout: RunLayout) -> dict:
    return distilled_fingerprint(cfg, source_fingerprint(cfg, layout))


def _distilled_emulator_fingerprint(cfg: Config, layout: RunLayout) -> dict:
    return distilled_fingerprint(cfg, source_fingerprint(cfg, layout, emulator=True))


register(Method("fedpft", "proxy with layer-level distillation before and neuron-level alignment during "
                          "federated training", distilled_proxy, server_step=neuron_alignment,
                client_fingerprint=_distilled))
register(Method("fedpetuning", "LoRA on the full FM at the clients", None))
register(Method("fedot", "Offsite-Tuning emulator (the FM's bottom and top layers, evenly spaced middle layers "
                         "distilled); clients tune the bottom and top layers (in full, or LoRA)", _distilled_emulator,
                tune_compressed=False, to_fm=adapter_to_fm, client_fingerprint=_distilled_emulator_fingerprint,
                full_tuning=lambda cfg: cfg.fed.fedot_tuning == "full", evaluates_client=True))
register(Method("fedpft_no_layer_distill", "fedpft without layer-level distillation", ensure_proxy,
                server_step=neuron_alignment, client_fingerprint=source_fingerprint))
register(Method("fedpft_no_neuron_distill", "fedpft without neuron-level alignment", distilled_proxy,
                client_fingerprint=_distilled))
