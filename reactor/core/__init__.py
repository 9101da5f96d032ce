"""Pure decisions and data: models, the typed NOTIFY notice, retry policy, backoff, the circuit
breaker, errors, log formatting. Nothing here does I/O; it imports no other layer of the reactor."""
