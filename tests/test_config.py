"""Strict config: unknown keys, wrong types, ranges, missing files; every shipped YAML validates."""

import pytest

from conftest import REPO, run_cli
from fedpft_dist.config import Config, config_from_dict, config_to_dict, load_config, read_yaml
from fedpft_dist.errors import ConfigError, UserError

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_defaults():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.dist.backend == "auto" and cfg.run.seed == 0


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO)) for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_there_are_configs():
    assert (REPO / "configs" / "tiny.yaml") in CONFIGS and (REPO / "configs" / "quickstart.yaml") in CONFIGS


def test_overrides_are_typed():
    cfg = load_config(None, ["run.seed=7", "dist.timeout_s=1e-1", "dist.log_all_ranks=true",
                             "run.dir=2024", "dist.backend=gloo"])
    assert cfg.run.seed == 7 and cfg.dist.timeout_s == 0.1 and cfg.dist.log_all_ranks is True
    assert cfg.run.dir == "2024" and cfg.dist.backend == "gloo"


def test_override_beats_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("run:\n  seed: 3\n  dir: a\n")
    cfg = load_config(f, ["run.seed=4"])
    assert (cfg.run.seed, cfg.run.dir) == (4, "a")


@pytest.mark.parametrize("overrides, key, fragment", [
    (["run.sed=1"], "run.sed", "did you mean 'run.seed'"),
    (["dist.timeout=5"], "dist.timeout", "did you mean 'dist.timeout_s'"),
    (["run.timeout_s=5"], "run.timeout_s", "did you mean 'dist.timeout_s'"),
    (["runn.seed=1"], "runn", "did you mean 'run"),
    (["run.seed=abc"], "run.seed", "must be an integer, got 'abc'"),
    (["run.seed=-1"], "run.seed", "must be >= 0, got -1"),
    (["dist.timeout_s=0"], "dist.timeout_s", "must be > 0, got 0.0"),
    (["dist.backend=mpi"], "dist.backend", "must be one of 'auto', 'nccl', 'gloo', got 'mpi'"),
    (["dist.log_all_ranks=3"], "dist.log_all_ranks", "must be a boolean"),
    (["doctor.local_ranks=0"], "doctor.local_ranks", "must be >= 1"),
    (["run=3"], "run", "must be a mapping"),
])
def test_bad_values_name_the_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert info.value.key == key
    assert str(info.value).startswith(key + ":")
    assert fragment in str(info.value)


def test_unknown_key_in_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("dist:\n  bakend: gloo\n")
    with pytest.raises(ConfigError, match=r"dist\.bakend: unknown config key \(did you mean 'dist\.backend'\?\)"):
        load_config(f)


@pytest.mark.parametrize("text, fragment", [("- a\n- b\n", "top level must be a mapping"),
                                            ("run: [\n", "not valid YAML")])
def test_malformed_files(tmp_path, text, fragment):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(UserError, match=fragment):
        load_config(f)


def test_missing_file():
    with pytest.raises(UserError, match="config file not found"):
        load_config("/nonexistent/x.yaml")


def test_override_syntax():
    with pytest.raises(UserError, match="dotted.key=value"):
        load_config(None, ["run.seed"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(None, ["run.seed=1", "run.seed.x=2"])


def test_every_option_is_documented():
    import dataclasses
    import typing

    def walk(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from walk(hints[f.name], f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}", f.metadata.get("help")

    keys = list(walk(Config))
    assert len(keys) > 60
    for key, help_text in keys:
        assert help_text, f"{key} has no help text"


# --- what the fingerprints hold, as the fields declare it ---------------------------------------------

# A change here invalidates every stored proxy, emulator, distilled model or checkpoint that depends on
# the key: make it deliberately.
FINGERPRINT_KEYS = {
    "proxy": {"model.dtype", "proxy.keep_ratio", "proxy.keep_ratios", "proxy.retained_layers", "proxy.saliency",
              "proxy.compensate", "proxy.compensate_ridge"},
    "proxy_activation": {"proxy.calibration_chunks", "proxy.eps", "run.seed", "public_text.source",
                         "public_text.text_column", "public_text.max_length", "public_text.held_out_fraction"},
    "emulator": {"model.dtype", "fed.fedot_adapter_layers", "fed.fedot_middle_layers"},
    "distill": {"distill.steps", "distill.epoch_fraction", "distill.batch_size", "distill.lr", "distill.warmup_ratio",
                "distill.weight_decay", "distill.grad_clip", "distill.alpha", "distill.adapter_noise",
                "distill.adapter_noise_rank", "distill.jvp_weight", "distill.max_chunks", "run.seed",
                "public_text.source", "public_text.text_column", "public_text.max_length",
                "public_text.held_out_fraction"},
}
# Keys of the sections model, data, fed, proxy, distill and public_text that a run's fingerprint leaves out.
NOT_IN_RUN = {"model.path", "model.fm_sharding", "data.cache_dir", "fed.checkpoint_every", "fed.resume", "fed.stop_after",
              "fed.eval_every", "fed.eval_initial", "fed.eval_batch_size", "fed.fidelity_every",
              "fed.fidelity_transfer_steps", "fed.save_round_adapters", "fed.fidelity_examples", "fed.fidelity_batch_size",
              "fed.max_excluded_rounds", "fed.client_sharding", "fed.grad_accum", "proxy.out", "proxy.max_shard_gb",
              "proxy.batch_size", "proxy.eval_chunks", "proxy.sample_prompt", "proxy.sample_tokens", "distill.proxy",
              "distill.out", "distill.emulator_out", "distill.zero_stage", "distill.micro_batch", "distill.eval_chunks",
              "distill.checkpoint_every", "distill.log_every", "distill.resume"}


def test_fingerprint_keys_come_from_the_fields():
    from fedpft_dist.config import ARTIFACTS, config_keys
    from fedpft_dist.fingerprint import keys_shaping

    assert set(ARTIFACTS) == set(FINGERPRINT_KEYS)
    for artifact, keys in FINGERPRINT_KEYS.items():
        assert set(keys_shaping(artifact)) == keys, artifact
    sections = ("model", "data", "fed", "proxy", "distill", "public_text")
    expected = {k.key for k in config_keys() if k.section in sections} - NOT_IN_RUN | {"run.seed"}
    assert set(keys_shaping("run")) == expected


def test_overrides_may_follow_a_subcommands_options():
    from fedpft_dist.cli import parse

    args = parse(["fidelity", "run.seed=1", "--config", "configs/tiny.yaml", "--trajectory", "runs/t", "run.dir=x"])
    assert args.overrides == ["run.seed=1", "run.dir=x"] and args.trajectory == "runs/t"
    assert parse(["memory-plan", "--config", "c.yaml", "--world-size", "4", "fed.lora_r=4"]).overrides == ["fed.lora_r=4"]


def test_an_unknown_artifact_is_a_programming_error():
    from fedpft_dist.config import _opt
    from fedpft_dist.fingerprint import keys_shaping

    with pytest.raises(ValueError, match="unknown artifact"):
        keys_shaping("adapter")
    with pytest.raises(ValueError, match="unknown artifacts"):
        _opt(1, help="x", shapes=("proxi",))


# --- through the command line: exit code 2 and exactly one line on stderr ------------------------

@pytest.mark.parametrize("args, fragment", [
    (["doctor", "run.sed=1"], "run.sed: unknown config key (did you mean 'run.seed'?)"),
    (["doctor", "dist.timeout_s=soon"], "dist.timeout_s: must be a number, got 'soon'"),
    (["doctor", "--config", "/nonexistent/cfg.yaml"], "config file not found: /nonexistent/cfg.yaml"),
    (["doctor", "seed"], "override 'seed' must look like dotted.key=value"),
    (["nosuchcommand"], "invalid choice: 'nosuchcommand'"),
    (["fidelity", "--trajectory", "runs/x", "--bogus"], "unrecognized arguments: --bogus"),
    (["report", "runs/x", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_cli_user_errors(args, fragment):
    proc = run_cli(*args, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert fragment in lines[0]
    assert "Traceback" not in proc.stderr


def test_cli_help_lists_commands():
    proc = run_cli("--help", timeout=60)
    assert proc.returncode == 0
    assert "doctor" in proc.stdout


# --- extends: a config file that starts from another ---------------------------------------------

def test_extends_reads_the_base_first_and_merges_key_by_key(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.yaml").write_text("fed:\n  num_clients: 7\n  rounds: 5\nproxy:\n  retained_layers: [0, 1, 2]\n")
    (tmp_path / "sub" / "mid.yaml").write_text("extends: ../root.yaml\nfed:\n  rounds: 3\n  lr: 0.1\n"
                                               "proxy:\n  retained_layers: [0]\n")
    (tmp_path / "top.yaml").write_text("extends: sub/mid.yaml\nfed:\n  lr: 0.5\nrun:\n  seed: 2\n")
    cfg = load_config(tmp_path / "top.yaml", ["fed.rounds=4"])
    assert (cfg.fed.num_clients, cfg.fed.rounds, cfg.fed.lr, cfg.run.seed) == (7, 4, 0.5, 2)
    assert cfg.proxy.retained_layers == [0]   # a list is replaced, not merged
    assert load_config(tmp_path / "sub" / "mid.yaml").fed.rounds == 3


@pytest.mark.parametrize("files, start, message", [
    ({"a.yaml": "extends: nope.yaml\n"}, "a.yaml", "{d}/a.yaml: extends: the base config {d}/nope.yaml does not exist"),
    ({"a.yaml": "extends: a.yaml\n"}, "a.yaml",
     "{d}/a.yaml: extends: a.yaml makes a cycle of config files: {d}/a.yaml -> {d}/a.yaml"),
    ({"a.yaml": "extends: b.yaml\n", "b.yaml": "extends: ./a.yaml\nrun:\n  seed: 1\n"}, "a.yaml",
     "{d}/b.yaml: extends: ./a.yaml makes a cycle of config files: {d}/a.yaml -> {d}/b.yaml -> {d}/a.yaml"),
    ({"a.yaml": "extends: [b.yaml]\n"}, "a.yaml",
     "{d}/a.yaml: extends: must be the path of a config file (relative to this file's directory), got ['b.yaml']"),
    ({"a.yaml": "extends: b.yaml\n", "b.yaml": "# nothing\n"}, "a.yaml",
     "{d}/b.yaml: the config file is empty; to run with the defaults leave out --config, or write {{}} in it"),
])
def test_a_bad_extends_is_one_user_error_naming_the_file(tmp_path, files, start, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(UserError) as info:
        load_config(tmp_path / start)
    assert str(info.value) == message.format(d=tmp_path)


def test_a_bad_extends_through_the_cli_is_one_line(tmp_path, capsys):
    from fedpft_dist.cli import main

    (tmp_path / "a.yaml").write_text("extends: gone.yaml\n")
    assert main(["config", "--config", str(tmp_path / "a.yaml")]) == 2
    err = capsys.readouterr().err
    assert err == f"fedpft: error: {tmp_path}/a.yaml: extends: the base config {tmp_path}/gone.yaml does not exist\n"


def test_an_unknown_key_in_a_base_names_the_dotted_key(tmp_path):
    (tmp_path / "base.yaml").write_text("fed:\n  rouns: 3\n")
    (tmp_path / "a.yaml").write_text("extends: base.yaml\n")
    with pytest.raises(ConfigError, match=r"^fed\.rouns: unknown config key \(did you mean 'fed\.rounds'\?\)"):
        load_config(tmp_path / "a.yaml")


# --- fedpft config: every key with its type, default, range and help ------------------------------

def test_fedpft_config_lists_every_key_with_its_help(capsys):
    from fedpft_dist.cli import main
    from fedpft_dist.config import config_keys

    assert main(["config"]) == 0
    out = capsys.readouterr().out
    for key in config_keys():
        assert f"\n{key.key}  (" in out or out.startswith(f"{key.key}  ("), key.key
    assert 'fed.lr  (float, > 0)  default 0.0008\n    client learning rate at round 0' in out
    assert 'proxy.keep_ratio  (float, (0, 1])  default 0.25' in out
    assert 'dist.backend  ("auto" | "nccl" | "gloo")  default "auto"' in out


def test_fedpft_config_shows_the_resolved_values(capsys):
    from fedpft_dist.cli import main

    assert main(["config", "--config", str(REPO / "configs" / "tiny.yaml"), "fed.lr=0.01"]) == 0
    out = capsys.readouterr().out
    assert "fed.lr  (float, > 0)  = 0.01  * default 0.0008" in out
    assert 'run.dir  (str)  = "runs/tiny"  * default "runs/default"' in out
    assert "dist.backend  (\"auto\" | \"nccl\" | \"gloo\")  = \"auto\"\n" in out


def test_fedpft_config_markdown_is_the_reference_page(capsys):
    from fedpft_dist.cli import main
    from fedpft_dist.commands.config import config_markdown

    assert main(["config", "--markdown"]) == 0
    page = capsys.readouterr().out
    assert page == config_markdown()
    assert "| `fed.alpha` | `float` | `1.0` | > 0 | run checkpoints | Dirichlet concentration" in page
    assert "mu/2 \\* \\|theta - theta_global\\|^2" in page
    assert main(["config", "--markdown", "fed.lr=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--markdown prints the reference" in err


# --- duplicate keys, empty files, run.dir, non-finite numbers -------------------------------------

@pytest.mark.parametrize("text, message", [
    ("run:\n  seed: 1\nfed:\n  lr: 0.1\n  rounds: 2\n  # the old value\n  lr: 0.2\n",
     "key 'fed.lr' appears twice (lines 4 and 7)"),
    ("fed:\n  lr: 0.1\nrun:\n  seed: 1\nfed:\n  rounds: 3\n", "section 'fed' appears twice (lines 1 and 5)"),
    ("proxy:\n  keep_ratio: 0.5\n  retained_layers: [0]\n  keep_ratio: 0.25\n",
     "key 'proxy.keep_ratio' appears twice (lines 2 and 4)"),
    ("a:\n  b:\n    c: 1\n    d: 2\n    c: 3\n", "key 'a.b.c' appears twice (lines 3 and 5)"),
])
def test_duplicate_keys_name_the_dotted_key_and_both_lines(tmp_path, text, message):
    f = tmp_path / "x.yaml"
    f.write_text(text)
    with pytest.raises(UserError) as info:
        load_config(f)
    assert str(info.value) == f"{f}: {message}"


def test_same_key_in_two_sections_and_merge_keys_are_no_duplicates(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("fed:\n  lr: 0.1\n  rounds: 2\ndistill:\n  lr: 0.2\n")
    assert (load_config(f).fed.lr, load_config(f).distill.lr) == (0.1, 0.2)
    g = tmp_path / "merge.yaml"
    g.write_text("a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  x: 3\n")
    assert read_yaml(g) == {"a": {"x": 1, "y": 2}, "b": {"x": 3, "y": 2}}


def test_duplicate_keys_in_a_sweep_spec(tmp_path):
    from fedpft_dist.commands.sweep import load_sweep

    spec = tmp_path / "s.yaml"
    spec.write_text(f"base: {REPO / 'configs' / 'tiny.yaml'}\ngrid:\n  proxy.keep_ratio: [0.25]\n"
                    f"  proxy.keep_ratio: [0.5]\n")
    with pytest.raises(UserError) as info:
        load_sweep(spec)
    assert str(info.value) == f"{spec}: key 'grid.proxy.keep_ratio' appears twice (lines 3 and 4)"


@pytest.mark.parametrize("text", ["", "\n  \n", "# nothing set yet\n\n# still nothing\n"])
def test_empty_config_file_is_an_error(tmp_path, text):
    f = tmp_path / "empty.yaml"
    f.write_text(text)
    with pytest.raises(UserError) as info:
        load_config(f)
    assert str(info.value) == (f"{f}: the config file is empty; to run with the defaults leave out --config, "
                               f"or write {{}} in it")


def test_braces_config_means_defaults(tmp_path):
    f = tmp_path / "defaults.yaml"
    f.write_text("# defaults\n{}\n")
    assert load_config(f) == load_config()


@pytest.mark.parametrize("overrides, text", [(["run.dir="], None), (["run.dir=   "], None),
                                             ([], "run:\n  dir: ''\n"), ([], "run:\n  dir: ' '\n")])
def test_run_dir_must_not_be_empty(tmp_path, overrides, text):
    path = None
    if text is not None:
        path = tmp_path / "c.yaml"
        path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    assert info.value.key == "run.dir"
    assert str(info.value).startswith("run.dir: must be a directory path, got '")


@pytest.mark.parametrize("overrides, key, shown", [
    (["fed.lr=inf"], "fed.lr", "inf"),
    (["fed.lr=.nan"], "fed.lr", "nan"),
    (["fed.lr=nan"], "fed.lr", "nan"),
    (["fed.lr=-inf"], "fed.lr", "-inf"),
    (["fed.lr=.inf"], "fed.lr", "inf"),
    (["fed.alpha=1e999"], "fed.alpha", "inf"),
    (["fed.size_sigma=-.inf"], "fed.size_sigma", "-inf"),
    (["proxy.keep_ratios=[0.5, .nan]"], "proxy.keep_ratios[1]", "nan"),
])
def test_non_finite_floats_name_the_key(overrides, key, shown):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert info.value.key == key
    assert str(info.value) == f"{key}: must be a finite number, got {shown}"


@pytest.mark.parametrize("text, key, shown", [
    ("fed:\n  lr: .inf\n", "fed.lr", "inf"),
    ("fed:\n  lr: .NaN\n", "fed.lr", "nan"),
    ("fed:\n  lr: -inf\n", "fed.lr", "-inf"),
    ("dist:\n  timeout_s: .inf\n", "dist.timeout_s", "inf"),
    ("proxy:\n  keep_ratios: [0.5, .inf, 0.25]\n", "proxy.keep_ratios[1]", "inf"),
])
def test_non_finite_floats_in_files(tmp_path, text, key, shown):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(f)
    assert info.value.key == key
    assert str(info.value) == f"{key}: must be a finite number, got {shown}"


def test_finite_floats_still_load():
    cfg = load_config(None, ["fed.lr=1e-3", "fed.alpha=100", "proxy.keep_ratios=[0.5, 1]"])
    assert (cfg.fed.lr, cfg.fed.alpha, cfg.proxy.keep_ratios) == (1e-3, 100.0, [0.5, 1.0])


@pytest.mark.parametrize("text, args, fragment", [
    ("fed:\n  lr: 0.1\n  lr: 0.2\n", [], "key 'fed.lr' appears twice (lines 2 and 3)"),
    ("fed:\n  lr: 0.1\nfed:\n  rounds: 1\n", [], "section 'fed' appears twice (lines 1 and 3)"),
    ("# empty\n", [], "the config file is empty; to run with the defaults leave out --config, or write {} in it"),
    ("{}\n", ["run.dir="], "run.dir: must be a directory path, got ''"),
    ("{}\n", ["fed.lr=inf"], "fed.lr: must be a finite number, got inf"),
    ("fed:\n  lr: .nan\n", [], "fed.lr: must be a finite number, got nan"),
])
def test_cli_config_mistakes_are_one_line(tmp_path, capsys, text, args, fragment):
    from fedpft_dist.cli import main

    f = tmp_path / "c.yaml"
    f.write_text(text)
    assert main(["doctor", "--config", str(f), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fedpft: error: ") and fragment in err
    assert "Traceback" not in err
