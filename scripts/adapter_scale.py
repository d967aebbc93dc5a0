"""The scale of saved global adapters in the units of `distill.adapter_noise`.

`distill.adapter_noise = s` perturbs each tunable weight by a random rank-r matrix whose entries have
standard deviation s / sqrt(d_in). For a trained LoRA pair the same figure is
    s_eff = std(scaling * B A) * sqrt(d_in),   scaling = lora_alpha / lora_r,
so a perturbation at s_eff has the size the trajectory's adapters reach. This prints s_eff per round
(median and largest over the adapted weights) and writes them as JSON.

    python scripts/adapter_scale.py runs/fidelity/minilm-fedpetuning/round_adapters [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from safetensors.torch import load_file


def round_scales(round_dir: Path) -> dict:
    state = json.loads((round_dir / "state.json").read_text())
    scaling = state["lora_alpha"] / state["lora_r"]
    tensors = load_file(str(round_dir / "adapter.safetensors"))
    scales = {}
    for key, a in tensors.items():
        if not key.endswith("lora_A.weight"):
            continue
        b = tensors[key.replace("lora_A", "lora_B")].double()
        delta = scaling * (b @ a.double())
        scales[key[: -len(".lora_A.weight")]] = delta.std().item() * a.shape[1] ** 0.5
    values = sorted(scales.values())
    return {"round": state["round"], "weights": len(values), "median": statistics.median(values),
            "max": values[-1], "per_weight": scales}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("round_adapters", type=Path, help="a run's round_adapters directory")
    parser.add_argument("--json", type=Path, help="write every round's figures here")
    args = parser.parse_args()
    rounds = sorted(p for p in args.round_adapters.glob("round-*") if (p / "state.json").is_file())
    if not rounds:
        raise SystemExit(f"no round-* directories with a state.json in {args.round_adapters}")
    out = [round_scales(r) for r in rounds]
    print(f"{'round':>5}  {'weights':>7}  {'median s_eff':>12}  {'max s_eff':>9}")
    for r in out:
        print(f"{r['round']:>5}  {r['weights']:>7}  {r['median']:>12.4f}  {r['max']:>9.4f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
