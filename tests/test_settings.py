"""The server's one settings model: every ``KCP_*`` variable read through it, as before, and a clean ``--help``.

No server is started: these run in well under a second each, apart from the ``--help`` subprocesses.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from predictors.__main__ import KSERVE_FLAGS_USED, build_parser, server_settings
from predictors.protocol.auth import APIKey
from predictors.protocol.fetch import FetchSettings as FetchSettingsFromFetch
from predictors.settings import FetchSettings, ImageLimits, ServerSettings, env_name, flag_of

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``KCP_*`` variable of the shell running the tests leaks into these."""
    for var in [v for v in os.environ if v.startswith("KCP_")]:
        monkeypatch.delenv(var)


def test_defaults_are_the_documented_ones(tmp_path: Path) -> None:
    s = ServerSettings()
    assert (s.host, s.api_key, s.api_key_file, s.api_key_overlap_s) == ("0.0.0.0", None, None, 300.0)
    assert s.feedback_db_url == "sqlite:///feedback.db"
    assert (s.feedback_db_connect_timeout_s, s.feedback_db_statement_timeout_s, s.feedback_db_retry_s) == (3, 10, 5)
    assert (s.prediction_log, s.ui, s.metrics_auth, s.access_log, s.model_threads) == (True, True, False, False, 1)
    assert (s.max_batch_size, s.max_latency_ms) == (None, None)
    assert s.execution_cache == Path.home() / ".cache" / "kserve-classifiers" / "execution.json"
    assert s.fetch == FetchSettings() and s.images == ImageLimits()
    assert (s.fetch.enabled, s.fetch.deadline_s, s.fetch.address_order) == (True, 15.0, "ipv4_first")
    assert FetchSettingsFromFetch is FetchSettings, "predictors.protocol.fetch keeps exporting the model"


def test_every_variable_the_server_relied_on_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = {
        "KCP_HOST": "127.0.0.1", "KCP_API_KEY": "  sekret  ", "KCP_API_KEY_OVERLAP_S": "7",
        "KCP_FEEDBACK_DB_URL": "postgresql://u@h/db", "KCP_FEEDBACK_DB_CONNECT_TIMEOUT_S": "4",
        "KCP_FEEDBACK_DB_STATEMENT_TIMEOUT_S": "60", "KCP_FEEDBACK_DB_RETRY_S": "1",
        "KCP_PREDICTION_LOG": "false", "KCP_PREDICTION_RETENTION_DAYS": "2", "KCP_PREDICTION_LOG_FLUSH_MS": "5",
        "KCP_PREDICTION_LOG_CAPACITY": "10", "KCP_MAX_BODY_BYTES": "1000", "KCP_MAX_JSON_VALUES": "99",
        "KCP_UI": "0", "KCP_METRICS_AUTH": "1", "KCP_ACCESS_LOG": "true", "KCP_MODEL_THREADS": "4",
        "KCP_EXECUTION_CACHE": str(tmp_path / "exec.json"),
        "KCP_IMAGE_MAX_PIXELS": "100", "KCP_IMAGE_MAX_TOTAL_PIXELS": "200", "KCP_IMAGE_MAX_IMAGES": "3",
        "KCP_IMAGE_DECODE_DEADLINE_S": "1.5", "KCP_IMAGE_DECODE_SLOTS": "2",
        "KCP_URL_FETCH_ENABLED": "false", "KCP_URL_TIMEOUT_S": "2", "KCP_URL_DEADLINE_S": "3",
        "KCP_URL_ADDRESS_ORDER": "ipv6_first", "KCP_URL_MAX_BYTES": "1024", "KCP_URL_MAX_REQUEST_BYTES": "2048",
        "KCP_URL_MAX_REDIRECTS": "0", "KCP_URL_ALLOWED_NETWORKS": " 10.0.0.0/8, ,127.0.0.1/32 ",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = ServerSettings()
    assert (s.host, s.api_key, s.api_key_overlap_s) == ("127.0.0.1", "sekret", 7.0)
    assert (s.feedback_db_url, s.feedback_db_connect_timeout_s, s.feedback_db_statement_timeout_s,
            s.feedback_db_retry_s) == ("postgresql://u@h/db", 4.0, 60.0, 1.0)
    assert (s.prediction_log, s.prediction_retention_days, s.prediction_log_flush_ms,
            s.prediction_log_capacity) == (False, 2.0, 5.0, 10)
    assert (s.max_body_bytes, s.max_json_values, s.ui, s.metrics_auth, s.access_log) == (1000, 99, False, True, True)
    assert (s.model_threads, s.execution_cache) == (4, tmp_path / "exec.json")
    assert s.images == ImageLimits(max_pixels=100, max_total_pixels=200, max_images=3, decode_deadline_s=1.5,
                                   decode_slots=2)
    f = s.fetch
    assert (f.enabled, f.timeout_s, f.deadline_s, f.address_order) == (False, 2.0, 3.0, "ipv6_first")
    assert (f.max_bytes, f.max_request_bytes, f.max_redirects) == (1024, 2048, 0)
    assert f.allowed_networks == ["10.0.0.0/8", "127.0.0.1/32"]
    assert [str(n) for n in f.networks()] == ["10.0.0.0/8", "127.0.0.1/32"]


def test_an_empty_variable_is_unset_except_the_execution_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("KCP_MODEL_THREADS", "KCP_URL_DEADLINE_S", "KCP_FEEDBACK_DB_RETRY_S", "KCP_API_KEY",
                "KCP_IMAGE_MAX_PIXELS", "KCP_URL_ALLOWED_NETWORKS"):
        monkeypatch.setenv(var, "  ")
    monkeypatch.setenv("KCP_EXECUTION_CACHE", "")
    s = ServerSettings()
    assert (s.model_threads, s.fetch.deadline_s, s.feedback_db_retry_s, s.api_key) == (1, 15.0, 5.0, None)
    assert (s.images.max_pixels, s.fetch.allowed_networks) == (16_000_000, [])
    assert s.execution_cache is None, "KCP_EXECUTION_CACHE= turns the cache off"


@pytest.mark.parametrize(("var", "value"), [
    ("KCP_MODEL_THREADS", "0"), ("KCP_MODEL_THREADS", "many"), ("KCP_FEEDBACK_DB_RETRY_S", "0"),
    ("KCP_FEEDBACK_DB_STATEMENT_TIMEOUT_S", "100000"), ("KCP_API_KEY_OVERLAP_S", "-1"),
    ("KCP_URL_ADDRESS_ORDER", "random"), ("KCP_IMAGE_DECODE_SLOTS", "0"), ("KCP_MAX_BODY_BYTES", "-5"),
])
def test_a_bad_value_stops_start_up(monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ValidationError):
        ServerSettings()


def test_the_key_file_wins_and_an_empty_one_refuses_to_serve(monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text("from-file\n")
    monkeypatch.setenv("KCP_API_KEY", "from-env")
    monkeypatch.setenv("KCP_API_KEY_FILE", str(key_file))
    s = ServerSettings()
    assert (s.api_key, s.api_key_file) == ("from-file", key_file)
    key_file.write_text("  \n")
    with pytest.raises(ValidationError, match="is empty; refusing to serve without the key"):
        ServerSettings()
    monkeypatch.setenv("KCP_API_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError):
        ServerSettings()


def test_the_api_key_watches_only_the_file_it_is_given(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """APIKey no longer reads the environment itself: the server hands it the settings' file and overlap."""
    key_file = tmp_path / "api-key"
    key_file.write_text("k1")
    monkeypatch.setenv("KCP_API_KEY_FILE", str(key_file))
    assert APIKey("k1")._file is None
    key = APIKey("k1", key_file=key_file, overlap_s=0)
    assert key._file == key_file and key._overlap_s == 0
    with pytest.raises(ValueError):
        APIKey("k1", overlap_s=-1)


def test_flags_win_over_the_environment_and_absent_flags_leave_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KCP_HOST", "10.0.0.1")
    monkeypatch.setenv("KCP_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("KCP_METRICS_AUTH", "true")
    parser = build_parser()
    s = server_settings(parser.parse_args(["serve"]))
    assert (s.host, s.max_batch_size, s.max_latency_ms, s.metrics_auth, s.access_log) == ("10.0.0.1", 8, None,
                                                                                          True, False)
    s = server_settings(parser.parse_args(["serve", "--host", "127.0.0.1", "--max_batch_size", "1",
                                           "--max_latency_ms", "2.5", "--access-log"]))
    assert (s.host, s.max_batch_size, s.max_latency_ms, s.access_log) == ("127.0.0.1", 1, 2.5, True)


def test_every_flag_of_the_settings_is_on_serve() -> None:
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    options = {o for action in serve._actions for o in action.option_strings}
    flags = [flag_of(f) for f in ServerSettings.model_fields.values() if flag_of(f)]
    assert set(flags) == {"--host", "--max_batch_size", "--max_latency_ms", "--metrics-auth", "--access-log",
                          "--grpc-front"}
    assert set(flags) <= options


def test_transformer_flags_are_still_accepted() -> None:
    """An InferenceService may pass KServe's generic flags; hidden from --help, they must not stop the server."""
    ns = build_parser().parse_args(["serve", "--model_name", "m", "--predictor_host", "h",
                                    "--enable_latency_logging", "true"])
    assert ns.command == "serve"


def test_env_names_are_unique_and_prefixed() -> None:
    names = [env_name(ServerSettings, n, f) for n, f in ServerSettings.model_fields.items()
             if n not in ("fetch", "images")]
    names += [env_name(FetchSettings, n, f) for n, f in FetchSettings.model_fields.items()]
    names += [env_name(ImageLimits, n, f) for n, f in ImageLimits.model_fields.items()]
    assert len(names) == len(set(names))
    assert all(re.fullmatch(r"KCP_[A-Z0-9_]+", n) for n in names)
    assert "KCP_URL_FETCH_ENABLED" in names and "KCP_API_KEY_FILE" in names


_BLOCK_TENSORFLOW = """
import builtins, runpy, sys
_import = builtins.__import__
def _blocked(name, *args, **kwargs):
    if name.split(".")[0] in ("tensorflow", "keras"):
        raise ImportError(f"{name} is blocked in this test")
    return _import(name, *args, **kwargs)
builtins.__import__ = _blocked
sys.argv = ["python -m predictors", *sys.argv[1:]]
runpy.run_module("predictors", run_name="__main__", alter_sys=True)
"""


def _help(*command: str) -> str:
    done = subprocess.run([sys.executable, "-c", _BLOCK_TENSORFLOW, *command, "--help"], capture_output=True,
                          text=True, timeout=120, cwd=REPO,
                          env={k: v for k, v in os.environ.items() if not k.startswith("KCP_")})
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "Warning" not in done.stderr, done.stderr
    return done.stdout


def test_help_runs_without_tensorflow_and_shows_only_flags_that_work() -> None:
    top = _help()
    assert "serve" in top and "docs/settings.md" in top
    serve = _help("serve")
    shown = set(re.findall(r"(--[a-z][a-z0-9_-]*)", serve))
    hidden = {"--model_name", "--predictor_host", "--protocol", "--predictor_protocol", "--predictor_use_ssl",
              "--predictor_request_timeout_seconds", "--predictor_request_retries",
              "--enable_predictor_health_check", "--enable_latency_logging", "--kcp-worker-fds"}
    assert not shown & hidden, shown & hidden
    assert {"--host", "--max_batch_size", "--max_latency_ms", "--metrics-auth", "--access-log", "--model_dir",
            "--workers", "--http_port", "--grpc_port"} <= shown
    assert "KCP_HOST" in serve
    kserve_shown = shown - {"--host", "--max_batch_size", "--max_latency_ms", "--metrics-auth", "--access-log",
                            "--grpc-front", "--model_dir", "--help", "--event-loop", "--timeout-keep-alive"}
    assert {f.lstrip("-") for f in kserve_shown} <= KSERVE_FLAGS_USED


@pytest.mark.parametrize("command", ["validate", "package"])
def test_other_commands_help_runs_without_tensorflow(command: str) -> None:
    assert "usage:" in _help(command)


@pytest.mark.parametrize(("env", "said"), [
    ({"KCP_MODEL_THREADS": "0"}, "KCP_MODEL_THREADS='0': Input should be greater than or equal to 1"),
    ({"KCP_IMAGE_MAX_PIXELS": "lots"}, "KCP_IMAGE_MAX_PIXELS='lots'"),
])
def test_serve_names_the_bad_variable_and_exits_2(env: dict[str, str], said: str, tmp_path: Path) -> None:
    """The operator set a variable, not a pydantic field: the start-up error says which, before any model loads."""
    done = subprocess.run([sys.executable, "-m", "predictors", "serve", "--model_dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**{k: v for k, v in os.environ.items() if not k.startswith("KCP_")}, **env})
    assert done.returncode == 2, done.stderr
    assert said in done.stderr and "Traceback" not in done.stderr
