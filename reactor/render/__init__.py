"""The orchestrator client: one HTTP/1.1 ``POST /render`` per attempt, answers mapped to categories."""
