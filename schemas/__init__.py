"""Everything the orchestration plane and the agents share: wire messages, API bodies, names."""
