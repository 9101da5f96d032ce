"""Operations: the runbook (status, retry, cancel, pause, config, submit), pre-flight checks, the
fleet alerts, the smoke test, systemd notification."""
