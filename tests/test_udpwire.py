"""The UDP wire format: the hand-built datagram templates the notifier's hot
loop uses equal what Sealer.seal makes of the same message; the secret that
seals them is read only from a file that not everyone can read."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from kvconfig import values
from kvconfig.udpwire import (
    SUBSCRIBE_PAD_TO,
    Sealer,
    event_head,
    event_tails,
    pad,
    read_secret,
    signed_event_head,
)

from test_values import xmlrpc_values

SECRET = b"a shared secret of 32 bytes, ok!"
keys = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp")),
               min_size=1, max_size=40)


def expected_forms(revision: int, op: str, key: str, value, expired: bool) -> list[dict]:
    """The messages an event datagram may carry, fullest first, as dicts."""
    head = {"t": "event", "sub": "0123456789abcdef", "seq": 7, "rev": revision}
    if op == "delete":
        full = {**head, "op": "delete", "key": key, **({"expired": True} if expired else {})}
        return [full, {**head, "pull": True}]
    return [{**head, "op": "put", "key": key, "value": value},
            {**head, "op": "put", "key": key, "pull": True},
            {**head, "pull": True}]


@given(revision=st.integers(0, 2**63 - 1), op=st.sampled_from(["put", "delete"]),
       key=keys, value=xmlrpc_values, expired=st.booleans())
def test_unsigned_templates_equal_sealed_messages(revision, op, key, value, expired):
    """head + seq + tail is byte for byte what seal() makes of the message."""
    raw = values.encode(value, 1 << 20, 64) if op == "put" else None
    tagged = values.to_tagged(value, 64) if op == "put" else None
    sealer = Sealer(None, Clock())
    tails = event_tails(revision, op, key, raw, expired and op == "delete")
    forms = expected_forms(revision, op, key, tagged, expired and op == "delete")
    assert len(tails) == len(forms)
    for tail, form in zip(tails, forms, strict=True):
        assert event_head(form["sub"]) + b"7" + tail == sealer.seal(form)


@pytest.mark.parametrize("op", ["put", "delete"])
def test_signed_templates_open_to_the_sealed_messages(op):
    """A signed hand-built datagram opens (signature, ts, nonce checked) to the
    same message as a sealed one, and every one carries a fresh nonce."""
    clock = Clock()
    clock.advance(1_700_000_000.25)
    sealer, receiver = Sealer(SECRET, clock), Sealer(SECRET, clock)
    raw = values.encode({"a": [1, 2.5, None]}, 1 << 20, 64) if op == "put" else None
    tails = event_tails(42, op, "app/x", raw)
    forms = expected_forms(42, op, "app/x", {"a": [1, 2.5, None]}, False)
    for tail, form in zip(tails, forms, strict=True):
        hand_built = sealer.sign(signed_event_head(sealer, form["sub"]) + b"7" + tail)
        opened = receiver.open(hand_built)
        sealed = receiver.open(sealer.seal(form))
        assert opened["nonce"] != sealed["nonce"]
        for message in (opened, sealed):
            assert message.pop("ts") == 1_700_000_000.25
            message.pop("nonce")
        assert opened == sealed == {"v": 1, **form}


@pytest.mark.parametrize("secret", [None, SECRET])
def test_padded_requests_are_padded_to_size(secret):
    """A padded subscribe is SUBSCRIBE_PAD_TO bytes (the server answers an
    unproven address with no more than it sent) and opens to the message."""
    sealer = Sealer(secret, Clock())
    message = {"t": "subscribe", "prefix": "app/"}
    datagram = pad(message, sealer)
    assert len(datagram) == SUBSCRIBE_PAD_TO
    opened = Sealer(secret, Clock()).open(datagram)
    assert {name: opened[name] for name in ("t", "prefix")} == message


def test_the_secret_is_the_file_without_surrounding_whitespace(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(b"  s3cret \n")
    path.chmod(0o600)
    assert read_secret(str(path)) == b"s3cret"


@pytest.mark.parametrize("content, mode, complaint", [
    (b"s3cret\n", 0o644, "readable by everyone"),
    (b" \n", 0o600, "is empty"),
    (None, None, "cannot read"),
])
def test_a_secret_file_that_cannot_be_trusted_is_refused(tmp_path, content, mode, complaint):
    """World-readable, empty or missing: a ValueError saying which."""
    path = tmp_path / "secret"
    if content is not None:
        path.write_bytes(content)
        path.chmod(mode)
    with pytest.raises(ValueError, match=complaint):
        read_secret(str(path))


def test_a_directory_is_not_a_secret_file(tmp_path):
    with pytest.raises(ValueError, match="not a regular file"):
        read_secret(str(tmp_path))
