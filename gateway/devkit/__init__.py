"""For the demo, the tests and the benchmark, never the production path: sample payloads, a
loopback OneSignal, the embedded mock broker, real Apache Kafka on loopback, a load generator."""
