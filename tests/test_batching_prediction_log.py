"""Group commit of the prediction log against a real SQLite feedback store.

The guarantee callers rely on: when ``record`` returns, the rows are committed (feedback
sent right after the response finds its prediction). The point of grouping: concurrent
callers share transactions.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest

from predictors.confusion import confusion_matrix_from_store as _unused  # noqa: F401
