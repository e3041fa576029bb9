"""``cggr bench``'s flags and ``Settings`` declare each setting once: every flag is a settings field (same
name, same default) or a command-line-only option, and every field is set by a flag or derived."""
import argparse
import dataclasses
import subprocess
import sys

import pytest

from cggr.bench import cli
from cggr.bench.models import PRESETS
from cggr.bench.settings import PRESET_NAMES, Settings


def _parser():
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser


def _flags():
    return {a.dest: a for a in _parser()._actions if a.dest != "help"}


def test_every_flag_is_a_setting_or_command_line_only():
    fields = {f.name for f in dataclasses.fields(Settings)}
    flags = set(_flags())
    assert flags - fields == set(cli.CLI_ONLY)
    assert fields - flags <= set(cli.DERIVED)  # a field without a flag of its name is computed
    assert set(cli.DERIVED) <= fields


def test_flag_defaults_are_the_settings_defaults():
    defaults = Settings()
    for name, action in _flags().items():
        if name in cli.CLI_ONLY or name in cli.DERIVED:
            continue
        assert action.default == getattr(defaults, name), name


def test_settings_from_args_fills_every_field(tmp_path):
    args = _parser().parse_args(["--seq-len", "17", "--lr", "0.5", "--router-layers", "3", "--prepare-only",
                                 "--cache-dir", str(tmp_path)])
    args.prepare_only = False  # build the settings without tokenizing
    args.corpus = [cli.EMBEDDED_DIR]
    make, _ = cli.settings_from_args(args, _parser(), log=lambda m: None)
    s = make("target")
    assert (s.regime, s.seq_len, s.lr, s.router_layers, s.cache_dir) == ("target", 17, 0.5, 3, str(tmp_path))
    assert "excess_lean" in s.configs


def test_preset_names_match_the_presets():
    assert tuple(PRESETS) == PRESET_NAMES


def test_help_needs_only_the_package():
    """``cggr bench --help`` imports neither the bench's machinery nor its dependencies (torch itself may
    import numpy, so numpy is not checked)."""
    code = ("import sys, cggr.cli\n"
            "try:\n    cggr.cli.main(['bench', '--help'])\nexcept SystemExit:\n    pass\n"
            "bad = [m for m in ('transformers', 'matplotlib', 'cggr.bench.runner', 'cggr.bench.data') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


@pytest.mark.parametrize("argv, message", [
    (["--model", "/no/such/folder"], "--model /no/such/folder: no such folder"),
    (["--corpus", "/no/such/corpus"], "--corpus /no/such/corpus: no such file or folder"),
    (["--token-budget", "0"], "--token-budget must be > 0"),
    (["--device", "cuda"], "--device cuda: torch sees no CUDA GPU here"),
])
def test_user_errors_are_one_line_naming_the_flag_and_write_nothing(tmp_path, capsys, argv, message):
    import torch

    from cggr.cli import main

    if argv[0] == "--device" and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--out", str(out), "--cache-dir", str(tmp_path / "cache")] + argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_every_flag_has_help():
    assert [a.dest for a in _parser()._actions if not a.help] == []
