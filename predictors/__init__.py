"""KServe custom predictors for classifier model packages, over the Open Inference Protocol."""
