"""Settings precedence and the example file (every setting, its default, an explanation)."""

import re
import tomllib
from pathlib import Path

import pytest

from clawrouter.config import Settings, load_settings

EXAMPLE = Path(__file__).parent.parent / "config.example.toml"


def test_example_lists_every_setting_with_an_explanation():
    text = EXAMPLE.read_text()
    for name in Settings.model_fields:
        line = re.search(rf"^#? ?{name} = .*$", text, re.M)
        assert line, f"{name} missing from config.example.toml"
        assert "#" in line.group(0).lstrip("# "), f"{name} has no explanation"


def test_example_values_are_the_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    from_file = load_settings(EXAMPLE)
    defaults = Settings()
    for name in tomllib.loads(EXAMPLE.read_text()):
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
    config.write_text('upstream_url = "http://from-file/api"\n')
    assert load_settings(config).upstream_url == "http://from-file/api"
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
