"""The review page in a real headless browser (Debian `chromium` + `chromium-driver`, driven by Selenium),
against `edge-inspect review` running as a process: it loads, shows the queue in order, keyboard reviews land
in the store, a conflicting edit is reported, and a screenshot is kept as a test artefact.

Skips with the reason where Chromium, chromedriver or Selenium is missing or Chromium cannot start
(`.ci/run` installs chromium and chromium-driver; Selenium is in the `dev` extra)."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from PIL import Image

from benchmarks.browser import BrowserUnavailable, quit_chromium, start_chromium, wait_for
from tests.support.paths import REPO
from tests.support.review import Client, db_rows, make_review_site, start_review_cli

# Where the screenshot goes (kept after the run; out/ is git-ignored).
ARTEFACTS = Path(os.environ.get("TEST_ARTEFACTS", REPO / "out" / "test-artefacts"))
WINDOW = (1600, 1000)


@pytest.fixture(scope="module")
def browser():
    try:
        driver = start_chromium(WINDOW)
    except BrowserUnavailable as exc:
        pytest.skip(str(exc))
    yield driver
    quit_chromium(driver)


@pytest.fixture
def page(tmp_path, tiny_bundle, browser):
    """A fresh site, `edge-inspect review` serving it, and the browser on its page (fresh localStorage)."""
    site = make_review_site(tmp_path / "site", tiny_bundle)
    proc, url = start_review_cli(site["db"])
    try:
        browser.get(url)
        browser.execute_script("localStorage.clear()")
        browser.get(url)
        wait_for(browser, "return document.body.dataset.ready === '1'")
        yield {**site, "url": url, "browser": browser, "client": Client(int(url.rstrip("/").rsplit(":", 1)[1]))}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def queue_ids(browser) -> list[int]:
    return browser.execute_script("return [...document.querySelectorAll('#queue li')].map(li => +li.dataset.id)")


def current_id(browser) -> int:
    return int(browser.execute_script("return document.body.dataset.current"))


def press(browser, *keys):
    from selenium.webdriver.common.action_chains import ActionChains
    for key in keys:
        ActionChains(browser).send_keys(key).perform()


def status_after(browser, before: str) -> str:
    wait_for(browser, f"return document.getElementById('status').textContent !== {before!r}")
    return browser.find_element("id", "status").text


def test_page_loads_with_the_queue_in_order_and_the_first_image(page):
    b = page["browser"]
    assert queue_ids(b) == page["order"]
    first = page["ids"]["b"]
    assert current_id(b) == first
    facts = b.find_element("id", "facts").text
    assert "cracks" in facts and "P(defective) 0.800" in facts and "threshold 0.500" in facts
    top3 = b.execute_script("return [...document.querySelectorAll('.top3 .cls')].map(e => e.textContent)")
    assert top3 == ["cracks", "bridges", "opens"]
    assert b.execute_script("const i = document.getElementById('image'); return i.complete && i.naturalWidth") == 48
    assert b.find_element("id", "queue-count").text == "6 in this view"
    assert "6 results, 2 flagged" in b.find_element("id", "states").text
    buttons = b.execute_script("return [...document.querySelectorAll('#actions button')].map(e => e.textContent)")
    assert buttons[:8] == [f"{k + 1} {c}" for k, c in enumerate(
        ["clean", "bridges", "cracks", "opens", "shorts", "scratches", "vias", "other"])]


def test_keyboard_reviews_land_in_the_store_and_a_screenshot_is_kept(page):
    b, ids = page["browser"], page["ids"]
    press(b, "4")                                       # no operator name yet: refused, nothing stored
    assert "Operator" in status_after(b, "")
    assert db_rows(page["db"], "SELECT * FROM reviews") == []
    name = b.find_element("id", "operator")
    name.send_keys("Ann Operator")
    press(b, "\ue00c")                                  # Escape: leave the field, keys go to the page again

    before = b.find_element("id", "status").text
    press(b, "4")                                       # 4 = opens: corrects b (model: cracks)
    assert "saved" in status_after(b, before)
    rows = db_rows(page["db"], "SELECT result_id, old_label, new_label, reviewer FROM reviews ORDER BY id")
    assert rows == [{"result_id": ids["b"], "old_label": "cracks", "new_label": "opens", "reviewer": "Ann Operator"}]
    assert queue_ids(b) == page["order"][1:] and current_id(b) == ids["a"]   # it left the to-do queue

    before = b.find_element("id", "status").text
    press(b, "\ue007")                                  # Enter: confirm a's label (bridges)
    status_after(b, before)
    before = b.find_element("id", "status").text
    press(b, "0")                                       # unusable: c
    status_after(b, before)
    rows = db_rows(page["db"], "SELECT result_id, old_label, new_label FROM reviews ORDER BY id")[1:]
    assert rows == [{"result_id": ids["a"], "old_label": "bridges", "new_label": "bridges"},
                    {"result_id": ids["c"], "old_label": "opens", "new_label": "unusable"}]
    assert current_id(b) == ids["e"]
    wait_for(b, "return document.getElementById('states').textContent.includes('corrected 1')")
    assert "cracks → opens: 1" in b.find_element("id", "corrections").text

    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTEFACTS / "review_page.png"
    assert b.save_screenshot(str(shot))
    with Image.open(shot) as img:
        assert img.format == "PNG" and img.size[0] == WINDOW[0]

    b.refresh()                                         # the operator name is remembered
    wait_for(b, "return document.body.dataset.ready === '1'")
    assert b.find_element("id", "operator").get_attribute("value") == "Ann Operator"
    assert queue_ids(b) == [ids["e"], ids["d"], ids["f"]]


def test_a_conflicting_edit_is_reported_and_can_then_be_overridden(page):
    b, ids = page["browser"], page["ids"]
    b.find_element("id", "operator").send_keys("Bob")
    press(b, "\ue00c")
    target = current_id(b)
    assert page["client"].review(target, "clean", reviewer="Ann", expected=0)[0] == 201   # meanwhile, elsewhere
    before = b.find_element("id", "status").text
    press(b, "3")                                       # Bob's page still shows no review: refused
    text = status_after(b, before)
    assert "reviewed meanwhile by Ann" in text and "nothing saved" in text
    assert db_rows(page["db"], "SELECT reviewer, new_label FROM reviews") == [{"reviewer": "Ann", "new_label": "clean"}]
    before = text
    press(b, "3")                                       # now informed: his correction replaces Ann's
    assert "saved" in status_after(b, before)
    assert db_rows(page["db"], "SELECT reviewer, old_label, new_label FROM reviews ORDER BY id") == [
        {"reviewer": "Ann", "old_label": "cracks", "new_label": "clean"},
        {"reviewer": "Bob", "old_label": "clean", "new_label": "cracks"}]
    assert target == ids["b"]


def test_a_page_from_a_rebound_name_can_neither_read_nor_review(page):
    """DNS rebinding in the browser: Chromium resolves *.localhost to 127.0.0.1, as an attacker's name rebound
    to the board would. Before: the page from that name loaded, read the whole queue and stored a review (its
    Origin matched its Host). Now the server refuses every request naming another host: nothing is read, nothing
    is stored."""
    b = page["browser"]
    rebound = page["url"].replace("127.0.0.1", "rebound.localhost")
    b.get(rebound)
    assert "does not answer to the name" in b.find_element("tag name", "body").text
    assert "a.png" not in b.page_source
    statuses = b.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const review = {label: 'opens', reviewer: 'mallory', expected_review_id: 0};
        Promise.all([
            fetch('/api/queue?state=all').then(r => r.status),
            fetch('/api/results/1/reviews', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                             body: JSON.stringify(review)}).then(r => r.status),
        ]).then(done, err => done(String(err)));""")
    assert statuses == [421, 421], statuses
    assert db_rows(page["db"], "SELECT * FROM reviews") == []


def test_five_keys_in_quick_succession_all_apply_in_order_to_the_images_shown(page):
    """Issue 20: keys pressed while a review was being stored were dropped without a word. Five class keys in
    one burst: five reviews, in order, each of the image that was shown when its key was pressed."""
    b, order = page["browser"], page["order"]
    b.find_element("id", "operator").send_keys("Cy")
    press(b, "\ue00c")
    from selenium.webdriver.common.action_chains import ActionChains
    chain = ActionChains(b)
    for key in "23456":
        chain.send_keys(key)
    chain.perform()                                     # one burst: no waiting between the keys
    wait_for(b, "return document.getElementById('status').textContent.includes('saved') && "
                f"document.querySelectorAll('#queue li').length === {len(order) - 5}")
    rows = db_rows(page["db"], "SELECT result_id, new_label, reviewer FROM reviews ORDER BY id")
    assert rows == [{"result_id": rid, "new_label": label, "reviewer": "Cy"}
                    for rid, label in zip(order[:5], ["bridges", "cracks", "opens", "shorts", "scratches"])]
    assert current_id(b) == order[5]


def test_a_shadow_answer_is_shown_beside_the_model(page):
    """The candidate bundle's answer on an image (shadow_results) appears beside the model's, marked as such."""
    import sqlite3
    b, first = page["browser"], page["ids"]["b"]
    con = sqlite3.connect(page["db"])
    try:
        con.execute("INSERT INTO shadow_results (result_id, candidate_id, label, stage1_score, confidence, review, "
                    "agree, stage1_agree, recorded_at) VALUES (?, ?, 'bridges', 0.9, 0.7, 0, 0, 1, "
                    "'2026-12-02T00:00:00+00:00')", (first, "c" * 64))
        con.commit()
    finally:
        con.close()
    b.refresh()
    wait_for(b, "return document.body.dataset.ready === '1'")
    facts = b.find_element("id", "facts").text
    assert "candidate" in facts and f"bundle {'c' * 12}: bridges" in facts and "differs from the model" in facts
    assert "shadow run: not the result" in facts


def test_reviews_that_disagree_are_shown_and_settled_from_the_page(page):
    """The same image content reviewed as two classes: the page lists the conflict with both reviews, a link
    shows the other copy (not in the to-do queue), and reviewing it again to the first label clears the list."""
    from edge_runtime.db.store import Store
    from tests.support.review import add_result

    b, ids, c = page["browser"], page["ids"], page["client"]
    assert b.execute_script("return document.body.dataset.conflicts") == "0"
    assert not b.find_element("id", "conflicts-pane").is_displayed()
    (page["processed"] / "twin.png").write_bytes((page["processed"] / "a.png").read_bytes())
    store = Store(page["db"])
    try:
        twin = add_result(store, page["processed"], "twin.png", label="bridges", score=0.9,
                          bundle_id=page["bundle_id"])
    finally:
        store.close()
    assert c.review(ids["a"], "bridges", reviewer="Ann")[0] == 201
    assert c.review(twin, "other", reviewer="Bob")[0] == 201
    b.refresh()
    wait_for(b, "return document.body.dataset.ready === '1' && document.body.dataset.conflicts === '1'")
    pane = b.find_element("id", "conflicts-pane")
    assert pane.is_displayed()
    _, listed = c.get("/api/conflicts")
    text = pane.text
    assert listed["conflicts"][0]["sha256"][:16] in text
    assert f"#{ids['a']} bridges a.png · Ann" in text and f"#{twin} other twin.png · Bob" in text
    assert twin not in queue_ids(b)                     # reviewed: not in the to-do queue

    b.find_element("id", "operator").send_keys("Bob")
    press(b, "\ue00c")
    b.find_element("css selector", f"#conflicts a[data-id='{twin}']").click()
    wait_for(b, f"return document.body.dataset.current === '{twin}'")
    assert "other" in b.find_element("id", "facts").text
    before = b.find_element("id", "status").text
    press(b, "2")                                       # 2 = bridges: as the other copy
    assert "saved" in status_after(b, before)
    wait_for(b, "return document.body.dataset.conflicts === '0'")
    assert not b.find_element("id", "conflicts-pane").is_displayed()
    assert db_rows(page["db"], "SELECT new_label, reviewer FROM reviews WHERE result_id = ? ORDER BY id DESC LIMIT 1",
                   (twin,)) == [{"new_label": "bridges", "reviewer": "Bob"}]
