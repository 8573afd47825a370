"""benchmarks.attack's central-side groups, run through the benchmark's own functions on this checkout: every
case of the broker group, and the read API's NUL filter over a small SQLite database, report "held"."""
from __future__ import annotations

from types import SimpleNamespace

from benchmarks.attack_central import Api, build_results_db, case_nul_filter, run_broker
from tests.support.mosquitto import MOSQUITTO_PASSWD, needs_mosquitto
from tests.support.paths import REPO

import pytest


@needs_mosquitto
@pytest.mark.skipif(MOSQUITTO_PASSWD is None, reason="mosquitto_passwd is not installed")
def test_every_broker_case_holds_with_the_shipped_config(tmp_path):
    pytest.importorskip("paho.mqtt.client", reason='paho-mqtt is not installed (pip install "sem-inspect[fleet]")')
    report = run_broker(SimpleNamespace(repo=REPO), tmp_path)
    assert report["listeners"] == 2
    verdicts = {case: report[case]["verdict"] for case in ("collector-id", "board-id", "presence", "central-port")}
    assert verdicts == dict.fromkeys(verdicts, "held"), report
    assert report["collector-id"]["stored_after_restart"] == report["collector-id"]["queued"]


def test_a_nul_in_a_filter_is_a_bad_parameter_for_the_read_api(tmp_path):
    db = tmp_path / "central.sqlite3"
    build_results_db(REPO, db, rows=200)
    api = Api(REPO, str(db), tmp_path / "api.log")
    try:
        report = case_nul_filter(api)
    finally:
        api.stop()
    assert report["verdict"] == "held", report
