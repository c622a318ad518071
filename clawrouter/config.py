"""Settings: CLI flags > environment > TOML file > defaults (pydantic-settings).

Every setting is `CLAWROUTER_<NAME>` in the environment and `<name>` in the TOML file, except
the two BlockRun already defines: `BLOCKRUN_API_URL` and `BLOCKRUN_WALLET_KEY`.
`config.example.toml` lists them all; `tests/test_config.py` keeps the two in step.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import sys
import tempfile
import threading
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    Field, PrivateAttr, SecretStr, ValidationError, field_validator, model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

BLOCKRUN_PAYEE = "0xe9030014F5DAe217d0A152f02A043567b16c1aBf"
DEFAULT_UPSTREAM = "https://blockrun.ai/api"


def default_home() -> Path:
    return Path(os.environ.get("CLAWROUTER_HOME") or "~/.clawrouter").expanduser()


class Settings(BaseSettings):
    # hide_input_in_errors: a secret under a wrong name (`private_key = "0x…"`) must not be
    # echoed by the error that rejects it. env_ignore_empty: `CLAWROUTER_HOME=` is unset, as
    # `default_home` has it (else the data directory, wallet key included, would be the current
    # directory while config.toml is read from ~/.clawrouter); BLOCKRUN_* names alike.
    # allow_inf_nan=False: no setting means anything at inf or nan (image_max_gb=inf crashed).
    model_config = SettingsConfigDict(
        env_prefix="CLAWROUTER_", populate_by_name=True, extra="forbid",
        validate_default=True, hide_input_in_errors=True, env_ignore_empty=True,
        allow_inf_nan=False)

    # --- server -----------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8402, ge=0, le=65535)
    home: Path = Field(default_factory=default_home)
    public_url: str | None = None
    api_key: SecretStr | None = None
    # seconds a client has to send a request's headers (408), and the window over which a body
    # must arrive, and an answer be read, at 16 KB/s at least (408; a slow reader is dropped)
    header_timeout: float = Field(30.0, gt=0)
    # seconds stopping (Ctrl-C, SIGTERM) waits for the requests under way, signing no new
    # payment, before it cuts them off: long enough for a paid image to arrive and be stored,
    # not for a slow job to be polled to its end (a second signal cuts them at once)
    shutdown_grace_seconds: float = Field(30.0, ge=0)

    # --- upstream ---------------------------------------------------------------------------
    # One alias each: an alias is also an environment name, so "upstream_url" here would make a
    # bare UPSTREAM_URL variable count (populate_by_name keeps the field name for TOML and flags).
    upstream_url: str = Field(DEFAULT_UPSTREAM, validation_alias="BLOCKRUN_API_URL")
    sandbox: bool | Literal["auto"] = "auto"
    upstream_connect_timeout: float = Field(5.0, gt=0)
    upstream_timeout: float = Field(200.0, gt=0)
    upstream_max_connections: int = Field(256, ge=1)  # (aiohttp takes 0 as "no limit")
    poll_delay: float = Field(2.0, ge=0)
    poll_interval: float = Field(3.0, ge=0.1)  # below, a job is polled in a tight loop
    poll_deadline: float = Field(300.0, gt=0)

    # --- payment ----------------------------------------------------------------------------
    wallet_key: SecretStr | None = Field(None, validation_alias="BLOCKRUN_WALLET_KEY")
    network: Literal["base", "base-sepolia"] = "base"
    pay_to: str = Field(BLOCKRUN_PAYEE, pattern=r"^0x[0-9a-fA-F]{40}$")
    price_tolerance: float = Field(1.5, ge=1.0, le=10.0)
    # dollars are kept in micro-USDC integers: at most a million dollars, so they stay numbers
    max_usd_per_request: float = Field(1.00, gt=0, le=1_000_000)
    max_usd_per_day: float = Field(5.00, ge=0, le=1_000_000)
    max_usd_per_month: float = Field(0.0, ge=0, le=1_000_000)
    max_usd_total: float = Field(0.0, ge=0, le=1_000_000)
    # (facilitators refuse an authorization that ends within 6 s: `policy.MIN_TIMEOUT_SECONDS`)
    max_timeout_seconds: int = Field(600, ge=6, le=600)
    preauth: bool = True
    price_ttl_seconds: float = Field(3600.0, ge=0)
    coalesce_window_seconds: float = Field(60.0, ge=0)
    rpc_urls: list[str] = ["https://mainnet.base.org", "https://base.publicnode.com"]
    low_balance_usd: float = Field(1.0, ge=0, le=1_000_000)
    reconcile_interval: float = Field(60.0, ge=0)

    # --- inputs -----------------------------------------------------------------------------
    max_image_mb: float = Field(20.0, gt=0, le=1024)  # a request body may be 4× this
    allowed_roots: list[Path] | None = None
    allow_local_files: bool | None = None
    allow_private_urls: bool = False

    # --- results ----------------------------------------------------------------------------
    # "auto": OpenAI's gpt-image names get b64_json (as from OpenAI), every other name url
    response_format: Literal["auto", "url", "b64_json"] = "auto"
    image_ttl_days: float = Field(30.0, gt=0)
    # > 0 (a tiny cap evicts each paid image right after delivery); at most a petabyte (its
    # size in bytes must stay a number)
    image_max_gb: float = Field(2.0, gt=0, le=1_000_000)

    # --- logs -------------------------------------------------------------------------------
    log_prompts: bool = False
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    #: the TOML file these settings were read from, if any (`load_settings`): named in messages
    _config_file: Path | None = PrivateAttr(None)

    @field_validator("api_key", "wallet_key")
    @classmethod
    def _blank_is_unset(cls, value: SecretStr | None) -> SecretStr | None:
        """A secret of only spaces is unset (an empty variable); spaces around one (a CRLF env
        file's `\r`) are not part of it: clients' keys are compared stripped too."""
        if value is None:
            return None
        text = value.get_secret_value().strip()
        return SecretStr(text) if text else None

    @field_validator("upstream_url")
    @classmethod
    def _upstream_base(cls, value: str) -> str:
        """An http(s) base like `https://blockrun.ai/api`: anything else would start as a
        gateway whose every request fails with "cannot connect"."""
        base = _http_base(value)
        if base is None:
            raise ValueError("must be an http(s) URL, like https://blockrun.ai/api")
        return base.rstrip("/")

    @model_validator(mode="after")
    def _encrypted_on_mainnet(self) -> Settings:
        """Every paid request carries a payment header anyone could settle: on Base mainnet it
        never crosses a network in clear text. Plain http stays for loopback (the sandbox, a
        local proxy), which never leaves this machine, and for the testnet."""
        parts = urlsplit(self.upstream_url)
        if (self.network == "base" and parts.scheme == "http"
                and not is_loopback_host(parts.hostname or "")):
            raise ValueError(
                "upstream_url (BLOCKRUN_API_URL, --upstream) is plain http:// to another "
                "machine, which would send every payment unencrypted on Base mainnet: use "
                "https://, an address on this machine (127.0.0.1, localhost) for a local "
                'proxy, or network = "base-sepolia" for a test upstream')
        return self

    @field_validator("public_url")
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        """An http(s) base, `https://host[:port][/path]`: it starts every image URL we hand
        out, and its host decides whether the gateway is `exposed` (so it needs a key); a
        value without a scheme would read as no host at all."""
        return _http_base(value)

    @field_validator("max_usd_per_request", "max_usd_per_day", "max_usd_per_month",
                     "max_usd_total")
    @classmethod
    def _whole_micro_usdc(cls, value: float) -> float:
        # limits are kept in micro-USDC, where a positive limit rounding to 0 would mean none
        if 0 < value < 0.000001:
            raise ValueError("must be 0 (no limit) or at least 0.000001 (one micro-USDC)")
        return value

    @field_validator("home", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)

    # --- derived ----------------------------------------------------------------------------
    @property
    def wallet_key_source(self) -> str:
        """Where `wallet_key` was set, for messages about it (never the key): a bad key in
        config.toml must not be blamed on an environment variable nobody set."""
        key = self.wallet_key.get_secret_value() if self.wallet_key else None
        if key and any(name.upper() == "BLOCKRUN_WALLET_KEY" and value.strip() == key
                       for name, value in os.environ.items()):
            return "BLOCKRUN_WALLET_KEY"
        where = f" in {self._config_file}" if self._config_file else ""
        return f"the wallet_key setting{where}"

    @property
    def loopback(self) -> bool:
        return is_loopback_host(self.host)

    @property
    def url(self) -> str:
        """Where a client on this machine reaches the gateway these settings run (`serve`):
        the command-line tools look there first, as `clawrouter stats` does."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        return f"http://{url_host(host)}:{self.port}"

    @property
    def exposed(self) -> bool:
        """Whether others may reach the gateway: it listens beyond loopback, or `public_url`
        names another host (a reverse proxy hands that name's requests to our loopback port).
        Either way it needs an API key, and local-file inputs are off unless turned on."""
        public = urlsplit(self.public_url).netloc if self.public_url else ""
        return not self.loopback or bool(public and not is_loopback_authority(public))

    @property
    def local_files_allowed(self) -> bool:
        return not self.exposed if self.allow_local_files is None else self.allow_local_files

    @property
    def roots(self) -> list[Path]:
        roots = ([Path.home(), Path(tempfile.gettempdir())] if self.allowed_roots is None
                 else self.allowed_roots)  # [] is no folder at all, not the default
        return [Path(r).expanduser().resolve() for r in roots]

    @property
    def images_dir(self) -> Path:
        return self.home / "images"

    @property
    def ledger_path(self) -> Path:
        """One ledger per network, so testnet and sandbox payments never mix with real ones."""
        return self.ledger_path_for(self.network)

    def ledger_path_for(self, network: str) -> Path:
        """The data directory's ledger for `network` (a key of NETWORKS)."""
        suffix = "" if network == "base" else f"-{network}"
        return self.home / f"ledger{suffix}.sqlite3"

    @property
    def max_image_bytes(self) -> int:
        return int(self.max_image_mb * 1024 * 1024)


def url_host(host: str) -> str:
    """`host` as a URL names it: an IPv6 address in brackets (`http://[::]:8402`)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


_AUTHORITY = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?")


def is_loopback_authority(authority: str) -> bool:
    """Whether a Host header (`name[:port]` or `[v6][:port]`, nothing else: it goes into the
    URLs we hand out) names this machine's loopback, `*.localhost` included (RFC 6761: never
    resolved by outside DNS)."""
    match = _AUTHORITY.fullmatch(authority)
    if match is None:
        return False
    name = match.group(1).strip("[]").rstrip(".").lower()
    return is_loopback_host(name) or name.endswith(".localhost")


def is_loopback_host(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Build settings; `overrides` are CLI flags (None means "not given").

    The file is `config_file` (`--config`), else `CLAWROUTER_CONFIG`, else config.toml in the
    data directory: the variable names one file for every command and the gateways they start
    (an agent's MCP config sets it once), where `--config` exists only on a command line."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    home = Path(overrides.get("home") or default_home()).expanduser()
    named = "" if config_file else " (named by CLAWROUTER_CONFIG or --config)"
    config_file = config_file or os.environ.get("CLAWROUTER_CONFIG") or None  # "" is unset
    path = Path(config_file).expanduser() if config_file else home / "config.toml"
    if config_file and not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}{named}")

    class _FromFile(Settings):
        model_config = SettingsConfigDict(toml_file=path if path.is_file() else None)

    for name in os.environ:  # pydantic-settings would take them (prefix + field name, any case)
        if (meant := _NOT_READ.get(name.upper())) is not None:
            raise ValueError(f"{name} is not a setting: use {meant}")
    warn_unknown_variables()
    try:
        settings = _FromFile(**overrides)
    except ValidationError as exc:
        raise ValueError(_explain(exc, path)) from None
    except tomllib.TOMLDecodeError as exc:  # says the line, not the file
        raise ValueError(f"{path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # says the byte, not the file
        raise ValueError(f"{path} is not UTF-8 text (byte {exc.start} is not)") from None
    except SettingsError as exc:  # says the field, not what it expected
        raise ValueError(_explain_source(exc)) from None
    if path.is_file():
        settings._config_file = path
    return settings


#: field names under the prefix that the settings would read but are named otherwise
_NOT_READ = {"CLAWROUTER_WALLET_KEY": "BLOCKRUN_WALLET_KEY",
             "CLAWROUTER_UPSTREAM_URL": "BLOCKRUN_API_URL"}

#: CLAWROUTER_* variables that are read, but not as settings: the tools' gateway and output
#: folder (cli/client.py), the settings file (`load_settings`), the wallet locks (walletlock.py)
OTHER_VARIABLES = frozenset({"CLAWROUTER_URL", "CLAWROUTER_OUT", "CLAWROUTER_CONFIG",
                             "CLAWROUTER_WALLET_LOCKS"})

_warned: set[str] = set()  # variables already warned about by this process
_warned_lock = threading.Lock()  # (settings are loaded from worker threads too)


def variable_names() -> dict[str, str]:
    """Every variable we read, by the part a misspelling of it shares with `CLAWROUTER_*`:
    `MAX_USD_PER_DAY` for CLAWROUTER_MAX_USD_PER_DAY, `API_URL` for BLOCKRUN_API_URL."""
    names = {(field.validation_alias or f"CLAWROUTER_{name.upper()}"): None
             for name, field in Settings.model_fields.items()}
    names.update(dict.fromkeys(OTHER_VARIABLES))
    return {name.split("_", 1)[1]: name for name in names}


def unknown_variables(environ: Mapping[str, str]) -> dict[str, str | None]:
    """Each `CLAWROUTER_*` variable in `environ` that nothing reads (a misspelled budget,
    CLAWROUTER_MAX_USD_PER_DAYS, would otherwise leave the default limit on without a word),
    with the name it is closest to, if any. The names `_NOT_READ` lists are errors instead."""
    names = variable_names()
    ours = {name for name in names.values() if name.startswith("CLAWROUTER_")}
    found: dict[str, str | None] = {}
    for name in environ:
        upper = name.upper()  # (pydantic-settings reads them in any case)
        if not upper.startswith("CLAWROUTER_") or upper in ours or upper in _NOT_READ:
            continue
        close = difflib.get_close_matches(upper.removeprefix("CLAWROUTER_"), names, n=1,
                                          cutoff=0.7)
        found[name] = names[close[0]] if close else None
    return found


def warn_unknown_variables() -> None:
    """Say on stderr, once per process (a command may load its settings again: the gateway
    it finds or starts, an MCP server's tools), which CLAWROUTER_* variables are ignored.
    Not an error, unlike an unknown name in config.toml: the same shell may hold variables of
    ClawRouter, the OpenClaw plugin (CLAWROUTER_PAYMENT_CHAIN, say), that are none of ours."""
    for name, meant in unknown_variables(os.environ).items():
        with _warned_lock:
            if name in _warned:
                continue
            _warned.add(name)
        hint = f" (did you mean {meant}?)" if meant else ""
        print(f"clawrouter: warning: {name} is ignored: no such clawrouter setting{hint}",
              file=sys.stderr, flush=True)


def _explain_source(exc: SettingsError) -> str:
    """A list setting from the environment that is not JSON (`CLAWROUTER_RPC_URLS=http://a`)."""
    field = re.search(r'field "(\w+)"', str(exc))
    name = f"CLAWROUTER_{field.group(1).upper()}" if field else "a CLAWROUTER_* variable"
    return (f'{name}: expected a JSON list, e.g. ["https://a.example", "https://b.example"] '
            "(list settings are JSON in the environment)")


def _explain(exc: ValidationError, path: Path) -> str:
    """One line per wrong setting, named as the user wrote it; never its value."""
    problems = []
    for error in exc.errors():
        name = ".".join(str(part) for part in error["loc"]) or "settings"
        what = ("not a setting" if error["type"] == "extra_forbidden"
                else error["msg"].removeprefix("Value error, "))
        if error["type"] == "list_type":  # a plain string where a list goes
            what += (f" (a TOML list in the file; as CLAWROUTER_{name.upper()} in the "
                     "environment, a JSON list)")
        problems.append(f"{name}: {what}")
    where = f"{path}, " if path.is_file() else ""
    return (f"{'; '.join(problems)} (from {where}CLAWROUTER_* variables or flags; every setting "
            "is listed in config.example.toml)")


def _http_base(value: str | None) -> str | None:
    """`value` stripped if it is an http(s) base URL naming a host (a path may follow; no user,
    query or fragment), None if it is blank; else `ValueError` saying what is wrong."""
    if value is None or not value.strip():
        return None
    parts = urlsplit(value.strip())
    if (parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc
            or any(c in "?#\\" or c.isspace() or not c.isprintable()
                   for c in value.strip())):
        raise ValueError("must be an http(s) URL naming a host, like "
                         "https://images.example.com (a path may follow; no user, query "
                         "or fragment)")
    try:
        parts.port  # noqa: B018 - a bad port raises here
    except ValueError:
        raise ValueError("its port is not a number from 0 to 65535") from None
    return value.strip()
