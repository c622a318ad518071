"""Settings precedence and the example file (every setting, its default, an explanation)."""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

from clawrouter.config import Settings, load_settings

EXAMPLE = Path(__file__).parent.parent / "config.example.toml"


def test_example_lists_every_setting_with_an_explanation():
    text = EXAMPLE.read_text()
    for name in Settings.model_fields:
        line = re.search(rf"^#? ?{name} = .*$", text, re.M)
        assert line, f"{name} missing from config.example.toml"
        assert "#" in line.group(0).lstrip("# "), f"{name} has no explanation"


def test_example_values_are_the_defaults(monkeypatch, tmp_path):
    """Every line is commented out (a copy pins no default: a release may change pay_to or
    the RPCs), and each shows the default, except for settings that have none (an example)."""
    for name in [n for n in os.environ if n.startswith(("CLAWROUTER_", "BLOCKRUN_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    text = EXAMPLE.read_text()
    assert tomllib.loads(text) == {}, "a live setting in config.example.toml"
    uncommented = tmp_path / "uncommented.toml"
    uncommented.write_text("\n".join(
        line.removeprefix("# ") for line in text.splitlines()
        if re.match(r"# \w+ = ", line) and line.split()[1] in Settings.model_fields))
    from_file = load_settings(uncommented)
    defaults = Settings()
    shown = [name for name in tomllib.loads(uncommented.read_text())
             if getattr(defaults, name) is not None]
    assert len(shown) >= len(Settings.model_fields) - 5, shown  # all but the five without one
    for name in shown:
        assert getattr(from_file, name) == getattr(defaults, name), name


def test_precedence_flags_env_file_defaults(monkeypatch, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('port = 9000\nnetwork = "base-sepolia"\nupstream_url = "http://file/api"\n'
                      "max_usd_per_day = 2.5\n")
    monkeypatch.setenv("CLAWROUTER_PORT", "9100")
    monkeypatch.setenv("BLOCKRUN_API_URL", "http://env/api/")
    s = load_settings(config)
    assert (s.port, s.network, s.upstream_url, s.max_usd_per_day) == (
        9100, "base-sepolia", "http://env/api", 2.5)
    s = load_settings(config, port=1234, upstream_url="http://flag/api")
    assert (s.port, s.upstream_url) == (1234, "http://flag/api")
    assert load_settings(config, port=None).port == 9100  # an absent flag does not override


def test_config_in_home_is_read_by_default(monkeypatch, tmp_path):
    (tmp_path / "config.toml").write_text("port = 9555\n")
    monkeypatch.setenv("CLAWROUTER_HOME", str(tmp_path))
    assert load_settings().port == 9555


@pytest.mark.parametrize("text", ["bogus = 1\n", 'network = "ethereum"\n', "port = -1\n",
                                  'pay_to = "0x123"\n',
                                  # would round to 0 micro-USDC, which means "no limit"
                                  "max_usd_per_day = 0.0000004\n",
                                  "max_usd_total = 1e-9\n", "max_usd_per_request = 1e-7\n"])
def test_bad_files_are_refused(tmp_path, text):
    config = tmp_path / "c.toml"
    config.write_text(text)
    with pytest.raises(ValueError):
        load_settings(config)


def test_a_wrong_setting_is_named_and_its_value_never_echoed(tmp_path):
    """A key under the wrong name is a secret in a config file: the refusal names the setting,
    says what is wrong and where settings come from, and prints no part of the value."""
    secret = "0x" + "ab" * 32
    config = tmp_path / "c.toml"
    config.write_text(f'private_key = "{secret}"\napi_key = 7\nport = "{secret}"\n')
    with pytest.raises(ValueError) as caught:
        load_settings(config)
    message = str(caught.value)
    assert "private_key: not a setting" in message and "port: " in message
    assert "api_key: " in message and str(config) in message
    assert "abab" not in message and "_FromFile" not in message


def test_missing_explicit_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "nope.toml")


def test_only_the_documented_environment_names_count(monkeypatch, tmp_path):
    monkeypatch.setenv("WALLET_KEY", "0x" + "11" * 32)
    monkeypatch.setenv("UPSTREAM_URL", "http://wrong/api")
    monkeypatch.setenv("PORT", "1")
    s = load_settings(home=tmp_path)
    assert s.wallet_key is None and s.upstream_url == "https://blockrun.ai/api" and s.port == 8402
    monkeypatch.setenv("BLOCKRUN_WALLET_KEY", "0x" + "22" * 32)
    assert load_settings(home=tmp_path).wallet_key.get_secret_value() == "0x" + "22" * 32
    config = tmp_path / "c.toml"
    config.write_text('upstream_url = "https://from-file/api"\n')
    assert load_settings(config).upstream_url == "https://from-file/api"
    # the prefix plus a field name pydantic-settings would also take: refused, named
    for name, meant in (("CLAWROUTER_WALLET_KEY", "BLOCKRUN_WALLET_KEY"),
                        ("CLAWROUTER_UPSTREAM_URL", "BLOCKRUN_API_URL"),
                        ("clawrouter_wallet_key", "BLOCKRUN_WALLET_KEY")):  # any case counts
        monkeypatch.setenv(name, "0x" + "33" * 32)
        with pytest.raises(ValueError, match=f"{name} is not a setting: use {meant}") as err:
            load_settings(home=tmp_path)
        assert "33" * 32 not in str(err.value)
        monkeypatch.delenv(name)


def test_blank_secrets_are_unset_and_spaces_around_them_are_not_part_of_them(monkeypatch,
                                                                               tmp_path):
    """An empty BLOCKRUN_WALLET_KEY is no key (the file is used, by every command alike); an
    API key of spaces is none (so off loopback the gateway refuses to start instead of
    locking everyone out), and one read from a CRLF file works without its `\\r`."""
    monkeypatch.setenv("BLOCKRUN_WALLET_KEY", "  ")
    monkeypatch.setenv("CLAWROUTER_API_KEY", " ")
    s = load_settings(home=tmp_path)
    assert s.wallet_key is None and s.api_key is None
    monkeypatch.setenv("CLAWROUTER_API_KEY", "s3cret\r")
    assert load_settings(home=tmp_path).api_key.get_secret_value() == "s3cret"
    from clawrouter.cli.client import auth_headers  # and the commands send it the same way
    assert auth_headers() == {"authorization": "Bearer s3cret"}
    monkeypatch.setenv("CLAWROUTER_API_KEY", " ")
    assert auth_headers() == {}


def test_each_network_has_its_own_ledger(tmp_path: Path) -> None:
    """Testnet and sandbox payments never count against mainnet's budgets or totals."""
    mainnet = Settings(home=tmp_path).ledger_path
    assert mainnet == tmp_path / "ledger.sqlite3"
    assert Settings(home=tmp_path, network="base-sepolia").ledger_path != mainnet


def test_an_empty_variable_is_unset(monkeypatch, tmp_path):
    """`CLAWROUTER_HOME=` is the default data directory, where config.toml is read from too,
    not the current directory (a wallet key in whatever folder the command ran from);
    `CLAWROUTER_HOST=` is loopback, not every interface; BLOCKRUN_* names alike."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".clawrouter").mkdir()
    (tmp_path / ".clawrouter" / "config.toml").write_text("port = 9555\n")
    for name in ("CLAWROUTER_HOME", "CLAWROUTER_HOST", "CLAWROUTER_PORT", "BLOCKRUN_API_URL",
                 "BLOCKRUN_WALLET_KEY", "CLAWROUTER_RPC_URLS"):
        monkeypatch.setenv(name, "")
    s = load_settings()
    assert s.home == tmp_path / ".clawrouter"
    assert (s.host, s.port, s.upstream_url) == ("127.0.0.1", 9555, "https://blockrun.ai/api")
    assert s.wallet_key is None and s.rpc_urls == Settings(home=tmp_path).rpc_urls


def test_a_toml_syntax_error_names_the_file_and_line(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('port = 9000\nhost = \n')
    with pytest.raises(ValueError) as caught:
        load_settings(config)
    assert str(config) in str(caught.value) and "line 2" in str(caught.value)
    config.write_bytes(b'port = 9000\nhost = "\xff"\n')  # Latin-1, say
    with pytest.raises(ValueError) as caught:
        load_settings(config)
    assert f"{config} is not UTF-8 text" in str(caught.value)


def test_a_list_setting_from_the_environment_must_be_json(monkeypatch, tmp_path):
    monkeypatch.setenv("CLAWROUTER_RPC_URLS", "http://a")
    with pytest.raises(ValueError, match=r"CLAWROUTER_RPC_URLS: expected a JSON list"):
        load_settings(home=tmp_path)
    monkeypatch.delenv("CLAWROUTER_RPC_URLS")
    monkeypatch.setenv("CLAWROUTER_ALLOWED_ROOTS", "/tmp")  # a union with None: no SettingsError
    with pytest.raises(ValueError, match=r"as CLAWROUTER_ALLOWED_ROOTS in the environment, a JSON"):
        load_settings(home=tmp_path)
    monkeypatch.delenv("CLAWROUTER_ALLOWED_ROOTS")
    monkeypatch.setenv("CLAWROUTER_RPC_URLS", '["http://a"]')
    assert load_settings(home=tmp_path).rpc_urls == ["http://a"]


@pytest.mark.parametrize("name, bad", [
    *[(name, value) for name in ("poll_deadline", "upstream_timeout", "upstream_connect_timeout",
                                 "image_ttl_days")
      for value in (0, -1, float("inf"), float("nan"))],
    ("poll_interval", 0), ("poll_interval", 0.01), ("poll_delay", -1),
    ("poll_delay", float("inf")), ("upstream_max_connections", 0),
    # 0 deleted each paid image right after delivery; inf crashed create_app (OverflowError)
    ("image_max_gb", 0), ("image_max_gb", -1),
    ("image_max_gb", float("inf")), ("image_max_gb", float("nan")), ("image_max_gb", 1e300),
    ("header_timeout", float("inf")), ("max_usd_per_day", float("inf")),
    # finite, yet infinite once turned into bytes or micro-USDC
    ("max_image_mb", 1e308), ("max_usd_per_day", 1e308), ("max_usd_per_request", 1e308),
    ("max_usd_total", 1e308), ("price_tolerance", 1e308), ("low_balance_usd", -1),
    ("coalesce_window_seconds", -1), ("price_ttl_seconds", -1),
    # under x402's 6 s every challenge would be refused; over 600, longer than BlockRun's
    ("max_timeout_seconds", 5), ("max_timeout_seconds", 601)])
def test_timings_and_store_limits_are_bounded_and_finite(tmp_path, name, bad):
    with pytest.raises(ValidationError):
        Settings(home=tmp_path, **{name: bad})


def test_an_out_of_bounds_setting_is_one_clear_cli_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLAWROUTER_", "BLOCKRUN_"))}
    run = subprocess.run([sys.executable, "-m", "clawrouter", "serve", "--no-sandbox"],
                         env={**env, "CLAWROUTER_HOME": str(tmp_path / "home"),
                              "CLAWROUTER_IMAGE_MAX_GB": "inf", "CLAWROUTER_POLL_INTERVAL": "0"},
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.startswith("clawrouter: invalid configuration: ")
    assert run.stderr.count("\n") == 1 and "image_max_gb: Input should be a finite" in run.stderr
    assert "poll_interval: Input should be greater than or equal to 0.1" in run.stderr
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize("value", [
    "images.example.com", "images.example.com:443", "/claw", "ftp://images.example.com",
    "https://user@images.example.com", "http://localhost?@evil.example",
    "http://localhost#@evil.example", "http://evil.example\\@localhost", "http://x:99999",
    "https://x.example/?", "https://x.example/#", "http://x\x00y", "http://x\x1by",
])
def test_a_public_url_must_be_an_http_base_naming_its_host(tmp_path, value):
    """It starts every image URL we hand out, and its host decides whether the gateway needs
    an API key: a value read as "no host" would have turned that check off."""
    with pytest.raises(ValueError, match="public_url"):
        load_settings(None, home=tmp_path, public_url=value)
    for good in ("https://images.example.com", "http://[::1]:9000/claw/", " http://localhost "):
        assert load_settings(None, home=tmp_path, public_url=good).public_url == good.strip()


@pytest.mark.parametrize("value", ["blockrun.ai/api", "0x" + "ab" * 32, "ftp://blockrun.ai/api",
                                   "https://user:pw@blockrun.ai/api", "http://x:99999", " "])
def test_the_upstream_must_be_an_http_base(tmp_path, value):
    """Anything else would start a gateway whose every request fails with "cannot connect",
    and `doctor` would blame the internet connection: the setting is named at once."""
    with pytest.raises(ValueError, match="upstream_url") as refused:
        load_settings(None, home=tmp_path, upstream_url=value)
    assert "pw" not in str(refused.value)
    settings = load_settings(None, home=tmp_path, upstream_url="http://127.0.0.1:8000/api/")
    assert settings.upstream_url == "http://127.0.0.1:8000/api"
