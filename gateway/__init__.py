"""OneSignal webhook and Event Streams gateway: verified events into Kafka, tags back to users."""

__version__ = "0.1.0"
