"""The functional core: what an event is and how a body becomes one. Pure: no I/O, no clock.

``body`` decodes request bodies, ``trust`` resolves the client address, ``normalize`` turns a
payload into a :class:`~gateway.core.event.NormalizedEvent`, ``dedupe`` remembers sender ids,
``records`` builds the CloudEvents Kafka record, ``kinds`` owns the event vocabulary, and
``ingest`` decides one body (publish, dead-letter or refuse) for the ingress and replay.
"""
