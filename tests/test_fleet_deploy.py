"""deploy/: the unit runs the service as Type=notify with a watchdog; deploy/fleet.conf opens only the network."""
from __future__ import annotations

import re
import shutil

import pytest

from test_deploy import DEPLOY, UNIT, _verifiable_unit, _verify, one, unit_entries

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
def test_unit_with_fleet_dropin_passes_verify(tmp_path):
    unit = _verifiable_unit(tmp_path, UNIT.read_text())
    d = unit.parent / "sem-inspect.service.d"
    d.mkdir()
    shutil.copy(FLEET_DROPIN, d / "fleet.conf")
    proc = _verify(unit)
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stdout + proc.stderr
