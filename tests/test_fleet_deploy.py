"""deploy/: the unit runs the service as Type=notify with a watchdog; deploy/fleet.conf opens only the network."""
from __future__ import annotations

import re
import shutil

import pytest

from tests.support.deploy import DEPLOY, UNIT, one, run_install, system_python, unit_entries, verifiable_unit, verify_unit

FLEET_DROPIN = DEPLOY / "fleet.conf"


def test_unit_is_notify_with_a_watchdog():
    e = unit_entries(UNIT.read_text())
    assert one(e, "Service.Type") == "notify"
    assert one(e, "Service.NotifyAccess") == "main"
    assert re.fullmatch(r"\d+(s|min)", one(e, "Service.WatchdogSec"))


def test_fleet_dropin_opens_the_network_and_nothing_else():
    base, dropin = unit_entries(UNIT.read_text()), unit_entries(FLEET_DROPIN.read_text())
    assert one(dropin, "Service.PrivateNetwork") == "no"
    assert set(one(dropin, "Service.RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert set(dropin) == {"Service.PrivateNetwork", "Service.RestrictAddressFamilies", "Service.IPAddressDeny",
                           "Service.IPAddressAllow"}
    assert set(dropin) - {"Service.IPAddressAllow"} <= set(base), "it only relaxes what the unit locks down"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not installed (apt-get install systemd)")
def test_unit_with_fleet_dropin_passesverify_unit(tmp_path):
    unit = verifiable_unit(tmp_path, UNIT.read_text())
    d = unit.parent / "sem-inspect.service.d"
    d.mkdir()
    shutil.copy(FLEET_DROPIN, d / "fleet.conf")
    proc = verify_unit(unit)
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stdout + proc.stderr


def test_install_dry_run_with_fleet_adds_the_extra_and_the_dropin(tiny_bundle, tmp_path):
    python = system_python()
    if python is None:
        pytest.skip("no system Python 3.11/3.12 with venv outside /root and /home (install.sh needs one)")
    prefix, data, conf = tmp_path / "opt", tmp_path / "data", tmp_path / "etc"
    common = ["--dry-run", "--bundle", str(tiny_bundle), "--python", python, "--prefix", str(prefix),
              "--data-dir", str(data), "--config-dir", str(conf)]
    plain, fleet = run_install(*common), run_install(*common, "--fleet")
    assert plain.returncode == 0 and fleet.returncode == 0, fleet.stdout + fleet.stderr
    assert re.search(r"pip .*install --quiet \S+/src\\\[fleet\\\]", fleet.stdout), fleet.stdout
    assert re.search(r"install -D -m 0644 \S+/deploy/fleet.conf /etc/systemd/system/sem-inspect.service.d/fleet.conf",
                     fleet.stdout), fleet.stdout
    assert "[fleet]" not in plain.stdout and "fleet.conf" not in plain.stdout      # only when asked
    assert not prefix.exists()
