"""Streaming: requests in on a message broker, V2 inference, results out -- at least once.

The public surface is the :class:`~streaming.messenger.Messenger` (Kafka or Google Pub/Sub),
the :class:`~streaming.bridge.Bridge`, the producers and the results consumer; the command line
is ``python -m streaming {bridge,produce,results,create-topics}``. This package talks to model servers
only over the Open Inference Protocol (V2), never by importing ``predictors``, and holds runtime
code only: development tools (embedded broker, demo, test images) are in ``devtools``.
"""

from streaming.messenger import Delivery, Message, Messenger, RequestTimeout

__all__ = ["Delivery", "Message", "Messenger", "RequestTimeout"]
