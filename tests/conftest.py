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
