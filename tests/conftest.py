"""Real-process fixtures live in tests/fixtures/, one module per concern, loaded here as plugins."""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

pytest_plugins = [
    "tests.fixtures.ports",
    "tests.fixtures.packages",
    "tests.fixtures.server",
    "tests.fixtures.digits",
    "tests.fixtures.postgres",
    "tests.fixtures.k8s",
    "tests.fixtures.broker",
    "tests.fixtures.pubsub",
    "tests.fixtures.browser",
]


# --- test tiers -------------------------------------------------------------------------------------------
# `make test-fast` runs what needs no real process: a test is "integration" if it uses a fixture that starts
# one, or if its module starts processes itself (the model server, helm, a CLI). `make test` runs both tiers.
PROCESS_FIXTURES = frozenset({
    "model_server", "kafka_broker", "kafka_topics", "launch_bridge", "bridges", "browser", "ui_page",
    "postgres_server", "stoppable_postgres", "postgres_url", "pubsub_emulator", "emulator_launcher",
    "crd_apiserver", "secrets_api", "helm_template", "helm_template_text", "quick_packages", "trained_model_dir",
})
PROCESS_MARKERS = ("start_model_server", "subprocess", "Popen", "launch_bridge", "start_crd_apiserver")


def pytest_collection_modifyitems(config, items):
    import inspect

    import pytest

    starts_processes: dict[object, bool] = {}
    for item in items:
        module = getattr(item, "module", None)
        if module not in starts_processes:
            try:
                source = inspect.getsource(module) if module is not None else ""
            except (OSError, TypeError):
                source = ""
            starts_processes[module] = any(marker in source for marker in PROCESS_MARKERS)
        if starts_processes[module] or PROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
