"""Settings from a TOML file, the environment and the command line, in one order.

In-process: the parser ``bitchat`` builds, and the loader it feeds. The
subprocess tests are in ``test_cli_config.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from bitchat import ConfigError, Settings
from bitchat.cli import build_parser
from bitchat.cli.options import settings_from_args
from bitchat.cli.router_cmd import DEFAULTS as ROUTER_DEFAULTS
from bitchat.config import (
    README_END,
    README_START,
    Loaded,
    load_settings,
    markdown_table,
    read_file,
    to_toml,
    toml_value,
)
from bitchat.settings import FIELDS, KINDS, default, docs, env_name, kind, option_names, spec

README = Path(__file__).resolve().parent.parent / "README.md"
CONFIG_ONLY = ("extra", "webhooks")
"""Tables of the config file, with no option nor environment variable."""
NAMES = [name for name in FIELDS if name not in CONFIG_ONLY]


def load(
    argv: list[str], environ: dict[str, str] | None = None, config: str | None = None
) -> Loaded:
    """What ``bitchat ARGV`` runs with, given ``environ`` (nothing else of ours)."""
    if config is not None:
        argv = [argv[0], "--config", config, *argv[1:]]
    args = build_parser().parse_args(argv)
    defaults = ROUTER_DEFAULTS if argv[0] == "router" else None
    return settings_from_args(args, environ=environ or {}, defaults=defaults)


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


# -- the fields ---------------------------------------------------------------------------


def test_every_field_has_a_doc_a_known_type_and_an_allowed_default() -> None:
    Settings().validate()
    assert set(docs()) == set(FIELDS)
    for name, f in FIELDS.items():
        assert docs()[name].endswith("."), name
        assert name == "extra" or str(f.type) in KINDS, (name, f.type)
        assert name in CONFIG_ONLY or spec(name).commands, f"{name} is an option of no command"
    # A class attribute is still the default (bitchat code reads Settings.redis_prefix).
    assert Settings.redis_prefix == "bitchat:" and Settings.max_frame_size == 1 << 20


def test_each_option_help_is_its_field_doc() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    seen = set()
    for command, p in sub.choices.items():
        for action in p._actions:
            generated = action.default is argparse.SUPPRESS and action.dest in FIELDS
            if generated and action.option_strings[0] == option_names(action.dest)[0]:
                assert action.help is not None
                assert action.help.startswith(docs()[action.dest].replace("``", "")), action.help
                seen.add((command, action.dest))
    for name in NAMES:
        for command in spec(name).commands:
            assert (command, name) in seen


# -- precedence -----------------------------------------------------------------------------


def _three(name: str) -> list[Any]:
    """Three allowed values for field ``name``, each unlike the one before."""
    d, s, k = default(name), spec(name), kind(name)
    if s.choices:
        other = next(c for c in s.choices if c != d)
        return [other, d, other]
    if k is bool:
        return [not d, d, not d]
    if name == "webhook_urls":
        return [
            ("http://file.test/h",),
            ("http://env.test/h", "https://env.test/2"),
            ("http://cli.test/h",),
        ]
    if name == "file_types":
        return [("text/plain",), ("image/png", "image/jpeg"), ("application/pdf",)]
    if name == "webhook_events":
        return [("user.online",), ("user.offline", "message.stored"), ("group.member_added",)]
    if k is str:
        return [f"{name}-file", f"{name}-env", f"{name}-cli"]
    if k is dict:  # api_keys
        return [{w: {"key": f"{w}-key-0123456789", "scopes": []}} for w in ("file", "env", "cli")]
    return [d + k(1), d + k(2), d + k(3)]


def _text(value: Any) -> str:
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, tuple):
        return ",".join(value)
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _cli(name: str, value: Any) -> list[str]:
    if isinstance(value, bool):
        return [f"--{'' if value else 'no-'}{name.replace('_', '-')}"]
    return [option_names(name)[0], _text(value)]


@pytest.mark.parametrize("name", NAMES)
def test_command_line_over_environment_over_file_over_default(name: str, tmp_path: Path) -> None:
    command = spec(name).commands[0]
    in_file, in_env, on_line = _three(name)
    # What some fields need beside them to be valid: a TLS pair, cluster mode's backends.
    companions = {"tls_cert": "tls_key", "tls_key": "tls_cert", "webhook_urls": "webhook_secret"}
    file_lines = [f"{name} = {toml_value(in_file)}"]
    if name in companions:
        file_lines.append(f'{companions[name]} = "x"')
    if name == "mode":
        file_lines += ['redis_url = "redis://r"', 'pg_dsn = "postgresql://p"', "node_id = 1"]
    config = write(tmp_path / "bitchat.toml", "\n".join(file_lines) + "\n")
    environ = {env_name(name): _text(in_env), "BITCHAT_TEST_ANYTHING": "ignored"}
    command_default = (ROUTER_DEFAULTS if command == "router" else {}).get(name, default(name))

    assert getattr(load([command]).settings, name) == command_default
    loaded = load([command], config=config)
    assert getattr(loaded.settings, name) == in_file
    assert loaded.origins[name] == f"{config}: {name}"
    loaded = load([command], environ, config=config)
    assert getattr(loaded.settings, name) == in_env
    assert loaded.origins[name] == f"environment {env_name(name)}"
    loaded = load([command, *_cli(name, on_line)], environ, config=config)
    assert getattr(loaded.settings, name) == on_line
    assert loaded.origins[name] == _cli(name, on_line)[0]
    assert type(getattr(loaded.settings, name)) is kind(name)


def test_the_old_option_names_still_work() -> None:
    s = load(["server", "--idle-timeout", "3", "--workers", "2", "--no-auto-register"]).settings
    assert (s.read_idle_timeout, s.worker_threads, s.auto_register) == (3.0, 2, False)
    # The README's cluster node, word for word.
    line = (
        "server --cluster --redis redis://127.0.0.1:6379/0 --pg "
        "postgresql://postgres@127.0.0.1:5432/bitchat --node-id 1 --host 127.0.0.1 --port 8871 "
        "--redis-prefix test: --node-ttl 2.5 --advertise 10.0.0.1:8871 --tls-cert c --tls-key k "
        "--max-frame-size 100 --max-message-length 10 --max-group-size 3 --rate-limit 0 "
        "--rate-burst 5 --admin-token t --data-dir d"
    )
    loaded = load(line.split())
    s = loaded.settings
    assert (s.mode, s.redis_url, s.pg_dsn, s.node_id) == (
        "cluster",
        "redis://127.0.0.1:6379/0",
        "postgresql://postgres@127.0.0.1:5432/bitchat",
        1,
    )
    assert (s.host, s.port, s.redis_prefix, s.node_ttl, s.advertise) == (
        "127.0.0.1",
        8871,
        "test:",
        2.5,
        "10.0.0.1:8871",
    )
    assert (s.tls_cert, s.tls_key, s.admin_token, s.data_dir) == ("c", "k", "t", "d")
    assert (s.max_frame_size, s.max_message_length, s.max_group_size) == (100, 10, 3)
    assert (s.rate_limit, s.rate_burst) == (0.0, 5)
    assert loaded.origins["mode"] == "--cluster" and loaded.origins["redis_url"] == "--redis"
    router = load(["router", "--policy", "round-robin", "--idle-timeout", "4"]).settings
    assert (router.router_policy, router.read_idle_timeout) == ("round_robin", 4.0)
    assert (router.port, router.redis_url) == (8870, "redis://127.0.0.1:6379/0")
    client = build_parser().parse_args(["client", "--host", "::1", "--port", "9000"])
    assert (client.host, client.port) == ("::1", 9000)  # the server to reach: no setting


def test_the_router_and_the_client_read_the_file_and_the_environment(tmp_path: Path) -> None:
    config = write(
        tmp_path / "c.toml",
        'router_policy = "round_robin"\nrequest_timeout = 2.5\nport = 9001\nmax_group_size = 7\n',
    )
    env = {"BITCHAT_HEARTBEAT_INTERVAL": "0.5", "BITCHAT_REDIS_PREFIX": "x:"}
    router = load(["router"], env, config=config).settings
    assert (router.router_policy, router.port, router.redis_prefix) == ("round_robin", 9001, "x:")
    client = load(["client", "--connect-timeout", "1"], env, config=config).settings
    assert (client.request_timeout, client.heartbeat_interval) == (2.5, 0.5)
    # A setting no option of the command takes is still read (one file for all).
    assert (client.connect_timeout, client.max_group_size) == (1.0, 7)


def test_an_empty_environment_value_unsets_an_optional_setting(tmp_path: Path) -> None:
    config = write(tmp_path / "f.toml", 'admin_token = "secret"\n')
    assert load(["server"], config=config).settings.admin_token == "secret"
    assert load(["server"], {"BITCHAT_ADMIN_TOKEN": ""}, config=config).settings.admin_token is None
    assert (
        load(["server", "--admin-token", "cli"], {"BITCHAT_ADMIN_TOKEN": ""}).settings.admin_token
        == "cli"
    )


@pytest.mark.parametrize(
    ("text", "value"),
    [("1", True), ("true", True), ("Yes", True), ("on", True), ("0", False), ("off", False)],
)
def test_booleans_in_the_environment(text: str, value: bool) -> None:
    assert load(["server"], {"BITCHAT_AUTO_REGISTER": text}).settings.auto_register is value


def test_a_number_setting_takes_a_toml_integer(tmp_path: Path) -> None:
    config = write(tmp_path / "f.toml", "rate_limit = 20\n")
    rate = load(["server"], config=config).settings.rate_limit
    assert rate == 20.0 and type(rate) is float


def test_extra_comes_from_the_files_extra_table(tmp_path: Path) -> None:
    config = write(tmp_path / "f.toml", '[extra]\nmotd = "hi"\nlimits = { a = 1 }\n')
    assert load(["server"], config=config).settings.extra == {"motd": "hi", "limits": {"a": 1}}


# -- errors ---------------------------------------------------------------------------------


def _error(
    argv: list[str], environ: dict[str, str] | None = None, config: str | None = None
) -> str:
    with pytest.raises(ConfigError) as info:
        load(argv, environ, config)
    return str(info.value)


def test_an_unknown_key_in_the_file_is_an_error_naming_it(tmp_path: Path) -> None:
    config = write(tmp_path / "bitchat.toml", "port = 9000\nmax_mesage_length = 2000\n")
    assert _error(["server"], config=config) == (
        f"{config}: max_mesage_length: unknown setting (did you mean max_message_length?)"
    )
    config = write(tmp_path / "bitchat.toml", "[server]\nport = 9000\n")
    assert _error(["server"], config=config) == f"{config}: server: unknown setting"


def test_an_unknown_bitchat_variable_is_an_error_naming_it() -> None:
    assert _error(["server"], {"BITCHAT_MAX_MESAGE_LENGTH": "3"}) == (
        "environment BITCHAT_MAX_MESAGE_LENGTH: unknown setting "
        "(did you mean BITCHAT_MAX_MESSAGE_LENGTH?)"
    )
    assert _error(["client"], {"BITCHAT_EXTRA": "{}"}) == (
        "environment BITCHAT_EXTRA: extra is set in the config file only"
    )
    # The test suite's own variables, and other programs' ones, are let through.
    load(["server"], {"BITCHAT_TEST_REDIS": "redis://x", "BITCHATTY": "1", "PATH": "/bin"})


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('max_message_length = "abc"', 'max_message_length: expected an integer >= 1, got "abc"'),
        ("max_message_length = true", "max_message_length: expected an integer >= 1, got true"),
        ("max_message_length = 0", "max_message_length: expected an integer >= 1, got 0"),
        ("port = 1.5", "port: expected an integer from 0 to 65535, got 1.5"),
        ("port = 65536", "port: expected an integer from 0 to 65535, got 65536"),
        ("auto_register = 1", "auto_register: expected true or false, got 1"),
        ("rate_limit = -1", "rate_limit: expected a number >= 0, got -1.0"),
        ("node_ttl = 0", "node_ttl: expected a number > 0, got 0.0"),
        ("read_idle_timeout = inf", "read_idle_timeout: expected a number >= 0, got inf"),
        ("node_id = 1024", "node_id: expected an integer from 0 to 1023, got 1024"),
        ('mode = "clustr"', 'mode: expected one of standalone, cluster, got "clustr"'),
        ("host = 1", "host: expected a string, got 1"),
        ("admin_token = [1]", "admin_token: expected a string, got an array"),
        ("extra = 5", "extra: expected a table, got 5"),
    ],
)
def test_a_bad_value_in_the_file_names_the_file_and_key(
    tmp_path: Path, toml: str, message: str
) -> None:
    config = write(tmp_path / "bitchat.toml", toml + "\n")
    assert _error(["server"], config=config) == f"{config}: {message}"


@pytest.mark.parametrize(
    ("var", "text", "message"),
    [
        ("BITCHAT_RATE_LIMIT", "abc", 'expected a number >= 0, got "abc"'),
        ("BITCHAT_RATE_LIMIT", "nan", "expected a number >= 0, got nan"),
        ("BITCHAT_PORT", "70000", "expected an integer from 0 to 65535, got 70000"),
        ("BITCHAT_MAX_FRAME_SIZE", "1.5", 'expected an integer from 1 to 4294967295, got "1.5"'),
        ("BITCHAT_AUTO_REGISTER", "maybe", 'expected true or false, got "maybe"'),
        (
            "BITCHAT_ROUTER_POLICY",
            "random",
            'expected one of least_connections, round_robin, got "random"',
        ),
        ("BITCHAT_NODE_ID", "", 'expected an integer from 0 to 1023, got ""'),
    ],
)
def test_a_bad_value_in_the_environment_names_the_variable(
    var: str, text: str, message: str
) -> None:
    assert _error(["server"], {var: text}) == f"environment {var}: {message}"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "70000"], "--port: expected an integer from 0 to 65535, got 70000"),
        (["--port", "http"], '--port: expected an integer from 0 to 65535, got "http"'),
        (
            ["--max-frame-size", "0"],
            "--max-frame-size: expected an integer from 1 to 4294967295, got 0",
        ),
        (["--idle-timeout", "-1"], "--idle-timeout: expected a number >= 0, got -1.0"),
        (["--workers", "0"], "--workers: expected an integer >= 1, got 0"),
        (["--mode", "clustr"], '--mode: expected one of standalone, cluster, got "clustr"'),
        (["--node-id", "1024"], "--node-id: expected an integer from 0 to 1023, got 1024"),
        (
            ["--write-low-water", "300000"],
            "--write-low-water: expected at most write_high_water = 262144 (default), got 300000",
        ),
        (
            ["--write-hard-limit", "1000"],
            "write_high_water: expected at most write_hard_limit = 1000 (--write-hard-limit), "
            "got 262144",
        ),
        (["--tls-cert", "c.pem"], "--tls-cert: tls_cert needs tls_key too"),
        (["--tls-key", "k.pem"], "--tls-key: tls_key needs tls_cert too"),
        (
            ["--cluster"],
            "--cluster: cluster mode needs redis_url (--redis-url, BITCHAT_REDIS_URL or the "
            "config file), e.g. redis://127.0.0.1:6379/0",
        ),
        (
            ["--cluster", "--redis", "redis://r", "--pg", "postgresql://p"],
            "--cluster: cluster mode needs node_id (--node-id, BITCHAT_NODE_ID or the config "
            "file), unique per node",
        ),
    ],
)
def test_a_bad_option_names_the_option(argv: list[str], message: str) -> None:
    assert _error(["server", *argv]) == message


def test_a_bad_value_overridden_by_a_higher_layer_is_not_used(tmp_path: Path) -> None:
    config = write(tmp_path / "f.toml", 'port = "x"\n')
    assert load(["server", "--port", "9"], {"BITCHAT_PORT": "y"}, config).settings.port == 9


def test_a_file_that_is_missing_or_not_toml_is_an_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.toml")
    assert _error(["server"], config=missing) == (
        f"{missing}: cannot read the config file: No such file or directory"
    )
    broken = write(tmp_path / "broken.toml", "port = \n")
    assert _error(["server"], config=broken).startswith(f"{broken}: not a valid TOML file: ")


def test_validate_checks_a_program_built_settings_too() -> None:
    with pytest.raises(ConfigError, match=r"^max_group_size: expected an integer >= 1, got -1$"):
        Settings(max_group_size=-1).validate()
    Settings(rate_limit=0, mode="cluster", redis_url="r", pg_dsn="p").validate()  # no origins


# -- --print-config ---------------------------------------------------------------------------


def test_print_config_reads_back_into_the_same_settings(tmp_path: Path) -> None:
    config = write(
        tmp_path / "in.toml",
        'admin_token = "quote \\" back\\\\slash\\nnew line\\ttab \\u0001 \\u007f é 🐈"\n'
        "rate_limit = 1e-5\n"
        "[extra]\n"
        'motd = "hi"\n'
        '"odd key" = [1, 2.5, "x", true]\n'
        "nested = { a = { b = 1979-05-27T07:32:00Z } }\n",
    )
    env = {"BITCHAT_MAX_MESSAGE_LENGTH": "2000", "BITCHAT_TLS_CERT": "", "BITCHAT_PORT": "0"}
    loaded = load(
        ["server", "--cluster", "--node-id", "7", "--redis", "r", "--pg", "p"], env, config
    )
    text = to_toml(loaded.settings, loaded.origins, "server")
    parsed = tomllib.loads(text)
    assert "tls_cert" not in parsed and "# tls_cert is not set" in text
    assert "max_message_length = 2000  # from environment BITCHAT_MAX_MESSAGE_LENGTH" in text
    assert "node_id = 7  # from --node-id" in text
    again = Settings(**_tuples(parsed))
    assert again == loaded.settings
    assert dataclasses.asdict(again) == dataclasses.asdict(loaded.settings)
    # And through the loader, as --config reads it.
    out = write(tmp_path / "out.toml", text)
    assert load(["server"], config=out).settings == loaded.settings


def test_print_config_of_the_defaults_is_every_field() -> None:
    parsed = tomllib.loads(to_toml(Settings()))
    unset = {name for name in NAMES if default(name) is None}
    assert set(parsed) == set(NAMES) - unset
    assert Settings(**_tuples(parsed)) == Settings()


def _tuples(parsed: dict[str, Any]) -> dict[str, Any]:
    """TOML arrays of list settings as the loader passes them: tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in parsed.items()}


# -- the README -----------------------------------------------------------------------------


def test_the_readme_settings_table_is_the_one_the_fields_give() -> None:
    text = README.read_text(encoding="utf-8")
    start, end = text.index(README_START) + len(README_START), text.index(README_END)
    assert text[start:end].strip() == markdown_table().strip(), (
        "README.md's settings table drifted from bitchat.Settings: "
        "run `PYTHONPATH=src python3 -m bitchat.config --readme README.md`"
    )


def test_the_readme_table_has_a_row_per_field() -> None:
    table = markdown_table()
    for name in FIELDS:
        assert f"| `{name}` |" in table


def test_read_file_keeps_toml_types(tmp_path: Path) -> None:
    given = read_file(write(tmp_path / "f.toml", "port = 1\n"))
    assert given["port"].value == 1 and not given["port"].text


def test_load_settings_without_sources_is_the_defaults() -> None:
    loaded = load_settings()
    assert loaded.settings == Settings() and not loaded.origins
