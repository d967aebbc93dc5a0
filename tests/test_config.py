"""Strict config: unknown keys, wrong types, ranges, missing files; every shipped YAML validates."""

import pytest

from conftest import REPO, run_cli
from fedpft_dist.config import Config, config_from_dict, config_to_dict, load_config
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
    (["doctor.local_ranks=1"], "doctor.local_ranks", "must be >= 2"),
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


# --- through the command line: exit code 2 and exactly one line on stderr ------------------------

@pytest.mark.parametrize("args, fragment", [
    (["doctor", "run.sed=1"], "run.sed: unknown config key (did you mean 'run.seed'?)"),
    (["doctor", "dist.timeout_s=soon"], "dist.timeout_s: must be a number, got 'soon'"),
    (["doctor", "--config", "/nonexistent/cfg.yaml"], "config file not found: /nonexistent/cfg.yaml"),
    (["doctor", "seed"], "override 'seed' must look like dotted.key=value"),
    (["nosuchcommand"], "invalid choice: 'nosuchcommand'"),
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
