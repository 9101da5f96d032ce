"""The deployment files: the systemd unit (checked by systemd-analyze where it exists), the
environment file example, and the Prometheus rules (checked and unit-tested by promtool).

promtool comes with Debian's `prometheus` package (scripts/test installs it when run as root);
without it, or without systemd-analyze, those tests skip and say why.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from reactor.cli.main import build_parser
from reactor.service import ServiceSettings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "reactor.service"
RecordProperty = Callable[[str, object], None]

#: the highest `systemd-analyze security` exposure we accept: 4.9 and below rate "OK" or better
MAX_EXPOSURE = 4.9


def unit_settings(path: Path = UNIT) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values (a key may repeat); comments and blank lines skipped."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"setting outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=value: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(values: dict[str, list[str]], key: str) -> str:
    assert key in values, f"{key}= missing"
    assert len(values[key]) == 1, f"{key}= given {len(values[key])} times"
    return values[key][0]


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min)?", value)
    assert m, f"not a simple time span: {value}"
    return float(m.group(1)) * (60 if m.group(2) == "min" else 1)


# -- the unit, read -----------------------------------------------------------------------------


def test_unit_runs_the_reactor_as_a_notify_service_with_a_watchdog() -> None:
    service = unit_settings()["Service"]
    assert one(service, "Type") == "notify"
    assert one(service, "NotifyAccess") == "main"
    exec_start = one(service, "ExecStart").split()
    assert exec_start[:3] == ["/opt/reactor/venv/bin/reactor", "run", "--journald"]
    args = build_parser().parse_args(exec_start[1:])  # the options exist
    assert args.journald is True
    assert one(service, "EnvironmentFile") == "/etc/reactor/reactor.env"
    assert one(service, "Restart") == "on-failure"
    assert one(service, "KillSignal") == "SIGTERM"

    watchdog = seconds(one(service, "WatchdogSec"))
    assert watchdog == 30
    # a listener outage shorter than the grace must not cost a restart: the grace spans several pings
    assert ServiceSettings(dsn="", orchestrator_url="").listener_grace_s >= 2 * watchdog

    # systemd must not SIGKILL a reactor that is still draining: the default drain, plus 5 s to
    # unregister and close, has to fit in TimeoutStopSec
    drain = build_parser().parse_args(["run"]).drain_seconds
    assert seconds(one(service, "TimeoutStopSec")) >= drain + 10


def test_unit_is_hardened() -> None:
    service = unit_settings()["Service"]
    expected = {
        "DynamicUser": "yes", "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "PrivateDevices": "yes", "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6", "ProtectKernelTunables": "yes",
        "ProtectControlGroups": "yes", "RestrictNamespaces": "yes", "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native", "UMask": "0077",
    }
    for key, value in expected.items():
        assert one(service, key) == value, key
    assert "@system-service" in service["SystemCallFilter"]


def test_env_example_documents_what_the_reactor_reads() -> None:
    text = (DEPLOY / "reactor.env.example").read_text()
    keys = set(re.findall(r"^#?([A-Z][A-Z0-9_]*)=", text, re.MULTILINE))
    assert {"DATABASE_URL", "REACTOR_ORCHESTRATOR_URL", "REACTOR_JWT_SECRET", "REACTOR_ALERT_WEBHOOK"} <= keys
    assert not re.search(r"^export ", text, re.MULTILINE), "systemd's EnvironmentFile has no `export`"
    for line in text.splitlines():
        if line and not line.startswith("#"):
            assert "CHANGE-ME" in line or "internal" in line, f"looks like a real value: {line}"


# -- the unit, checked by systemd ---------------------------------------------------------------


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return path


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """verify needs the unit's executable and the standard targets: give it a root that has them."""
    analyze = _systemd_analyze()
    units = Path("/usr/lib/systemd/system")
    if not (units / "multi-user.target").exists():
        pytest.skip(f"no systemd units in {units} to verify against")
    root = tmp_path / "root"
    shutil.copytree(units, root / "usr/lib/systemd/system", symlinks=True)
    exe = root / "opt/reactor/venv/bin/reactor"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    (root / "etc/reactor").mkdir(parents=True)
    (root / "etc/reactor/reactor.env").write_text("DATABASE_URL=postgresql://x/y\n")
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system/reactor.service")
    result = subprocess.run(
        [analyze, "verify", f"--root={root}", "/etc/systemd/system/reactor.service"],
        capture_output=True, text=True, timeout=120,
    )
    output = (result.stdout + result.stderr).strip()
    # unknown keys and bad values are warnings with exit status 0: any output is a finding
    assert result.returncode == 0 and output == "", output


def test_systemd_analyze_security_rates_the_unit_ok_or_better(
    tmp_path: Path, record_property: RecordProperty,
) -> None:
    analyze = _systemd_analyze()
    unit = tmp_path / "reactor.service"
    shutil.copy(UNIT, unit)
    result = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env={"SYSTEMD_COLORS": "0", "LANG": "C.UTF-8"},
    )
    output = result.stdout + result.stderr
    if "--offline" in output and "unrecognized" in output:
        pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", output)
    assert m, output
    exposure, rating = float(m.group(1)), m.group(2)
    record_property("systemd_exposure", f"{exposure} {rating}")
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} {rating}:\n{output}"


# -- the Prometheus rules -----------------------------------------------------------------------


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus; scripts/test does it as root)")
    return path


def test_promtool_check_rules() -> None:
    result = subprocess.run([_promtool(), "check", "rules", str(DEPLOY / "prometheus-alerts.yml")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_test_rules() -> None:
    result = subprocess.run([_promtool(), "test", "rules", str(DEPLOY / "prometheus-alerts.test.yml")],
                            capture_output=True, text=True, timeout=120, cwd=DEPLOY)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_rules_use_metrics_the_reactor_exports() -> None:
    """Every reactor_* series the rules read is one reactor/web/metrics.py defines (or, for
    reactor_circuit_open, one it is expected to define: the test says which are missing)."""
    rules = (DEPLOY / "prometheus-alerts.yml").read_text()
    used = {re.sub(r"_(sum|count|bucket)$", "", m) for m in re.findall(r"\b(reactor_[a-z_]+)", rules)}
    source = (REPO / "reactor" / "web" / "metrics.py").read_text()
    defined = set(re.findall(r'"(reactor_[a-z_]+)"', source))
    defined |= {f"{name}_total" for name in defined}  # prometheus_client adds _total to counters
    missing = sorted(used - defined - {"reactor_circuit_open"})
    assert not missing, f"the rules read series reactor/web/metrics.py does not export: {missing}"
