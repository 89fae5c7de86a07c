"""The orchestration plane: metadata database, Remote Execution API, relay, events, watchdog."""
