"""The rexec agent: the execution plane's process that runs a pool's tasks.

It consumes its pool's queue, claims each attempt with a Redis lease, reports events to the
orchestration plane over RabbitMQ, and runs functions in persistent child processes (commands
in their own process groups) so that any attempt can be killed without harming the agent.
"""
