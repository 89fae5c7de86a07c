"""rexec: remote execution over RabbitMQ, one namespace for all of it.

- ``rexec.dispatcher``: the orchestration plane (``rexec serve``).
- ``rexec.worker``: the execution plane's agent (``rexec-agent``); task code imports
  ``rexec.worker.context``.
- ``rexec.schemas``: the wire messages and settings both planes share, and nothing else.
- ``rexec.client``: the Python client and the operator CLI (``rexec``).

The subpackages live in the repository's top-level folders; ``rexec/`` links to them, so a
customer package named ``worker`` or ``schemas`` never meets rexec's own.
"""
