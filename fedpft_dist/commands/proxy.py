"""``fedpft proxy``: build and save the proxy of the FM (Stage 1), print how close it is to the FM."""
from __future__ import annotations

import os

from ..alignment.stages import build_proxy_artifact
from ..config import Config, write_resolved_config
from ..errors import UserError
from ..run_layout import RunLayout
from ..runtime import detect_launch
from .ownership import owning_run_dir


def run_proxy(cfg: Config) -> int:
    """Build the proxy of ``cfg`` in this one process and print its report."""
    if detect_launch(os.environ).distributed:
        raise UserError("fedpft proxy runs as one process: start it without torchrun/srun/mpirun")
    with owning_run_dir(cfg, "proxy"):
        write_resolved_config(cfg)
        report = build_proxy_artifact(cfg, RunLayout.from_config(cfg))
    print(format_report(report), flush=True)
    return 0


def format_report(r: dict) -> str:
    lines = [
        f"proxy of {r['model_type']} ({r['family']}, {r['num_layers']} layers) saved to {r['proxy_dir']}",
        f"  retained layers {r['retained_layers']}, others keep {r['keep_ratio']:g} of their FFN "
        f"(saliency: {r['saliency']}{'; output projections refitted' if r.get('compensated') else ''})",
        f"  parameters: FM {r['fm_params']:,}  proxy {r['proxy_params']:,}  ({100 * r['param_ratio']:.1f}%)",
        f"  hidden-state relative error on {r['held_out_chunks']} held-out chunks: mean over layers "
        f"{r['hidden_error_mean']:.4f}, last layer {r['hidden_error_last']:.4f}",
    ]
    if "held_out_loss_proxy" in r:
        lines.append(f"  held-out next-token loss: FM {r['held_out_loss_fm']:.4f}, proxy {r['held_out_loss_proxy']:.4f} nats")
    if "sample_proxy" in r:
        lines.append(f"  FM    > {r['sample_prompt']}{r['sample_fm']!r}")
        lines.append(f"  proxy > {r['sample_prompt']}{r['sample_proxy']!r}")
    if r.get("host_peak_bytes") is not None:
        # the FM is read one layer at a time (the emulator's report has no such figure)
        lines.append(f"  host memory: peak {r['host_peak_bytes'] / 1e6:,.0f} MB over the start; the FM's files are "
                     f"{r['fm_bytes_read'] / 1e6:,.0f} MB, read one layer at a time")
    lines.append(f"  ({r['seconds']:.1f} s)")
    return "\n".join(lines)
