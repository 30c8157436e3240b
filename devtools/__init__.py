"""Development tools: the embedded broker, the end-to-end demo and the test-image producer.

Nothing here ships in an image: ``streaming`` (the bridge) and ``predictors`` (the model server) never import
this package. ``python -m devtools {broker,demo,produce-images}`` is the command line.
"""
