"""Serve one package model with **stock** ``kserve.ModelServer().start([model])``, nothing of ours around it.

``python -m tests.support.stock_kserve PACKAGE_DIR --http_port P --grpc_port Q`` (KServe reads its
own flags from the command line). Proves the predictor classes are real KServe predictors: the
hooks work under KServe's own data plane, servers and error handling.
"""

from __future__ import annotations

import sys

import kserve

from predictors.models import ServingContext, model_for
from predictors.package import load_package
from predictors.settings import ServerSettings

if __name__ == "__main__":
    model = model_for(load_package(sys.argv[1]), ServingContext(settings=ServerSettings(prediction_log=False)))
    model.load()
    kserve.ModelServer().start([model])
