"""The ``fedpft`` command (also ``python -m fedpft_dist``).

This module parses the command line and hands the result to the subcommand's handler in
:mod:`fedpft_dist.commands`. The subcommands that run a job take ``--config FILE`` and
``dotted.key=value`` overrides and write the resolved config to ``run.dir/config.yaml``. User errors
print one line and exit 2; a collective that fails or times out prints one line naming it and exits 3.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from . import __version__
from .fsutil import filesystem_error
from .errors import (EXIT_COLLECTIVE_ERROR, EXIT_PREEMPTED, EXIT_RUN_FAILED, EXIT_USER_ERROR, CollectiveError,
                     Preempted, TrainingDiverged, UserError)


# 128 + SIGPIPE, what a shell reports for a program whose reader went away
EXIT_BROKEN_PIPE = 141


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(EXIT_USER_ERROR)


@dataclass(frozen=True)
class Handler:
    """The function of ``fedpft_dist.commands.<module>`` that runs a subcommand, and where each of its
    parameters comes from: ``cfg`` is the resolved config, any other source an attribute of the parsed
    arguments. The module is imported only when its subcommand runs, so that ``fedpft --help`` and
    ``fedpft report`` do not load torch."""
    module: str
    function: str
    arguments: tuple[tuple[str, str], ...] = (("cfg", "cfg"),)

    def resolve(self) -> Callable[..., int]:
        return getattr(importlib.import_module(f"{__package__}.commands.{self.module}"), self.function)

    def __call__(self, cfg: Any, args: argparse.Namespace) -> int:
        values = {param: cfg if source == "cfg" else getattr(args, source) for param, source in self.arguments}
        return int(self.resolve()(**values) or 0)


# Subcommands that take only --config and overrides.
COMMANDS: dict[str, tuple[Handler, str]] = {
    "doctor": (Handler("doctor", "run_doctor"),
               "report the environment (torch/CUDA, NCCL/gloo, DeepSpeed, Triton, MPI, launcher variables, "
               "offline models and data) and test an all-reduce over ranks"),
    "proxy": (Handler("proxy", "run_proxy"),
              "build the proxy (sub-FM): rank FFN neurons, keep the most salient, save it in Hugging Face "
              "format with fedpft_proxy.json, report its error against the FM"),
    "distill": (Handler("distill", "run_distill"),
                "layer-level distillation of the proxy against the FM on all ranks of the job (DeepSpeed "
                "ZeRO 0-3); writes the distilled proxy and distill.json"),
    "train": (Handler("train", "run_train"),
              "federated fine-tuning (fed.method: fedpft, fedpetuning, fedot, fedpft_no_layer_distill, "
              "fedpft_no_neuron_distill): clients on every rank, one all-reduce per round, the FM evaluated "
              "with the global adapter"),
    "bench": (Handler("bench", "run_bench"),
              "time one federated workload phase by phase (round, local training tokens/s, all-reduce "
              "against a bare all-reduce of the same bytes, alignment, evaluation, activation-statistics "
              "overhead, peak memory per rank); writes bench.json"),
}

MEMORY_HELP = ("per-rank memory of client training, layer-level distillation, alignment, evaluation and the "
               "fidelity monitor for a decoder or encoder FM, computed from the model classes on the meta device (no weights "
               "are loaded); with --measured, beside a finished run's measured peaks")
MEMORY_PLAN = Handler("memory_plan", "run_memory_plan", (
    ("cfg", "cfg"), ("model_config", "model_config"), ("world_size", "world_size"), ("json_out", "json"),
    ("ranks_per_client", "ranks_per_client"), ("client_sharding", "client_sharding"), ("device_gb", "device_gb"),
    ("measured", "measured")))

REPORT_HELP = ("Markdown table (mean ± std over seeds) and PNG plots (accuracy per round, accuracy against "
               "client-side cost) of finished runs")
REPORT = Handler("report", "run_report", (("run_dirs", "runs"), ("out", "out")))

CONFIG_HELP = ("every config key with its type, default, range and help; with --config FILE or overrides, "
               "also the resolved values; --markdown prints the reference page (docs/config.md)")
CONFIG = Handler("config", "run_config", (
    ("cfg", "cfg"), ("config_file", "config"), ("overrides", "overrides"), ("markdown", "markdown")))

SWEEP_HELP = ("a grid of config overrides, one training run per point (spec: sweeps/*.yaml): list the points, "
              "print one point's train arguments (for Slurm array jobs), or train one or all of them")
SWEEP = Handler("sweep", "run_sweep", (
    ("spec", "spec"), ("index", "index"), ("list_only", "list"), ("print_only", "print"), ("run_all", "all"),
    ("nproc", "nproc"), ("out", "out"), ("extra", "extra")))


FIDELITY_HELP = ("score the client model of a config (its proxy or emulator) along a fixed adapter trajectory "
                 "(fed.save_round_adapters): LoRA gradient cosine with the FM and its bootstrap interval, the "
                 "common-layer cosine, the gradient norm ratio and the update transfer at every adapter")
FIDELITY = Handler("fidelity", "run_fidelity", (("cfg", "cfg"), ("trajectory", "trajectory"), ("json_out", "json")))


def _add_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config (defaults apply to missing keys)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. run.dir=runs/x dist.timeout_s=60")
    p.set_defaults(takes_overrides=True)


def _add_config(sub: Any) -> None:
    p = sub.add_parser("config", help=CONFIG_HELP, description=CONFIG_HELP)
    _add_config_arguments(p)
    p.add_argument("--markdown", action="store_true", help="print the reference page of every key (Markdown)")
    p.set_defaults(handler=CONFIG)


def _add_memory_plan(sub: Any) -> None:
    p = sub.add_parser("memory-plan", help=MEMORY_HELP, description=MEMORY_HELP)
    p.add_argument("--config", metavar="FILE", required=True, help="YAML config (proxy, fed, distill, data settings)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.set_defaults(takes_overrides=True)
    p.add_argument("--model-config", metavar="FILE", help="the FM's config.json (default: <model.path>/config.json)")
    p.add_argument("--world-size", type=int, default=8, metavar="N", help="ranks the FM is sharded over")
    p.add_argument("--ranks-per-client", type=int, metavar="G",
                   help="ranks that train one client together (default: the config's dist.ranks_per_client)")
    p.add_argument("--client-sharding", choices=("none", "fsdp"),
                   help="how a client group holds the proxy: whole on every rank, or FSDP2 over the group's "
                        "ranks (default: the config's fed.client_sharding, else none)")
    p.add_argument("--device-gb", type=float, default=80.0, metavar="GB",
                   help="device memory (10^9 bytes) the totals are checked against")
    p.add_argument("--json", metavar="FILE", help="also write the plan here")
    p.add_argument("--measured", metavar="RUN_DIR",
                   help="a finished run of this config (its summary.json's peak_memory_mb): each phase's "
                        "measured peak beside the planned total, and their ratio")
    p.set_defaults(handler=MEMORY_PLAN)


def _add_fidelity(sub: Any) -> None:
    p = sub.add_parser("fidelity", help=FIDELITY_HELP, description=FIDELITY_HELP)
    _add_config_arguments(p)
    p.add_argument("--trajectory", metavar="DIR", required=True,
                   help="round adapters of a run trained with fed.save_round_adapters=true (its round_adapters/)")
    p.add_argument("--json", metavar="FILE", help="where the scores go (default: <run.dir>/trajectory_fidelity.json)")
    p.set_defaults(handler=FIDELITY)


def _add_report(sub: Any) -> None:
    p = sub.add_parser("report", help=REPORT_HELP, description=REPORT_HELP)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (or folders of runs)")
    p.add_argument("--out", metavar="DIR", help="where report.md and the plots go (default: the run "
                                                "directory when there is one, else ./report)")
    p.set_defaults(handler=REPORT, config=None, overrides=[])


def _add_sweep(sub: Any) -> None:
    p = sub.add_parser("sweep", help=SWEEP_HELP, description=SWEEP_HELP)
    p.add_argument("spec", metavar="SPEC", help="sweep spec (YAML: base, out, fixed, grid)")
    p.add_argument("extra", nargs="*", metavar="KEY=VALUE", help="config overrides for every point")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--list", action="store_true", help="list the points: index, status, run dir, overrides")
    mode.add_argument("--all", action="store_true", help="train every point not done yet, one after another, "
                                                         "then write the report into the sweep's out directory")
    mode.add_argument("--index", type=int, metavar="N", help="train point N (skipped when it is done)")
    p.add_argument("--print", action="store_true", help="with --index: print the fedpft arguments of point N "
                                                        "instead of running them")
    p.add_argument("--nproc", type=int, default=1, metavar="N", help="ranks per point (N > 1: launcher/torchrun.sh)")
    p.add_argument("--out", metavar="DIR", help="put the run directories under DIR instead of the spec's out")
    p.set_defaults(handler=SWEEP, config=None, overrides=[])


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedpft", description="Distributed FedPFT: federated proxy fine-tuning of "
                                                "foundation models on clusters.")
    parser.add_argument("--version", action="version", version=f"fedpft-dist {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (handler, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_config_arguments(p)
        p.set_defaults(handler=handler)
    _add_config(sub)
    _add_memory_plan(sub)
    _add_fidelity(sub)
    _add_report(sub)
    _add_sweep(sub)
    return parser


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The parsed command line. ``KEY=VALUE`` overrides may also follow a subcommand's options
    (``fedpft fidelity --trajectory DIR run.dir=x``), where argparse alone would refuse them."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        takes = getattr(args, "takes_overrides", False)
        if not takes or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse(argv)
    try:
        from .config import load_config

        cfg = load_config(args.config, args.overrides)
        from .environment import prepare_process

        prepare_process()
        return args.handler(cfg, args)
    except UserError as exc:
        sys.stderr.write(f"fedpft: error: {exc}\n")
        return EXIT_USER_ERROR
    except BrokenPipeError:
        # The reader of stdout has gone (`fedpft config | head`): stop quietly, as a pipeline expects.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        message = filesystem_error(exc)
        if message is None:
            raise
        sys.stderr.write(f"fedpft: error: {message}\n")
        return EXIT_USER_ERROR
    except TrainingDiverged as exc:
        sys.stderr.write(f"fedpft: error: {exc}\n")
        return EXIT_RUN_FAILED
    except Preempted as exc:
        sys.stderr.write(f"fedpft: {exc}\n")
        return EXIT_PREEMPTED
    except CollectiveError as exc:
        # The process group is broken: skip interpreter teardown, whose destructors of the backend's
        # threads would abort or hang, and leave with the collective's error.
        sys.stderr.write(f"fedpft: error: {exc}\n")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(EXIT_COLLECTIVE_ERROR)
    except KeyboardInterrupt:
        sys.stderr.write("fedpft: interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
