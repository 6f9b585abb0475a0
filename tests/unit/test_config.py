"""ckptd.config: defaults, validation naming the key path, size strings, file and root lookup."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from ckptd import config as config_module
from ckptd.config import (
    DEFAULT_ROOT,
    Config,
    DaemonConfig,
    MetricsConfig,
    StoreConfig,
    config_from_dict,
    config_path,
    load_config,
    resolve_root,
)
from ckptd.errors import ConfigError
from ckptd.format.codec import CodecConfig
from ckptd.pipeline.plan import PipelineConfig

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"


@pytest.fixture
def env(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No CKPTD_* variables, an empty XDG config home, and no system config file.

    Returns the directory where the user config (``ckptd/ckptd.toml``) would live.
    """
    monkeypatch.setattr(config_module, "SYSTEM_CONFIG", tmp_path / "etc" / "ckptd.toml")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "xdg-config"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, "utf-8")
    return path


# ---- defaults and a full file ------------------------------------------------------------------


def test_defaults_without_any_file(env: Path) -> None:
    assert config_path() is None
    cfg = load_config()
    assert cfg == Config()
    assert cfg.source is None
    assert cfg.daemon == DaemonConfig() and cfg.metrics == MetricsConfig()
    assert cfg.store == StoreConfig(
        root=None, chunk_bytes=8 << 20, pack_bytes=1 << 20, threads=4, max_inflight_bytes=256 << 20
    )
    assert cfg.codec == CodecConfig(codec="auto", level=1)
    assert cfg.pipeline() == PipelineConfig()


def test_empty_file_means_defaults(env: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "empty.toml", "")
    cfg = load_config(path)
    assert cfg.source == path
    assert cfg.store == StoreConfig()
    assert cfg.codec == CodecConfig()


def test_every_key_set(env: Path, tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.toml",
        """
[store]
root = "~/ckpts"
chunk_bytes = "16MiB"
pack_bytes = 524288
threads = 8
max_inflight_bytes = "1 GiB"
concurrent_jobs = 3

[codec]
codec = "zstd"
level = 3
""",
    )
    cfg = load_config(path)
    assert cfg.store == StoreConfig(
        root=Path("~/ckpts").expanduser(),
        chunk_bytes=16 << 20,
        pack_bytes=512 << 10,
        threads=8,
        max_inflight_bytes=1 << 30,
        concurrent_jobs=3,
    )
    assert cfg.codec == CodecConfig(codec="zstd", level=3)
    assert cfg.pipeline() == PipelineConfig(
        chunk_bytes=16 << 20,
        pack_bytes=512 << 10,
        threads=8,
        max_inflight_bytes=1 << 30,
        concurrent_jobs=3,
        codec=CodecConfig(codec="zstd", level=3),
    )


@pytest.mark.parametrize("name", ["auto", "bytegroup", "zstd", "raw"])
def test_every_codec_name_is_accepted(name: str) -> None:
    cfg = config_from_dict({"codec": {"codec": name}})
    assert cfg.codec == CodecConfig(codec=name)  # type: ignore[arg-type]
    assert cfg.pipeline().codec == cfg.codec


def test_example_store_and_codec_tables_document_the_defaults() -> None:
    doc = tomllib.loads(EXAMPLE.read_text("utf-8"))
    cfg = config_from_dict({"store": doc["store"], "codec": doc["codec"]})
    assert cfg.store == StoreConfig()
    assert cfg.codec == CodecConfig()


def test_shipped_example_config_loads_as_the_defaults(env: Path) -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.source == EXAMPLE
    assert (cfg.store, cfg.codec, cfg.daemon, cfg.metrics) == (
        StoreConfig(),
        CodecConfig(),
        DaemonConfig(),
        MetricsConfig(),
    )


# ---- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[store]\nchunk_bytes = 12", "store.chunk_bytes: expected a size >= 64KiB, got 12"),
        (
            '[store]\nchunk_bytes = "63KiB"',
            "store.chunk_bytes: expected a size >= 64KiB, got '63KiB'",
        ),
        (
            '[store]\nchunk_bytes = "8 parsecs"',
            "store.chunk_bytes: expected a size in bytes (an integer, or a string such as "
            "\"8MiB\"), got '8 parsecs'",
        ),
        ("[store]\nchunk_bytes = 1.5", "store.chunk_bytes: expected a size in bytes"),
        ("[store]\nchunk_bytes = true", "store.chunk_bytes: expected a size in bytes"),
        ("[store]\npack_bytes = -1", "store.pack_bytes: expected a size >= 0, got -1"),
        (
            '[store]\npack_bytes = "9MiB"',
            "store.pack_bytes: must not exceed store.chunk_bytes (8388608), got 9437184",
        ),
        ("[store]\nthreads = 0", "store.threads: expected an integer >= 1 and <= 256, got 0"),
        (
            "[daemon]\nworker_nice = 20",
            "daemon.worker_nice: expected an integer >= 0 and <= 19, got 20",
        ),
        (
            "[daemon]\nworker_nice = -1",
            "daemon.worker_nice: expected an integer >= 0 and <= 19, got -1",
        ),
        ("[store]\nthreads = 257", "store.threads: expected an integer >= 1 and <= 256, got 257"),
        ('[store]\nthreads = "2"', "store.threads: expected an integer >= 1 and <= 256, got '2'"),
        ("[store]\nthreads = true", "store.threads: expected an integer >= 1 and <= 256, got True"),
        (
            "[store]\nmax_inflight_bytes = 1000",
            "store.max_inflight_bytes: expected a size >= 1MiB, got 1000",
        ),
        (
            "[store]\nconcurrent_jobs = 0",
            "store.concurrent_jobs: expected an integer >= 1 and <= 64, got 0",
        ),
        ('[store]\nroot = ""', "store.root: expected a directory path (a string), got ''"),
        ("[store]\nroot = 5", "store.root: expected a directory path (a string), got 5"),
        (
            '[codec]\ncodec = "lz4"',
            'codec.codec: expected "auto", "bytegroup", "zstd" or "raw", got \'lz4\'',
        ),
        ("[codec]\nlevel = 23", "codec.level: expected an integer >= -7 and <= 22, got 23"),
        ("[codec]\nlevel = -8", "codec.level: expected an integer >= -7 and <= 22, got -8"),
        ("[codec]\nlevel = 1.0", "codec.level: expected an integer >= -7 and <= 22, got 1.0"),
        ("store = 5", "store: expected a table [store], got 5"),
        ('codec = "zstd"', "codec: expected a table [codec], got 'zstd'"),
        (
            "[store]\nchunk_size = 1",
            "store.chunk_size: unknown key; known keys in [store]: chunk_bytes, "
            "concurrent_jobs, max_inflight_bytes, pack_bytes, root, threads",
        ),
        (
            "[codec]\ncompression = 1",
            "codec.compression: unknown key; known keys in [codec]: codec, level",
        ),
        ("[stroe]\nroot = '/x'", "stroe: unknown key"),
        (
            '[daemon]\nsocket = "rel/ckptd.sock"',
            "daemon.socket: expected an absolute path, got 'rel/ckptd.sock'",
        ),
        (
            '[daemon]\nallowed_groups = "wheel"',
            "daemon.allowed_groups: expected a list of group names, got 'wheel'",
        ),
        (
            '[daemon]\nallowed_groups = [""]',
            "daemon.allowed_groups: expected a list of group names",
        ),
        (
            "[daemon]\nmax_queue = 0",
            "daemon.max_queue: expected an integer >= 1 and <= 100000, got 0",
        ),
        (
            "[daemon]\nidle_exit_s = -1",
            "daemon.idle_exit_s: expected seconds >= 0 (0: never), got -1",
        ),
        (
            '[daemon]\nlog_level = "verbose"',
            "daemon.log_level: expected one of debug, info, warning, error, got 'verbose'",
        ),
        ("[daemon]\npid_file = 1", "daemon.pid_file: unknown key"),
        ('[metrics]\nlisten = "localhost"', 'metrics.listen: expected "host:port"'),
        ("[metrics]\nlisten = 9464", 'metrics.listen: expected "host:port"'),
        ("metrics = []", "metrics: expected a table [metrics], got []"),
    ],
)
def test_invalid_values_name_the_key(env: Path, tmp_path: Path, toml: str, message: str) -> None:
    path = write(tmp_path / "bad.toml", toml)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert text.startswith(f"config file {path}: ")
    assert message in text


def test_config_from_dict_without_a_file() -> None:
    with pytest.raises(ConfigError, match=r"^store\.threads: expected an integer >= 1"):
        config_from_dict({"store": {"threads": -1}})


def test_invalid_toml(env: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "broken.toml", "[store\nthreads = 2\n")
    with pytest.raises(ConfigError, match=rf"^config file {path}: invalid TOML \("):
        load_config(path)


def test_not_utf8(env: Path, tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[store]\nroot = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=rf"^config file {path}: invalid TOML"):
        load_config(path)


def test_missing_file_named_by_env(
    env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "nowhere" / "ckptd.toml"
    monkeypatch.setenv("CKPTD_CONFIG", str(missing))
    assert config_path() == missing
    with pytest.raises(
        ConfigError,
        match=rf"^config file {missing} does not exist; create it .* or point --config / "
        r"CKPTD_CONFIG elsewhere$",
    ):
        load_config()


def test_missing_explicit_file(env: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_unreadable_path(env: Path, tmp_path: Path) -> None:
    directory = tmp_path / "a-directory.toml"
    directory.mkdir()
    with pytest.raises(ConfigError, match=rf"^config file {directory}: cannot read it \("):
        load_config(directory)


# ---- where the file is ------------------------------------------------------------------------


def test_lookup_order(env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system = write(config_module.SYSTEM_CONFIG, "[store]\nthreads = 3\n")
    assert config_path() == system
    assert load_config().store.threads == 3

    user = write(env / "ckptd" / "ckptd.toml", "[store]\nthreads = 4\n")
    assert config_path() == user
    assert load_config().store.threads == 4

    named = write(tmp_path / "named.toml", "[store]\nthreads = 5\n")
    monkeypatch.setenv("CKPTD_CONFIG", str(named))
    assert config_path() == named
    assert load_config().store.threads == 5

    explicit = write(tmp_path / "explicit.toml", "[store]\nthreads = 6\n")
    assert config_path(explicit) == explicit
    cfg = load_config(explicit)
    assert cfg.store.threads == 6
    assert cfg.source == explicit


def test_empty_env_var_is_ignored(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPTD_CONFIG", "")
    assert config_path() is None


# ---- sizes -------------------------------------------------------------------------------------


# ---- where checkpoints go ---------------------------------------------------------------------


def test_root_resolution_order(env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from_file = Config(store=StoreConfig(root=tmp_path / "from-config"))
    assert resolve_root(None, Config()) == DEFAULT_ROOT == Path("checkpoints")
    assert resolve_root(None, from_file) == tmp_path / "from-config"
    monkeypatch.setenv("CKPTD_ROOT", str(tmp_path / "from-env"))
    assert resolve_root(None, from_file) == tmp_path / "from-env"
    assert resolve_root(tmp_path / "explicit", from_file) == tmp_path / "explicit"
    assert resolve_root(str(tmp_path / "explicit-str"), from_file) == tmp_path / "explicit-str"


def test_root_from_the_config_file(
    env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "c.toml", f'[store]\nroot = "{tmp_path / "file-root"}"\n')
    monkeypatch.setenv("CKPTD_CONFIG", str(path))
    assert resolve_root(None) == tmp_path / "file-root"
    monkeypatch.setenv("CKPTD_ROOT", "")  # empty: ignored
    assert resolve_root(None) == tmp_path / "file-root"
    monkeypatch.setenv("CKPTD_ROOT", str(tmp_path / "env-root"))
    assert resolve_root(None) == tmp_path / "env-root"


def test_default_root_without_config(env: Path) -> None:
    assert resolve_root(None) == Path("checkpoints")


def test_explicit_root_does_not_read_a_broken_config(
    env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CKPTD_CONFIG", str(write(tmp_path / "bad.toml", "[[[")))
    assert resolve_root(tmp_path / "r") == tmp_path / "r"
    with pytest.raises(ConfigError, match="invalid TOML"):
        resolve_root(None)


def test_tilde_is_expanded(env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_root("~/ckpt") == tmp_path / "home" / "ckpt"
    monkeypatch.setenv("CKPTD_ROOT", "~/env-ckpt")
    assert resolve_root(None) == tmp_path / "home" / "env-ckpt"


def test_ranks_pending_timeout() -> None:
    from ckptd.config import config_from_dict

    assert config_from_dict({}).ranks.pending_timeout_s == 3600.0
    cfg = config_from_dict({"ranks": {"pending_timeout": "30m"}})
    assert cfg.ranks.pending_timeout_s == 1800.0
    assert cfg.pipeline().pending_timeout_s == 1800.0
    with pytest.raises(ConfigError, match=r"ranks\.pending_timeout: expected at least 1 s"):
        config_from_dict({"ranks": {"pending_timeout": 0}})
    with pytest.raises(ConfigError, match=r"ranks\.pending_timeout: expected a duration"):
        config_from_dict({"ranks": {"pending_timeout": "soon"}})
    with pytest.raises(ConfigError, match=r"ranks.timeout: unknown key; known keys in \[ranks\]"):
        config_from_dict({"ranks": {"timeout": 5}})
