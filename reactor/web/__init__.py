"""The live feed on one port: HTTP routing and probes, websocket sessions and auth, fan-out of job
events, metrics; the dashboard is plugged in by the service. Never imports ``reactor.ops``."""
