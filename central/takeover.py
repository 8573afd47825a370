"""Collectors sharing the results (--share GROUP): who is alive, and taking over the session of one that is not.

Mosquitto (2.0) keeps handing shared messages to a member whose persistent session is offline (they wait in its
session) and drops a session's in-flight messages when the session ends, so a collector killed with its share
unacknowledged would leave that share waiting until it comes back. Instead:

  presence   each collector publishes "online", retained, at PREFIX/_collect/GROUP/CLIENT_ID when it connects,
             leaves a last will "offline" (retained, sent WILL_DELAY_S after its connection is lost, not at all if
             it is back by then) and publishes "offline" itself when it stops. Every member subscribes to
             PREFIX/_collect/GROUP/+ (no board is named _collect: board names start with a letter or digit).
  takeover   a member that sees another one offline (for GRACE_S) connects with that member's client id (clean start
             off: it resumes that session), stores the results the broker delivers from it through the same batches
             (each acknowledged after its commit; statuses are not stored again: every member has them, and an old
             one must not replace a newer one), unsubscribes the member's filters so that nothing new is routed
             there (only while its own connection is up: two members each told the other is offline, each
             kicking the other's connection, must never both be left unsubscribed; otherwise it leaves that
             session as it is and tries again later), and once everything received is acknowledged and nothing
             came for IDLE_S, ends the session (DISCONNECT with Session Expiry Interval 0). Everything then goes to the living members. If the member
             comes back meanwhile, its connection takes the session over; the takeover's connection is closed
             (Mosquitto 2.0.11 gives no "session taken over" reason) and it never reconnects. Two members
             taking over the same session resolve the same way (the later
             connection wins). A message acknowledged by nobody is delivered again and stored as a duplicate: nothing
             is lost, nothing stored twice.
"""
from __future__ import annotations

import logging
import threading
import time

from central.batches import Link, Message, message_topic

log = logging.getLogger("edge_inspect.collect")

WILL_DELAY_S = 2            # a collector restarted within this time is not taken over
GRACE_S = 0.5               # an "offline" still standing after this is acted upon
IDLE_S = 1.0                # a taken-over session is ended after this long without a message
CONNECT_LIMIT_S = 30        # a takeover that cannot connect gives up (and is tried again on the next "offline")
RETRY_S = 5.0               # a takeover that lost its connection is tried again after this, if still offline


class Presence:
    def __init__(self, group: str, client_id: str, prefix: str, batcher, topics: list, make_client, connect,
                 own_connected=lambda: True):
        self.client_id, self.batcher = client_id, batcher
        self.own_connected = own_connected          # this member's own connection is up (and so subscribed)
        self.base = f"{prefix}/_collect/{group}"
        self.filter, self.topic = f"{self.base}/+", f"{self.base}/{client_id}"
        self.topics = [t for t, _ in topics] + [self.filter]    # what a member subscribes to (unsubscribed on takeover)
        self.make_client, self.connect = make_client, connect
        self.lock = threading.Lock()
        self.states: dict[str, tuple[str, float]] = {}          # member -> (latest presence, since)
        self.takeovers: dict[str, Takeover] = {}

    def announce_on(self, client) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        will = Properties(PacketTypes.WILLMESSAGE)
        will.WillDelayInterval = WILL_DELAY_S
        client.will_set(self.topic, b"offline", qos=1, retain=True, properties=will)

    def online(self, client) -> None:
        client.publish(self.topic, b"online", qos=1, retain=True)

    def handles(self, client, topic: str, msg) -> bool:
        """A presence message (noted and acknowledged at once: it stores nothing); False for anything else."""
        if not topic.startswith(self.base + "/"):
            return False
        member = topic[len(self.base) + 1:]
        if member != self.client_id and "/" not in member:
            with self.lock:
                self.states[member] = (bytes(msg.payload[:16]).decode("ascii", "replace"), time.monotonic())
        client.ack(msg.mid, msg.qos)
        return True

    def poll(self) -> None:
        """Start a takeover for each member offline for GRACE_S; finish those that are done."""
        now = time.monotonic()
        with self.lock:
            due = [m for m, (state, since) in self.states.items()
                   if state == "offline" and now - since >= GRACE_S and m not in self.takeovers]
            for member in due:
                self.states[member] = ("taken over", now)
        for member in due:
            log.info("collector %s of the group is offline: taking over its session", member)
            self.takeovers[member] = Takeover(self, member)
        for member, t in list(self.takeovers.items()):
            if t.poll():
                del self.takeovers[member]
                if t.state != "ended":
                    self.retry_later(member)

    def retry_later(self, member: str) -> None:
        """A takeover that did not finish: try again after RETRY_S unless the member says online meanwhile (a
        member that came back took its session over: it says online at once, so it is not taken back)."""
        with self.lock:
            if self.states.get(member, ("",))[0] == "taken over":
                self.states[member] = ("offline", time.monotonic() + RETRY_S - GRACE_S)

    def close(self, client) -> None:
        """Stop: abandon running takeovers (their sessions stay, another member resumes them) and say that this
        member is offline, so the others take over what the broker routes to its session from now on."""
        for t in self.takeovers.values():
            t.abandon()
        try:
            client.publish(self.topic, b"offline", qos=1, retain=True).wait_for_publish(5)
        except (RuntimeError, ValueError) as exc:      # not connected: the last will says it
            log.info("could not say offline (%s); the last will does", exc)


class Takeover:
    """One member's session, resumed, emptied into the batches, then ended."""

    def __init__(self, presence: Presence, member: str):
        self.presence, self.member = presence, member
        self.started = self.last = time.monotonic()
        self.unsubscribed_at: float | None = None
        self.state = "connecting"       # connecting, draining, empty, deferred, lost, ended
        self.received = 0
        client = presence.make_client(member)
        self.link = link = Link(client)
        batcher, store = presence.batcher, presence.batcher.store

        def on_connect(cl, userdata, flags, reason, properties):
            if reason.is_failure:
                log.warning("taking over %s: the broker refused the connection: %s", member, reason)
                self.state = "lost"
                return
            link.new_connection()
            if not flags.session_present:
                self.state = "empty"
                return
            if not presence.own_connected():
                # both members told the other is offline (or our own connection just dropped): unsubscribing the
                # member's filters now could leave the group with no subscriber, and the broker would drop what
                # comes meanwhile; leave its session as it is and try again later
                self.state = "deferred"
                return
            self.state = "draining"
            cl.unsubscribe(presence.topics)

        def on_unsubscribe(cl, userdata, mid, reasons, properties):
            self.unsubscribed_at = time.monotonic()

        def on_message(cl, userdata, msg):
            topic = message_topic(msg)
            if presence.handles(cl, topic, msg):
                return
            if topic.rsplit("/", 1)[-1] == "status":
                # every living member received this status itself, in order; stored now it could put an older
                # status over a newer one
                cl.ack(msg.mid, msg.qos)
                return
            self.received += 1
            self.last = time.monotonic()
            batcher.add(Message(topic, msg.payload, store.check(topic, msg.payload), link, msg.mid, msg.qos,
                                link.generation))

        def on_disconnect(cl, userdata, flags, reason, properties):
            # never reconnected (make_client: no automatic reconnect): a lost connection is most often the
            # member back, taking its session over (Mosquitto 2.0 closes the older connection without a reason
            # code); reconnecting would take it back, and so on
            link.new_connection()
            if self.state != "ended":
                self.state = "lost"

        client.on_connect, client.on_unsubscribe = on_connect, on_unsubscribe
        client.on_message, client.on_disconnect = on_message, on_disconnect
        presence.connect(client)
        client.loop_start()
        self.client = client

    def poll(self) -> bool:
        """True once finished: the session ended (state "ended"), or the connection is lost (most often to the
        member taking its session back) or could not be made."""
        now = time.monotonic()
        if self.state == "lost":
            log.info("taking over %s: the connection ended after %d message(s) (taken by another connection, "
                     "or lost)", self.member, self.received)
            self.client.loop_stop()
            return True
        if self.state == "deferred":
            log.warning("taking over %s: this collector's own connection is down; %s's subscriptions are left in "
                        "place so the group keeps a subscriber (tried again later)", self.member, self.member)
            self.abandon()
            return True
        drained = self.unsubscribed_at is not None and now - max(self.last, self.unsubscribed_at) >= IDLE_S \
            and self.link.acked == self.received
        if self.state == "empty" or drained:
            self.state = "ended"
            self.end()
            log.info("took over %s's session: %d message(s) stored from it; session ended", self.member,
                     self.received)
            return True
        if self.state == "connecting" and now - self.started > CONNECT_LIMIT_S:
            log.warning("taking over %s: no connection after %d s; giving up for now", self.member, CONNECT_LIMIT_S)
            self.abandon()
            return True
        return False

    def end(self) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.DISCONNECT)
        props.SessionExpiryInterval = 0         # the session ends with this connection
        self.client.disconnect(properties=props)
        self.client.loop_stop()

    def abandon(self) -> None:
        self.client.disconnect()                # the session stays for whoever takes it next
        self.client.loop_stop()
