"""`medagent config example` prints a file that loads and equals the defaults; `check` reports."""

from __future__ import annotations

import json
from pathlib import Path

from medagent.cli import main
from medagent.config import load_config
from medagent.config_cli import example_toml


def test_example_loads_and_is_the_defaults(tmp_path: Path) -> None:
    example = tmp_path / "medagent.toml"
    example.write_text(example_toml())
    loaded = load_config(example, env={})
    defaults = load_config(None, env={})
    assert loaded.agent.durability == defaults.agent.durability
    assert loaded.agent.retention_days == defaults.agent.retention_days
    assert [(c.name, c.endpoint.url, c.bot) for c in loaded.channels] == [
        (c.name, c.endpoint.url, c.bot) for c in defaults.channels
    ]


def test_every_commented_channel_example_is_valid(tmp_path: Path) -> None:
    """Uncommenting a channel example from the file must give a valid configuration."""
    lines = example_toml().splitlines()
    blocks = [i for i, line in enumerate(lines) if line.startswith("# [[channel]]")]
    for start in blocks:
        block = ["[[channel]]"] + [line[2:].split("  #")[0] for line in lines[start + 1 : start + 3]]
        if not block[2].startswith("endpoint") or "serial://" in block[2]:
            continue  # serial ports name devices that do not exist on a test machine
        config = tmp_path / "one.toml"
        config.write_text("\n".join(block) + "\n")
        assert load_config(config, env={}).channels, block


def test_check_reports_a_bad_file_with_status_2(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[channel]]\nname = "x"\nendpoint = "mllp://127.0.0.1:2575?ackmode=fast"\n')
    assert main(["config", "check", str(bad), "--json"]) == 2
    document = json.loads(capsys.readouterr().out)
    assert not document["ok"] and "ackMode" in document["error"]


def test_check_accepts_the_example(tmp_path: Path, capsys) -> None:
    good = tmp_path / "good.toml"
    good.write_text(example_toml())
    assert main(["config", "check", str(good)]) == 0
    assert "ok" in capsys.readouterr().out
