"""The board's side of a rollout (`bundles_dir:` set, with mqtt and trusted_keys): fetch, verify, shadow, then
promote or keep the old bundle; roll back on request. Messages: edge_runtime/fleet/rollout_message.py.

    rollout message ──> fetching ──> (sha256 of the archive, unpack into staging, the one bundle reader: every
                        file's sha256 and the signature by a trusted key, rename into BUNDLES_DIR/<id16>)
                    ──> shadow (the candidate beside the current bundle: edge_runtime/service/shadow.py) for
                        shadow.images images or shadow.minutes minutes, whichever comes first
                    ──> promoted: `models` (a symlink) re-pointed atomically, the candidate becomes the current
                        bundle without a restart (the image in hand finished on the old one)
                     or rejected: agreement or error rate outside the rollout's bounds; the old bundle stays
    rollback message ──> `models` re-pointed to the previous bundle (or the one named), loaded and checked first

Downgrades: the signature states a release counter (edge_runtime/signing.py); a candidate whose release is lower
than the highest this board accepted (`release_floor` in the state, raised by each promotion and by the running
bundle) is refused, so an older signed bundle cannot be replayed; only a rollback message goes back.
Downloads follow the one download policy (edge_runtime/service/download.py); a refused, rejected or replaced
rollout leaves nothing in the staging folder.

Every step is written to BUNDLES_DIR/rollout-state.json (atomically) before it is taken, so a kill -9 anywhere
resumes where it was: a download resumes (HTTP Range) or starts over, a shadow goes on from the images already
stored, a promotion whose symlink was already re-pointed is finished. Each message id is handled once (the
retained message comes again at every reconnect). Anything refused is said once in the log, on the status topic
(last_change) and in /healthz, and changes nothing. The last `bundle_keep` bundles stay on disk.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import queue
import shutil
from pathlib import Path

from edge_runtime.bundle import BundleError, load_bundle, release_signature
from edge_runtime.db.store import utc_now
from edge_runtime.fleet import rollout_message
from edge_runtime.service.bundles import (
    STAGING,
    STATE,
    Fetcher,
    clean_staging,
    prune,
    repoint,
    unpack,
    version_dir,
    write_json_atomic,
)
from edge_runtime.service.download import DownloadPolicy, FetchError
from edge_runtime.signing import SignatureError, release_of

log = logging.getLogger("edge_inspect")
HANDLED_KEPT = 50


def _age_minutes(since: str) -> float:
    then = _dt.datetime.fromisoformat(since)
    return (_dt.datetime.now(_dt.timezone.utc) - then).total_seconds() / 60.0


class RolloutAgent:
    """Driven from the watch service's thread (tick); receive() is called from paho's thread. bundles: the
    service's ActiveBundles (edge_runtime/service/active.py), which it shadows, promotes and rolls back; wake:
    wakes the service's thread (a message arrived, a download ended)."""

    def __init__(self, bundles, cfg, wake):
        self.bundles, self.cfg, self.wake = bundles, cfg, wake
        self.dir = Path(cfg.bundles_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.staging = self.dir / STAGING
        self.state_path = self.dir / STATE
        self.inbox: queue.Queue = queue.Queue(maxsize=100)
        self.fetcher: Fetcher | None = None
        self.state = self._read_state()
        self.models = Path(cfg.models)
        if not self.models.is_symlink():
            raise BundleError(f"models: {self.models} must be a symlink for rollouts (bundles_dir is set): the board "
                              "re-points it to each new bundle")
        self.policy = DownloadPolicy(max_bytes=cfg.rollout_max_bytes, total_seconds=cfg.rollout_fetch_seconds,
                                     min_rate=cfg.rollout_min_rate, reserve_bytes=cfg.rollout_reserve_bytes)
        self._raise_floor(_release(Path(bundles.bundle.root)))

    # -- state ----------------------------------------------------------------------------------------------
    def _read_state(self) -> dict:
        import json
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
            if isinstance(state, dict):
                return state
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.warning("rollout: %s unreadable (%s); starting from the running bundle", self.state_path, exc)
        return {"previous": [], "candidate": None, "handled": [], "last_change": None}

    def _raise_floor(self, release: int) -> None:
        self.state["release_floor"] = max(int(self.state.get("release_floor", 0)), release)

    def _save(self) -> None:
        self.state["handled"] = self.state["handled"][-HANDLED_KEPT:]
        write_json_atomic(self.state_path, self.state)

    def _change(self, what: str, bundle_id: str | None, why: str, rollout_id: str | None = None) -> None:
        self.state["last_change"] = {"at": utc_now(), "what": what, "bundle_id": bundle_id, "why": why,
                                     "rollout": rollout_id}
        (log.info if what in ("promoted", "rolled back", "shadowing", "already current") else log.warning)(
            "rollout%s: %s %s: %s", f" {rollout_id}" if rollout_id else "", what, (bundle_id or "-")[:16], why)

    def report(self) -> dict:
        """What the status topic and /healthz say (any thread: reads only replaced references)."""
        cand = self.state.get("candidate")
        return {"previous": [p["bundle_id"] for p in self.state.get("previous", [])],
                "candidate": None if not cand else {"bundle_id": cand["bundle_id"], "phase": cand["phase"],
                                                    "rollout": cand["rollout"]["id"], "since": cand.get("since")},
                "last_change": self.state.get("last_change")}

    # -- messages (paho's thread) ----------------------------------------------------------------------------
    def receive(self, payload: bytes) -> None:
        try:
            self.inbox.put_nowait(bytes(payload))
        except queue.Full:
            log.warning("rollout: %d messages waiting; dropped one (the retained message comes again at the next "
                        "connection)", self.inbox.qsize())
        self.wake()

    # -- the service's thread --------------------------------------------------------------------------------
    def start(self) -> None:
        """After a restart: go on with what the state file says was under way."""
        cand = self.state.get("candidate")
        keep = {cand["rollout"].get("sha256")} if cand and cand["phase"] == "fetching" else set()
        clean_staging(self.staging, keep)       # what interrupted rollouts left, but a download to resume
        if not cand:
            return
        if cand["phase"] == "promoting":
            self._finish_promotion(cand)
        elif cand["phase"] == "fetching":
            log.info("rollout %s: resuming the download of %s", cand["rollout"]["id"], cand["bundle_id"][:16])
            self._start_fetch(rollout_message.parse(_dump(cand["rollout"])))
        elif cand["phase"] == "shadow":
            self._start_shadow(cand, resumed=True)

    def tick(self) -> bool:
        """Handle messages, a finished download, the end of a shadow. Called with no group transaction open.
        Returns whether the state changed (the status is then published)."""
        changed = False
        while True:
            try:
                payload = self.inbox.get_nowait()
            except queue.Empty:
                break
            changed |= self._message(payload)
        if self.fetcher is not None and self.fetcher.done.is_set():
            changed |= self._fetched()
        cand = self.state.get("candidate")
        if cand and cand["phase"] == "shadow" and self.bundles.shadow is not None:
            changed |= self._judge(cand)
        return changed

    def _message(self, payload: bytes) -> bool:
        try:
            msg = rollout_message.parse(payload)
        except rollout_message.MessageError as exc:
            self._change("refused", None, f"rollout message refused: {exc}")
            self._save()
            return True
        if msg.id in self.state["handled"]:
            return False            # the retained copy, again
        cand = self.state.get("candidate")
        if cand and cand["rollout"]["id"] == msg.id:
            return False            # under way already (resumed at start)
        if msg.action == "rollback":
            self._cancel_candidate("cancelled by a rollback")
            self._rollback(msg)
            self.state["handled"].append(msg.id)
            self._save()
            return True
        if cand:
            self._cancel_candidate(f"replaced by rollout {msg.id}")
        current = self.bundles.bundle.bundle_id
        if msg.bundle_id == current:
            self.state["handled"].append(msg.id)
            self._change("already current", msg.bundle_id, "the board already runs this bundle", msg.id)
            self._save()
            return True
        self._start_fetch(msg)
        return True

    def _start_fetch(self, msg) -> None:
        self.state["candidate"] = {"bundle_id": msg.bundle_id, "phase": "fetching", "rollout": msg.raw,
                                   "since": utc_now()}
        self._save()
        target = version_dir(self.dir, msg.bundle_id)
        if target.is_dir():                 # fetched before (e.g. a rollback's neighbour): checked again on load
            self._verified(msg, target)
            return
        self.staging.mkdir(exist_ok=True)
        self.fetcher = Fetcher(msg.url, msg.sha256, msg.bytes, self.staging, self.policy, on_done=self.wake)
        self.fetcher.msg = msg
        log.info("rollout %s: fetching %s from %s", msg.id, msg.bundle_id[:16], msg.url)
        self.fetcher.start()

    def _fetched(self) -> bool:
        fetcher, self.fetcher = self.fetcher, None
        msg = fetcher.msg
        cand = self.state.get("candidate")
        if not cand or cand["rollout"]["id"] != msg.id:
            return False            # cancelled meanwhile
        if fetcher.error is not None:
            return self._refuse(msg, f"download failed: {fetcher.error}")
        work = self.staging / msg.bundle_id[:16]
        try:
            unpack(fetcher.archive, work, self.cfg.rollout_max_bytes)
            (work / "manifest.sig").write_bytes(rollout_message.signature_bytes(msg))
            bundle = load_bundle(work, self.cfg.variant, trusted_keys=self.cfg.trusted_keys)  # every file + signature
            if bundle.bundle_id != msg.bundle_id:
                raise BundleError(f"the archive holds bundle {bundle.bundle_id[:16]}, the rollout names "
                                  f"{msg.bundle_id[:16]}")
            target = version_dir(self.dir, msg.bundle_id)
            if target.exists():
                shutil.rmtree(target)
            os.rename(work, target)
        except (FetchError, BundleError, OSError) as exc:
            shutil.rmtree(work, ignore_errors=True)
            return self._refuse(msg, str(exc))
        finally:
            fetcher.archive.unlink(missing_ok=True)
        log.info("rollout %s: %s fetched (%d bytes%s) and verified (signed by %s) into %s", msg.id,
                 msg.bundle_id[:16], msg.bytes or 0, f", resumed at {fetcher.resumed_from}" if fetcher.resumed_from
                 else "", bundle.signed_by, target)
        return self._verified(msg, target)

    def _verified(self, msg, target: Path) -> bool:
        cand = self.state["candidate"]
        release, floor = _release(target), int(self.state.get("release_floor", 0))
        if release < floor:
            return self._refuse(msg, f"release {release} is older than release {floor}, the highest this board "
                                     "accepted (a downgrade); only a rollback message goes back")
        cand.update(phase="shadow", path=str(target), since=utc_now(), release=release)
        self._save()
        return self._start_shadow(cand)

    def _start_shadow(self, cand: dict, resumed: bool = False) -> bool:
        msg = rollout_message.parse(_dump(cand["rollout"]))
        try:
            self.bundles.start_shadow(cand["path"], msg.shadow["fraction"], since=cand["since"], source=msg.id)
        except Exception as exc:            # BundleError, NoInterpreter: the candidate cannot run here
            return self._refuse(msg, f"candidate does not load: {exc}")
        self._change("shadowing", msg.bundle_id, f"{'resumed: ' if resumed else ''}candidate beside the current "
                     f"bundle for {msg.shadow['images']} images or {msg.shadow['minutes']:g} minutes "
                     f"(fraction {msg.shadow['fraction']:g})", msg.id)
        self._save()
        return True

    def _judge(self, cand: dict) -> bool:
        msg = rollout_message.parse(_dump(cand["rollout"]))
        timed_out = _age_minutes(cand["since"]) >= msg.shadow["minutes"]
        shadow = self.bundles.shadow
        if shadow.images < msg.shadow["images"] and not timed_out:
            return False
        summary = shadow.refresh(force=True)
        n, b = summary["images"], msg.bounds
        failed = []
        if n == 0:
            failed.append(f"no image shadowed within {msg.shadow['minutes']:g} minutes")
        else:
            for key, value, bound, ok in (
                    ("label agreement", summary["agreement"], b["min_agreement"], summary["agreement"] >= b["min_agreement"]),
                    ("Stage-1 agreement", summary["stage1_agreement"], b["min_stage1_agreement"],
                     summary["stage1_agreement"] >= b["min_stage1_agreement"]),
                    ("error rate", summary["error_rate"], b["max_error_rate"], summary["error_rate"] <= b["max_error_rate"])):
                if not ok:
                    failed.append(f"{key} {value:.3f} {'>' if key == 'error rate' else '<'} {bound:g}")
        figures = (f"over {n} images: agreement {summary['agreement'] if n else 0:.3f}, Stage-1 "
                   f"{summary['stage1_agreement'] if n else 0:.3f}, error rate {summary['error_rate'] if n else 0:.3f}")
        if failed:
            self.bundles.stop_shadow()
            self.state["candidate"] = None
            self.state["handled"].append(msg.id)
            self._change("rejected", msg.bundle_id, f"kept the current bundle: {'; '.join(failed)} ({figures})",
                         msg.id)
            self._prune()           # the rejected candidate's folder goes (the kept ones stay)
            self._save()
            return True
        old = self.bundles.bundle
        cand.update(phase="promoting", why=figures, previous={"bundle_id": old.bundle_id, "path": str(old.root)})
        self._save()
        self._finish_promotion(cand)
        return True

    def _finish_promotion(self, cand: dict) -> None:
        """Re-point `models` to the candidate and make it current (idempotent: resumed after a kill)."""
        msg_id = cand["rollout"]["id"]
        target = Path(cand["path"])
        if os.path.realpath(self.models) != str(target.resolve()):
            repoint(self.models, target)
        if self.bundles.bundle.bundle_id != cand["bundle_id"]:
            error = self.bundles.promote(target, f"rollout {msg_id}")
            if error:           # it loaded in shadow a moment ago: only a damaged disk gets here
                repoint(self.models, Path(cand["previous"]["path"]))
                self._refuse(rollout_message.parse(_dump(cand["rollout"])), f"promotion failed: {error}")
                return
        self._remember_previous(cand["previous"]["bundle_id"], cand["previous"]["path"])
        self._raise_floor(int(cand.get("release", 0)))
        self.state["candidate"] = None
        self.state["handled"].append(msg_id)
        self._change("promoted", cand["bundle_id"], cand.get("why", "promotion finished after a restart"), msg_id)
        self._prune()
        self._save()

    def _remember_previous(self, bundle_id: str, path: str) -> None:
        prev = [p for p in self.state["previous"] if p["bundle_id"] != bundle_id]
        self.state["previous"] = [{"bundle_id": bundle_id, "path": path}] + prev

    def _prune(self) -> None:
        current = Path(self.bundles.bundle.root)
        keep = [current] + [Path(p["path"]) for p in self.state["previous"]]
        removed = prune(self.dir, keep, self.cfg.bundle_keep)
        gone = {p.resolve() for p in removed}
        self.state["previous"] = [p for p in self.state["previous"] if Path(p["path"]).resolve() not in gone]
        if removed:
            log.info("rollout: removed %d old bundle(s) (bundle_keep %d)", len(removed), self.cfg.bundle_keep)

    def _refuse(self, msg, why: str) -> bool:
        shadow = self.bundles.shadow
        if shadow is not None and shadow.bundle_id == msg.bundle_id:
            self.bundles.stop_shadow()
        self._drop_downloads()
        self.state["candidate"] = None
        self.state["handled"].append(msg.id)
        self._change("refused", msg.bundle_id, f"kept the current bundle: {why}", msg.id)
        self._save()
        return True

    def _cancel_candidate(self, why: str) -> None:
        cand = self.state.get("candidate")
        if not cand:
            return
        self._drop_downloads()
        if self.bundles.shadow is not None:
            self.bundles.stop_shadow()
        self.state["handled"].append(cand["rollout"]["id"])
        self.state["candidate"] = None
        self._change("cancelled", cand["bundle_id"], why, cand["rollout"]["id"])

    def _drop_downloads(self) -> None:
        """Stop any download and empty the staging folder: at most one download is ever kept, and only the one
        under way (to be resumed after a restart)."""
        if self.fetcher is not None:
            self.fetcher.cancel(discard=True)
            self.fetcher = None
        clean_staging(self.staging, keep=set())

    def _rollback(self, msg) -> None:
        prev = self.state["previous"]
        choice = next((p for p in prev if msg.bundle_id in (None, p["bundle_id"])), None)
        if choice is None:
            self._change("refused", msg.bundle_id, "rollback: no such previous bundle on this board "
                         f"(kept: {', '.join(p['bundle_id'][:16] for p in prev) or 'none'})", msg.id)
            return
        old = self.bundles.bundle
        error = self.bundles.roll_back(Path(choice["path"]), f"rollback {msg.id}")
        if error:
            self._change("refused", choice["bundle_id"], f"rollback: kept the current bundle: {error}", msg.id)
            return
        self.state["previous"] = [p for p in prev if p is not choice]
        self._remember_previous(old.bundle_id, str(old.root))
        self._change("rolled back", choice["bundle_id"], f"from {old.bundle_id[:16]}", msg.id)


def _release(bundle_dir: Path) -> int:
    """The release counter of a bundle folder's signature, a derived bundle's its parent's (0 when unsigned or
    unreadable)."""
    try:
        return release_of(release_signature(bundle_dir))
    except (SignatureError, OSError, BundleError):
        return 0


def _dump(raw: dict) -> bytes:
    import json
    return json.dumps(raw).encode("utf-8")
