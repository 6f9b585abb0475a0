"""Typed configuration, validated at load.

The file is TOML (``config.example.toml`` documents every key with its default). Each section maps
to a frozen dataclass; unknown keys and bad values raise :class:`ConfigError` naming the key path,
the value found and what is expected (``store.chunk_bytes: expected a size >= 64KiB, got 12``).

A part's own section is defined with that part and composed here: ``[codec]`` is
:class:`~ckptd.format.codec.CodecConfig`, the pipeline's settings
:class:`~ckptd.pipeline.plan.PipelineConfig`, ``[retention]``
:class:`~ckptd.policy.retention.RetentionPolicy`, ``[disk]``
:class:`~ckptd.policy.diskguard.DiskConfig`. So this module sits above format, pipeline and
policy (none of them imports it) and below the daemon and the CLI, which read a :class:`Config`.

Where the file is: ``--config`` / ``CKPTD_CONFIG``, else ``$XDG_CONFIG_HOME/ckptd/ckptd.toml``
(``~/.config``), else ``/etc/ckptd/ckptd.toml``; none of them existing means all defaults.
Where checkpoints go: ``--root`` / ``root=``, else ``CKPTD_ROOT``, else ``store.root`` of the
config (:func:`configured_root`); with none of them set, where the daemon writes (asked on its
socket, see :mod:`ckptd.locate`), else ``./checkpoints`` under the working directory.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, get_args

from ckptd.errors import ConfigError, InvalidNameError, TierError
from ckptd.format.codec import CodecChoice, CodecConfig
from ckptd.format.store import validate_job_name
from ckptd.pipeline.plan import PipelineConfig
from ckptd.policy.diskguard import DiskConfig
from ckptd.policy.retention import RetentionPolicy, policy_from_dict
from ckptd.tier.remote import TierSettings, TierUrl, parse_url
from ckptd.units import parse_duration, parse_size

DEFAULT_ROOT = Path("checkpoints")
CODEC_CHOICES: tuple[str, ...] = get_args(CodecChoice)
"""``codec.codec``'s values: ``"auto"`` (the daemon chooses per write between compressing and
raw, :mod:`ckptd.pipeline.auto`), and the fixed codecs of :mod:`ckptd.format.codec`."""
SYSTEM_CONFIG = Path("/etc/ckptd/ckptd.toml")


@dataclass(frozen=True)
class StoreConfig:
    """``[store]``: where checkpoints live and how the write pipeline runs."""

    root: Path | None = None
    chunk_bytes: int = 8 << 20
    pack_bytes: int = 1 << 20
    threads: int = 4
    max_inflight_bytes: int = 256 << 20
    concurrent_jobs: int = 2
    """Snapshots written at once, each of another job or rank (they share ``threads`` and
    ``max_inflight_bytes``); 1: one at a time, first come first served."""


@dataclass(frozen=True)
class DaemonConfig:
    """``[daemon]``: the socket, who may connect, and limits."""

    socket: Path | None = None
    allowed_groups: tuple[str, ...] = ()
    max_queue: int = 64
    idle_exit_s: float = 0.0
    log_level: str = "info"
    worker_nice: int = 10
    max_clients_per_uid: int = 64
    max_slots_per_uid: int = 256
    max_slot_bytes: int = 0
    """0: the machine's memory size (which also caps any configured value)."""


@dataclass(frozen=True)
class RanksConfig:
    """``[ranks]``: multi-rank jobs."""

    pending_timeout_s: float = 3600.0
    """``pending_timeout``: the parts of a step that some rank never handed off are collected
    after this long (or as soon as a newer step of the job commits)."""


@dataclass(frozen=True)
class MetricsConfig:
    """``[metrics]``: the Prometheus endpoint, off unless ``listen = "host:port"``."""

    listen: str = ""


@dataclass(frozen=True)
class TierConfig:
    """``[tier]`` (a job's ``[jobs.NAME.tier]`` overrides it key by key): the object store the
    daemon uploads committed checkpoints to, and the tier's own retention."""

    settings: TierSettings
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    retry_max_s: float = 300.0
    """``retry_max``: the longest wait between two attempts while the store fails."""

    @property
    def url(self) -> TierUrl:
        return self.settings.url


TIER_KEYS = {
    "url",
    "endpoint",
    "region",
    "concurrency",
    "bandwidth",
    "timeout",
    "retry_max",
    "retention",
    "enabled",
}


@dataclass(frozen=True)
class Config:
    """The whole configuration; ``source`` is the file it came from (None: defaults)."""

    store: StoreConfig = field(default_factory=StoreConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    disk: DiskConfig = field(default_factory=DiskConfig)
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    jobs: dict[str, RetentionPolicy] = field(default_factory=dict)
    ranks: RanksConfig = field(default_factory=RanksConfig)
    tier: TierConfig | None = None
    job_tiers: dict[str, TierConfig | None] = field(default_factory=dict)
    """Jobs with a ``[jobs.NAME.tier]`` table: their tier (None: ``enabled = false``)."""
    source: Path | None = None

    def tier_for(self, job: str) -> TierConfig | None:
        """The tier ``job``'s checkpoints go to (None: none)."""
        return self.job_tiers.get(job, self.tier)

    def tiers(self) -> list[TierConfig]:
        """Every tier the config names (``[tier]`` and the jobs' own), each URL once."""
        found = [self.tier, *self.job_tiers.values()]
        out: dict[str, TierConfig] = {}
        for t in found:
            if t is not None:
                out.setdefault(str(t.url), t)
        return list(out.values())

    def policy_for(self, job: str, recorded: dict[str, Any] | None = None) -> RetentionPolicy:
        """A job's retention: ``[retention]``, then what its client recorded
        (``Client(retention=...)``), then ``[jobs.NAME.retention]``, each overriding the last."""
        policy = self.retention
        if recorded:
            try:
                policy = policy.merged(policy_from_dict(recorded, f"job {job} retention"))
            except ConfigError:
                pass  # validated when recorded; a damaged record falls back to the config
        override = self.jobs.get(job)
        return policy.merged(override) if override is not None else policy

    def pipeline(self) -> PipelineConfig:
        s = self.store
        return PipelineConfig(
            chunk_bytes=s.chunk_bytes,
            pack_bytes=s.pack_bytes,
            threads=s.threads,
            max_inflight_bytes=s.max_inflight_bytes,
            concurrent_jobs=s.concurrent_jobs,
            codec=self.codec,
            pending_timeout_s=self.ranks.pending_timeout_s,
        )


def _take(section: dict[str, Any], name: str, known: set[str]) -> dict[str, Any]:
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigError(
            f"{name}.{unknown[0]}: unknown key; known keys in [{name}]: {', '.join(sorted(known))}"
        )
    return section


def _int(value: object, key: str, minimum: int, maximum: int | None = None) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum  # type: ignore[operator]
    if not ok:
        bound = f">= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
        raise ConfigError(f"{key}: expected an integer {bound}, got {value!r}")
    return value  # type: ignore[return-value]


def _size(value: object, key: str, minimum: int, minimum_text: str) -> int:
    size = parse_size(value, key)
    if size < minimum:
        raise ConfigError(f"{key}: expected a size >= {minimum_text}, got {value!r}")
    return size


def config_from_dict(doc: dict[str, Any], source: Path | None = None) -> Config:
    """Validate a parsed TOML document into a :class:`Config`."""
    sections = (
        "store",
        "codec",
        "daemon",
        "metrics",
        "disk",
        "retention",
        "jobs",
        "ranks",
        "tier",
    )
    _take(doc, "<top level>", set(sections))
    for name in sections:
        if not isinstance(doc.get(name, {}), dict):
            raise ConfigError(f"{name}: expected a table [{name}], got {doc[name]!r}")
    s = _take(doc.get("store", {}), "store", set(StoreConfig.__dataclass_fields__))
    c = _take(doc.get("codec", {}), "codec", {"codec", "level"})
    root = s.get("root")
    if root is not None and (not isinstance(root, str) or not root):
        raise ConfigError(f"store.root: expected a directory path (a string), got {root!r}")
    store = StoreConfig(
        root=Path(root).expanduser() if root else None,
        chunk_bytes=_size(s.get("chunk_bytes", 8 << 20), "store.chunk_bytes", 64 << 10, "64KiB"),
        pack_bytes=_size(s.get("pack_bytes", 1 << 20), "store.pack_bytes", 0, "0"),
        threads=_int(s.get("threads", 4), "store.threads", 1, 256),
        max_inflight_bytes=_size(
            s.get("max_inflight_bytes", 256 << 20), "store.max_inflight_bytes", 1 << 20, "1MiB"
        ),
        concurrent_jobs=_int(s.get("concurrent_jobs", 2), "store.concurrent_jobs", 1, 64),
    )
    if store.pack_bytes > store.chunk_bytes:
        raise ConfigError(
            f"store.pack_bytes: must not exceed store.chunk_bytes ({store.chunk_bytes}), "
            f"got {store.pack_bytes}"
        )
    codec_name = c.get("codec", "auto")
    if codec_name not in CODEC_CHOICES:
        names = [f'"{name}"' for name in CODEC_CHOICES]
        raise ConfigError(
            f"codec.codec: expected {', '.join(names[:-1])} or {names[-1]}, got {codec_name!r}"
        )
    codec = CodecConfig(codec=codec_name, level=_int(c.get("level", 1), "codec.level", -7, 22))
    return Config(
        store=store,
        codec=codec,
        daemon=_daemon(doc.get("daemon", {})),
        metrics=_metrics(doc.get("metrics", {})),
        disk=_disk(doc.get("disk", {})),
        retention=policy_from_dict(doc.get("retention", {}), "retention"),
        jobs=_jobs(doc.get("jobs", {})),
        ranks=_ranks(doc.get("ranks", {})),
        tier=_tier(doc.get("tier", {}), "tier") if doc.get("tier") else None,
        job_tiers=_job_tiers(doc.get("jobs", {}), doc.get("tier", {})),
        source=source,
    )


def _tier(d: dict[str, Any], name: str) -> TierConfig | None:
    """``[tier]`` (or a job's merged over it) validated; None when ``enabled = false``."""
    _take(d, name, TIER_KEYS)
    enabled = d.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{name}.enabled: expected true or false, got {enabled!r}")
    if not enabled:
        return None
    if "url" not in d:
        raise ConfigError(
            f'{name}.url: missing; set it to the bucket and prefix, e.g. url = "s3://bucket/ckpt"'
        )
    try:
        url = parse_url(d["url"])
    except TierError as exc:
        raise ConfigError(f"{name}.url: {exc}") from exc
    endpoint = d.get("endpoint")
    if endpoint is not None and (
        not isinstance(endpoint, str)
        or not re.fullmatch(r"https?://[^\s/]+(:\d{1,5})?/?", endpoint)
    ):
        raise ConfigError(
            f'{name}.endpoint: expected "http(s)://host[:port]" (an S3-compatible server), '
            f"got {endpoint!r}"
        )
    region = d.get("region")
    if region is not None and (not isinstance(region, str) or not region):
        raise ConfigError(f"{name}.region: expected a region name, got {region!r}")
    bandwidth = parse_size(d.get("bandwidth", 0), f"{name}.bandwidth")
    if bandwidth < 0 or 0 < bandwidth < 64 << 10:
        raise ConfigError(
            f"{name}.bandwidth: expected bytes per second >= 64KiB, or 0 for no cap, "
            f"got {d.get('bandwidth')!r}"
        )
    timeout = parse_duration(d.get("timeout", 60), f"{name}.timeout")
    retry_max = parse_duration(d.get("retry_max", 300), f"{name}.retry_max")
    for key, value in (("timeout", timeout), ("retry_max", retry_max)):
        if value < 1:
            raise ConfigError(f"{name}.{key}: expected at least 1 s, got {d.get(key)!r}")
    retention = d.get("retention", {})
    if not isinstance(retention, dict):
        raise ConfigError(f"{name}.retention: expected a table, got {retention!r}")
    settings = TierSettings(
        url=url,
        endpoint=endpoint.rstrip("/") if endpoint else None,
        region=region,
        concurrency=_int(d.get("concurrency", 8), f"{name}.concurrency", 1, 256),
        bandwidth=bandwidth or None,
        timeout_s=timeout,
    )
    return TierConfig(
        settings=settings,
        retention=policy_from_dict(retention, f"{name}.retention"),
        retry_max_s=retry_max,
    )


def _job_tiers(jobs: dict[str, Any], base: dict[str, Any]) -> dict[str, TierConfig | None]:
    """Each ``[jobs.NAME.tier]`` merged over ``[tier]`` (its retention table key by key)."""
    out: dict[str, TierConfig | None] = {}
    for name, table in jobs.items():
        own = table.get("tier") if isinstance(table, dict) else None
        if own is None:
            continue
        if not isinstance(own, dict):
            raise ConfigError(f"jobs.{name}.tier: expected a table, got {own!r}")
        merged = {**base, **own}
        if isinstance(base.get("retention"), dict) and isinstance(own.get("retention"), dict):
            merged["retention"] = {**base["retention"], **own["retention"]}
        out[name] = _tier(merged, f"jobs.{name}.tier")
    return out


def tier_settings_for(url: str, config: Config | None = None) -> TierSettings:
    """How to reach the tier ``url`` for reading: the configured tier's endpoint and region when
    the config names that bucket, else the AWS environment's (``AWS_ENDPOINT_URL``, ...). Raises
    :class:`TierError` for a malformed URL."""
    parsed = parse_url(url)
    cfg = config if config is not None else load_config()
    for tier in cfg.tiers():
        if tier.url.bucket == parsed.bucket:
            return replace(tier.settings, url=parsed, bandwidth=None)
    return TierSettings(url=parsed)


def _ranks(d: dict[str, Any]) -> RanksConfig:
    _take(d, "ranks", {"pending_timeout"})
    timeout = parse_duration(d.get("pending_timeout", 3600), "ranks.pending_timeout")
    if timeout < 1:
        raise ConfigError(
            f"ranks.pending_timeout: expected at least 1 s (ranks may be minutes apart: the "
            f"default is 1h), got {d.get('pending_timeout')!r}"
        )
    return RanksConfig(pending_timeout_s=timeout)


def _disk(d: dict[str, Any]) -> DiskConfig:
    _take(d, "disk", {"min_free_bytes", "min_free_percent"})
    pct = d.get("min_free_percent", 0.0)
    if not isinstance(pct, int | float) or isinstance(pct, bool) or not 0 <= pct < 100:
        raise ConfigError(f"disk.min_free_percent: expected a number in [0, 100), got {pct!r}")
    return DiskConfig(
        min_free_bytes=_size(d.get("min_free_bytes", 1 << 30), "disk.min_free_bytes", 0, "0"),
        min_free_percent=float(pct),
    )


def _jobs(d: dict[str, Any]) -> dict[str, RetentionPolicy]:
    out = {}
    for name, table in d.items():
        try:
            validate_job_name(name)
        except InvalidNameError as exc:
            raise ConfigError(f"jobs.{name}: {exc}") from exc
        if not isinstance(table, dict):
            raise ConfigError(f"jobs.{name}: expected a table [jobs.{name}.retention]")
        _take(table, f"jobs.{name}", {"retention", "tier"})
        retention = table.get("retention", {})
        if not isinstance(retention, dict):
            raise ConfigError(f"jobs.{name}.retention: expected a table, got {retention!r}")
        out[name] = policy_from_dict(retention, f"jobs.{name}.retention")
    return out


def _daemon(d: dict[str, Any]) -> DaemonConfig:
    _take(d, "daemon", set(DaemonConfig.__dataclass_fields__))
    sock = d.get("socket")
    if sock is not None and (not isinstance(sock, str) or not sock.startswith("/")):
        raise ConfigError(f"daemon.socket: expected an absolute path, got {sock!r}")
    groups = d.get("allowed_groups", [])
    if not isinstance(groups, list) or not all(isinstance(g, str) and g for g in groups):
        raise ConfigError(f"daemon.allowed_groups: expected a list of group names, got {groups!r}")
    idle = d.get("idle_exit_s", 0.0)
    if not isinstance(idle, int | float) or isinstance(idle, bool) or idle < 0:
        raise ConfigError(f"daemon.idle_exit_s: expected seconds >= 0 (0: never), got {idle!r}")
    level = d.get("log_level", "info")
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError(
            f"daemon.log_level: expected one of debug, info, warning, error, got {level!r}"
        )
    return DaemonConfig(
        socket=Path(sock) if sock else None,
        allowed_groups=tuple(groups),
        max_queue=_int(d.get("max_queue", 64), "daemon.max_queue", 1, 100_000),
        idle_exit_s=float(idle),
        log_level=level,
        worker_nice=_int(d.get("worker_nice", 10), "daemon.worker_nice", 0, 19),
        max_clients_per_uid=_int(
            d.get("max_clients_per_uid", 64), "daemon.max_clients_per_uid", 1, 100_000
        ),
        max_slots_per_uid=_int(
            d.get("max_slots_per_uid", 256), "daemon.max_slots_per_uid", 1, 100_000
        ),
        max_slot_bytes=_size(d.get("max_slot_bytes", 0), "daemon.max_slot_bytes", 0, "0"),
    )


def _metrics(d: dict[str, Any]) -> MetricsConfig:
    _take(d, "metrics", {"listen"})
    listen = d.get("listen", "")
    if not isinstance(listen, str) or (listen and not re.fullmatch(r"[^\s:]+:\d{1,5}", listen)):
        raise ConfigError(
            f'metrics.listen: expected "host:port" (e.g. "127.0.0.1:9464") or "" for off, '
            f"got {listen!r}"
        )
    return MetricsConfig(listen=listen)


SYSTEM_SOCKET = Path("/run/ckptd/ckptd.sock")


def user_socket() -> Path:
    """The per-user socket: ``$XDG_RUNTIME_DIR/ckptd/ckptd.sock``, else
    ``<tmp>/ckptd-<uid>/ckptd.sock`` (``<tmp>``: ``$TMPDIR`` or ``/tmp``). Clients check that the
    directory is the user's own before they use it (see ``ckptd_client.client``)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "ckptd" / "ckptd.sock"
    tmp = os.environ.get("TMPDIR") or "/tmp"
    return Path(tmp) / f"ckptd-{os.getuid()}" / "ckptd.sock"


def locate_socket(explicit: Path | str | None, config: Config | None = None) -> tuple[Path, str]:
    """The socket a client connects to, and where that choice came from: ``"socket="`` (explicit),
    ``"CKPTD_SOCKET"``, ``"daemon.socket"`` (the config), ``"system"`` (the system socket exists),
    else ``"default"``: the per-user socket, the only one where a client spawns a daemon on its
    own. A socket someone named means that daemon; a typo there must not start another one."""
    if explicit is not None:
        return Path(explicit), "socket="
    env = os.environ.get("CKPTD_SOCKET")
    if env:
        return Path(env), "CKPTD_SOCKET"
    cfg = config if config is not None else load_config()
    if cfg.daemon.socket is not None:
        return cfg.daemon.socket, "daemon.socket"
    if SYSTEM_SOCKET.exists():
        return SYSTEM_SOCKET, "system"
    return user_socket(), "default"


def resolve_socket(explicit: Path | str | None, config: Config | None = None) -> Path:
    """The socket a client connects to (see :func:`locate_socket`)."""
    return locate_socket(explicit, config)[0]


def config_path(explicit: Path | str | None = None) -> Path | None:
    """The config file to read: explicit, ``CKPTD_CONFIG``, the user's, the system's, or None."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get("CKPTD_CONFIG")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    for candidate in (Path(xdg) / "ckptd" / "ckptd.toml", SYSTEM_CONFIG):
        try:
            if candidate.is_file():
                return candidate
        except OSError as exc:
            raise ConfigError(
                f"cannot look for a config file at {candidate}: {exc.strerror}; set "
                "CKPTD_CONFIG or --config to a readable file, or XDG_CONFIG_HOME to a readable "
                "directory"
            ) from exc
    return None


def load_config(explicit: Path | str | None = None) -> Config:
    """Load and validate the configuration (defaults when there is no file)."""
    path = config_path(explicit)
    if path is None:
        return Config()
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} does not exist; create it (see config.example.toml) or point "
            "--config / CKPTD_CONFIG elsewhere"
        ) from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read it ({exc.strerror})") from exc
    try:
        doc = tomllib.loads(text.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path}: invalid TOML ({exc})") from exc
    try:
        return config_from_dict(doc, path)
    except ConfigError as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc


def configured_root(explicit: Path | str | None, config: Config | None = None) -> Path | None:
    """The root someone asked for: explicit, ``CKPTD_ROOT`` or ``store.root``; None when none of
    them is set (then the daemon's root applies, see :mod:`ckptd.locate`)."""
    if explicit is not None:
        return Path(explicit).expanduser()
    env = os.environ.get("CKPTD_ROOT")
    if env:
        return Path(env).expanduser()
    cfg = config if config is not None else load_config()
    return cfg.store.root


def resolve_root(explicit: Path | str | None, config: Config | None = None) -> Path:
    """The root a daemon serves: :func:`configured_root`, else ``./checkpoints``."""
    root = configured_root(explicit, config)
    return root if root is not None else DEFAULT_ROOT
